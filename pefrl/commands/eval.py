"""`pefrl eval RUN_DIR [--data PROMPTS] [--adapter final] [--size N] [--num-samples K] [dotted.key=value ...]`.

Scores a trained policy on held-out prompts (or, for an env.name run, held-out games): loads RUN_DIR/config.yaml (the resolved config the run wrote),
the base once, the adapters from RUN_DIR/<adapter> (`final`, a checkpoint directory, or `none` for the base
itself, i.e. the reference; `best` for train.keep_best's), and runs the training-time evaluation
(evaluate.evaluate) with the run's reward config. Prints one JSON object: {"reward_mean" (greedy),
"reward/<function>", "reward_failures", "reward_batch_retries", with --num-samples K (or eval.num_samples) also
"pass@1", "pass@K", "mean@K"; then "n", "adapter", "data"}: the eval_* fields of the run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def adapter_dir(run_dir: Path, adapter: str) -> Path | None:
    """The directory holding the adapters (adapters_io.save_adapters layout) named by `adapter`: RUN_DIR/<adapter>,
    e.g. final/, or a checkpoint's adapters/ (RUN_DIR/checkpoint-<step>/adapters), or <adapter> as a path.
    None for 'none' (evaluate the base without adapters)."""
    from pefrl.adapters_io import HEADS_FILE

    from pefrl.errors import PathError

    if adapter == "none":
        return None
    for base in (run_dir / adapter, Path(adapter).expanduser()):
        for candidate in (base, base / "adapters"):
            if (candidate / HEADS_FILE).is_file():
                return candidate
    raise PathError(f"no adapter directory {run_dir / adapter} (nor {adapter}) holding {HEADS_FILE}")


def evaluate_run(run_dir: str | Path, data: str | None = None, adapter: str = "final", size: int | None = None,
                 overrides: list[str] | tuple[str, ...] = (), rewards: list | tuple = (),
                 num_samples: int | None = None) -> dict[str, Any]:
    """The run's evaluation of its policy on `data` (default: the run's data.eval_prompts): greedy mean reward, per
    reward function, and with num_samples k (default: the run's eval.num_samples) pass@1, pass@k and mean@k.
    rewards: callables or 'module:fn' specs, each replacing the run's reward function of the same name
    (rewards.supply_rewards): how a run trained with callables that cannot be re-imported is scored."""
    from pefrl.config_loader import load_config
    from pefrl.data import load_rows
    from pefrl.envs import env_rewards
    from pefrl.envs import eval_rows as env_eval_rows
    from pefrl.adapters_io import load_adapters
    from pefrl.errors import PathError
    from pefrl.evaluate import eval_rows, evaluate
    from pefrl.export import check_finite_weights
    from pefrl.models import load_models, load_tokenizer
    from pefrl.rewards import build_scorer, supply_rewards

    run_dir = Path(run_dir).expanduser()
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise PathError(f"{config_path} does not exist: is {run_dir} a pefrl run directory?")
    extra = [] if num_samples is None else [f"eval.num_samples={num_samples}"]
    cfg = load_config(config_path, [*overrides, *extra])
    if cfg.env.name:  # an environment run: held-out games, not prompts
        if data:
            raise ValueError(f"the run plays {cfg.env.name}; --data does not apply (use --size for the game count)")
        source, rows = f"{cfg.env.name} (held-out games)", env_eval_rows(size or cfg.data.eval_size)
    else:
        source = data or cfg.data.eval_source
        if data or source:
            rows = load_rows(source, cfg.data, "--data" if data else "data.eval_prompts")
        elif cfg.data.eval_holdout:  # the rows the run held out of data.prompts (drawn by train.seed)
            source, rows = f"{cfg.data.prompts} (held out)", eval_rows(cfg)
        else:
            raise ValueError("no prompts: pass --data (the run has no data.eval_prompts nor data.eval_holdout)")
        rows = rows[:size] if size else rows
    weights = adapter_dir(run_dir, adapter)
    if weights is not None:
        check_finite_weights(weights)  # a diverged run's nan policy scores 0, which looks like a real result
    code = [*cfg.reward.functions, *([cfg.env.name] if cfg.env.name else [])]
    if code:  # a run directory is code: its config names Python that is imported and run here
        print(f"pefrl eval: {config_path} makes this import and run: {', '.join(code)}", file=sys.stderr)
    reward_cfg = supply_rewards(cfg.reward, rewards)
    scorer = build_scorer(reward_cfg, env_rewards(cfg.env))  # before the model: a missing reward fails at once
    tokenizer = load_tokenizer(cfg.model)
    # No critic: evaluation only needs the policy; load_adapters skips the checkpoint's critic adapter.
    models = load_models(cfg.model, cfg.lora, uses_critic=False)
    if weights is not None:
        load_adapters(models, weights)
    models.model.eval()
    metrics = evaluate(models, tokenizer, rows, cfg, scorer)
    return {**metrics, "n": len(rows), "adapter": adapter, "data": source}


def run(args: argparse.Namespace) -> int:
    result = evaluate_run(args.run_dir, args.data, args.adapter, args.size, args.overrides, args.reward,
                          args.num_samples)
    print(json.dumps(result))
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="score a trained policy on held-out prompts",
                       description="Greedy completions of RUN_DIR's policy on held-out prompts, scored with the "
                                   "run's reward config; prints JSON {reward_mean, reward/<function>, ..., n, "
                                   "adapter, data}, and pass@1, pass@K, mean@K with --num-samples K. "
                                   "Example: pefrl eval runs/arithmetic_ppo --data builtin:arithmetic-eval "
                                   "--size 200")
    p.add_argument("run_dir", help="a run's output_dir (holds config.yaml and final/)")
    p.add_argument("--data", default=None,
                   help="prompts: a .jsonl/.csv/.parquet file, a datasets name or builtin:...; "
                        "default: the run's data.eval_prompts")
    p.add_argument("--adapter", default="final",
                   help="subdirectory of RUN_DIR (final, checkpoint-<step>) or a path holding the adapters; "
                        "'none': the base model; 'best': train.keep_best's")
    p.add_argument("--num-samples", type=int, default=None, metavar="K",
                   help="also sample K completions per prompt (eval.temperature, default the rollout's) and "
                        "report pass@1, pass@K and mean@K; a sample is correct when its reward >= "
                        "eval.correct_threshold (1.0). Default: the run's eval.num_samples")
    p.add_argument("--size", type=int, default=None, help="score only the first N prompts")
    p.add_argument("--reward", action="append", default=[], metavar="SPEC",
                   help="a reward function, file.py:fn or package.module:fn, replacing the run's reward of the same "
                        "name (repeatable); needed where the run was trained with a Python callable that cannot be "
                        "re-imported (its config records <callable>:fn)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the run's config, "
                                                "e.g. reward.functions=[my_reward.py:strict]")
    p.set_defaults(func=run)

"""Completions for rows (stage 2 of a step, and evaluation) and the held-out evaluation itself.

`play` turns rows into a rollout: prompts through the chat template and `rollout.generate`, or whole episodes
when env.name is set. `evaluate` scores held-out rows: greedy completions (mean reward, per
reward function) and, with eval.num_samples k, pass@k and mean@k over k samples each. It is the one evaluation:
the trainer's before, during and after training, `pefrl eval` and `pefrl.evaluate` all call it, and it needs
no trainer (models, tokenizer, rows, config, scorer), so it can score any adapters. `evaluate_run` is a saved
run's evaluation (`pefrl eval RUN`, `pefrl.evaluate(run_dir)`): its config, base and adapters, then `evaluate`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from pefrl.adapters_io import HEADS_FILE, load_adapters
from pefrl.config import Config, RolloutConfig
from pefrl.config_loader import load_config
from pefrl.data import format_prompt, hold_out, load_rows, row_prompt
from pefrl.envs import env_rewards
from pefrl.envs import eval_rows as env_eval_rows
from pefrl.errors import PathError
from pefrl.export import check_finite_weights
from pefrl.envs import play_rows
from pefrl.models import Models, load_models, load_tokenizer
from pefrl.ops.eval_stats import mean_at_k, pass_at_k
from pefrl.rewards import Scorer, build_scorer, reduce_stats, supply_rewards
from pefrl.rollout import Rollout, generate
from pefrl.scoring import sampler_requests


def play(models: Models, tokenizer, rows: list[dict[str, Any]], cfg: Config, rollout_cfg: RolloutConfig,
         scores_too: bool = False) -> tuple[list[str], Rollout, dict]:
    """Completions for `rows`: prompts through the chat template, or whole episodes when env.name is set.
    scores_too: let the sampler also score the reference and the critic's values, where it can
    (scoring.sampler_requests; scoring.score_rollout fills in what it could not).
    -> (prompts as given: strings or chat messages, rollout, extra columns for the reward functions)."""
    if cfg.env.name:
        return play_rows(models, tokenizer, rows, rollout_cfg, cfg.env, data_cfg=cfg.data)
    texts = [row_prompt(row, cfg.data, f"row {i}") for i, row in enumerate(rows)]  # as given: str or messages
    prompts = [format_prompt(tokenizer, t, cfg.data) for t in texts]
    columns = {k: [row[k] for row in rows] for k in rows[0] if k != cfg.data.prompt_field}
    requests = sampler_requests(models) if scores_too else {}
    rollout = generate(models, tokenizer, prompts, rollout_cfg, **requests)
    return texts, rollout, columns


def prompts_seen(tokenizer, rollout: Rollout) -> list[str]:
    """Each prompt as the model saw it: its query tokens decoded (chat template and special tokens included)."""
    return [tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=False)
            for ids, mask in zip(rollout.query_ids, rollout.query_mask)]  # (P,) each


def split_rows(cfg: Config, rows, source: str):
    """(training rows, held-out rows) of a run's prompt rows: data.eval_holdout of them held out (drawn by
    train.seed, never trained on), else all of them and data.eval_prompts' rows. The held-out rows are cut to
    data.eval_size."""
    if cfg.data.eval_holdout:
        rows, held_out = hold_out(rows, cfg.data.eval_holdout, cfg.train.seed, source)
        return rows, held_out[: cfg.data.eval_size]
    return rows, eval_rows(cfg)


def eval_rows(cfg: Config) -> list[dict[str, Any]]:
    """The run's held-out rows: data.eval_prompts (first data.eval_size; 'auto': a builtin's own eval set), the
    rows data.eval_holdout held out of data.prompts, or held-out environment seeds."""
    source = cfg.data.eval_source
    if cfg.data.eval_holdout:
        return split_rows(cfg, load_rows(cfg.data.prompts, cfg.data, "data.prompts"), cfg.data.prompts)[1]
    if not source:
        return []
    if cfg.env.name:
        return env_eval_rows(cfg.data.eval_size)  # held-out environment seeds
    return load_rows(source, cfg.data, "data.eval_prompts")[: cfg.data.eval_size]


@torch.no_grad()
def evaluate(models: Models, tokenizer, rows: list[dict[str, Any]], cfg: Config, scorer: Scorer,
             accelerator=None, step: int = 0) -> dict[str, float]:
    """Evaluation on held-out rows, every rank scoring its shard (accelerator None: one process); a collective.

    -> {"reward_mean": mean reward of greedy completions, "reward/<name>": each reward function's mean on them,
    "reward_failures", "reward_batch_retries": the Scorer's counts}; with eval.num_samples k > 0 also
    "pass@1", "pass@k" (unbiased estimator over the k samples of each prompt, a sample correct when its reward
    >= eval.correct_threshold) and "mean@k" (mean reward of the k samples), averaged over prompts.
    The k samples draw from a generator seeded by train.seed, `step` and the rank, inside a forked RNG: the
    caller's RNG moves exactly as with k = 0 (greedy decoding draws from it, as it always has).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    my_rows = rows[rank::world]
    reduce_sum = (lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu()) if world > 1 else (lambda t: t)
    greedy = dataclasses.replace(cfg.rollout, top_k=1, epsilon=0.0)  # top-k 1 sampling is greedy decoding
    scores, stats = _complete_and_score(models, tokenizer, my_rows, cfg, greedy, scorer)
    total = torch.zeros(2)  # float32 sums batch by batch, as evaluations always summed: the same numbers as before
    for batch in scores.split(cfg.rollout.num_sequences):
        total += torch.tensor([batch.sum().item(), len(batch)])
    total = reduce_sum(total)
    metrics = {"reward_mean": (total[0] / total[1].clamp(min=1)).item(), **reduce_stats(stats, len(scores), reduce_sum)}
    k = cfg.eval.num_samples
    if k:
        metrics |= _sampled_metrics(models, tokenizer, my_rows, cfg, scorer, reduce_sum, _eval_seed(cfg, step, rank))
    return metrics


def _complete_and_score(models: Models, tokenizer, rows: list[dict[str, Any]], cfg: Config,
                        rollout_cfg: RolloutConfig, scorer: Scorer) -> tuple[torch.Tensor, dict[str, float]]:
    """Completions of `rows` in batches of rollout.num_sequences, scored in one Scorer call -> (scores (N,), the
    Scorer's stats over the N)."""
    texts, completions, columns = [], [], {}
    size = cfg.rollout.num_sequences
    for i in range(0, len(rows), size):
        chunk_texts, rollout, chunk_columns = play(models, tokenizer, rows[i : i + size], cfg, rollout_cfg)
        texts += chunk_texts
        completions += rollout.completions
        for key, values in chunk_columns.items():
            columns.setdefault(key, []).extend(values)
    return scorer(texts, completions, columns)  # no rows: empty lists, so every rank's stats have the same keys


def _eval_seed(cfg: Config, step: int, rank: int) -> int:
    """The sampled evaluation's seed: its own stream per (train.seed, step, rank), never the training RNG's."""
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(
        (cfg.train.seed * 1_000_003 + step) * 4099 + rank)))


def _sampled_metrics(models: Models, tokenizer, rows: list[dict[str, Any]], cfg: Config, scorer: Scorer,
                     reduce_sum, seed: int) -> dict[str, float]:
    """pass@1, pass@k and mean@k over k = eval.num_samples samples per row, averaged over every rank's rows."""
    k = cfg.eval.num_samples
    sampling = dataclasses.replace(cfg.rollout, temperature=cfg.eval.temperature or cfg.rollout.temperature,
                                   epsilon=0.0)
    repeated = [row for row in rows for _ in range(k)]  # rows k*i..k*i+k-1 are row i's samples
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):  # the training RNG is left where it was
        torch.manual_seed(seed)
        scores, _ = _complete_and_score(models, tokenizer, repeated, cfg, sampling, scorer)
    scores = scores.view(len(rows), k)  # (P, k)
    correct = (scores >= cfg.eval.correct_threshold).sum(-1)  # (P,)
    names = cfg.eval.sample_keys()  # pass@1, pass@k, mean@k
    # pass_at_k needs a problem to take a max over: a rank without rows adds 0 to every sum
    per_prompt = [pass_at_k(k, correct, int(name[len("pass@"):])) if len(rows) else correct.double()
                  for name in names if name.startswith("pass@")]
    per_prompt.append(mean_at_k(scores))
    sums = torch.stack([p.sum() for p in per_prompt] + [torch.tensor(len(rows), dtype=torch.float64)])  # (M + 1,)
    sums = reduce_sum(sums)
    return {name: (sums[j] / sums[-1].clamp(min=1)).item() for j, name in enumerate(names)}


# --- a saved run's evaluation: `pefrl eval RUN`, `pefrl.evaluate(run_dir)` ---------------------------------


def adapter_dir(run_dir: Path, adapter: str) -> Path | None:
    """The directory holding the adapters (adapters_io.save_adapters layout) named by `adapter`: RUN_DIR/<adapter>,
    e.g. final/, or a checkpoint's adapters/ (RUN_DIR/checkpoint-<step>/adapters), or <adapter> as a path.
    None for 'none' (evaluate the base without adapters)."""
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

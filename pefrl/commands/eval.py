"""`pefrl eval RUN_DIR [--data PROMPTS] [--adapter final] [--size N] [--num-samples K] [dotted.key=value ...]`.

Scores a trained policy on held-out prompts (or, for an env.name run, held-out games) with evaluation.evaluate_run:
loads RUN_DIR/config.yaml (the resolved config the run wrote),
the base once, the adapters from RUN_DIR/<adapter> (`final`, a checkpoint directory, or `none` for the base
itself, i.e. the reference; `best` for train.keep_best's), and runs the training-time evaluation
(evaluation.evaluate) with the run's reward config. Prints one JSON object: {"reward_mean" (greedy),
"reward/<function>", "reward_failures", "reward_batch_retries", with --num-samples K (or eval.num_samples) also
"pass@1", "pass@K", "mean@K"; then "n", "adapter", "data"}: the eval_* fields of the run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from pefrl.evaluation import evaluate_run

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

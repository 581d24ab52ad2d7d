"""DAPO (Yu et al. 2025) on LoRA adapters: the loop of recipes/ppo.py with algo=dapo.

What changes against GRPO, and where: stages 1-3 run through `sample_batch`, which drops prompts whose
rewards are all equal and draws more until the batch is full (dynamic sampling, rl.dynamic_sampling_max_draws),
and which masks or penalises completions cut off at max_new_tokens (rl.overlong_*; pefrl/sampling_loop.py);
stage 6 (algo.loss) clips the ratio to [1 - 0.2, 1 + 0.28] (clip-higher) with a token-level mean and no KL term
(pefrl/algorithms/dapo.py).

    python recipes/dapo.py --config recipes/configs/arithmetic_dapo.yaml [dotted.key=value ...]  (one process)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for ppo when run as a script

from ppo import main  # noqa: E402

if __name__ == "__main__":
    summary = main("dapo")
    print({k: v for k, v in summary.items() if k.startswith("eval") or k in ("steps", "train_seconds")})

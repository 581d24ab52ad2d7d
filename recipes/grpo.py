"""GRPO (Shao et al. 2024) on LoRA adapters: the loop of recipes/ppo.py with algo=grpo.

What changes against PPO, and where: no critic (no value head is loaded, stage 4 computes no values);
stage 1 samples rollout.num_samples >= 2 completions per prompt (the group); stage 5 (algo.targets) gives every
token of a completion its group-normalised score (r - mean) / std; stage 6 (algo.loss) adds kl_coef * k3
KL(policy || reference) as a loss term instead of shaping the rewards (pefrl/algorithms/grpo.py).

    accelerate launch recipes/grpo.py --config recipes/configs/arithmetic_grpo.yaml [dotted.key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for ppo when run as a script

from ppo import main  # noqa: E402

if __name__ == "__main__":
    summary = main("grpo")
    print({k: v for k, v in summary.items() if k.startswith("eval") or k in ("steps", "train_seconds")})

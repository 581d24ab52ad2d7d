"""TRPO (Schulman et al. 2015) on LoRA adapters: the loop of recipes/ppo.py with algo=trpo.

What changes against PPO: stage 6 is the algorithm's own update (algo.update): one natural-gradient step of the
policy adapter in a KL trust region (conjugate gradient on Fisher-vector products, a backtracking line
search), then the critic's AdamW steps through the same updater (pefrl/algorithms/trpo.py).

    accelerate launch recipes/trpo.py --config recipes/configs/arithmetic_trpo.yaml [dotted.key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for ppo when run as a script

from ppo import main  # noqa: E402

if __name__ == "__main__":
    summary = main("trpo")
    print({k: v for k, v in summary.items() if k.startswith("eval") or k in ("steps", "train_seconds")})

"""RLOO (Ahmadian et al. 2024) on LoRA adapters: the loop of recipes/ppo.py with algo=rloo.

What changes against PPO: no critic; stage 5 gives each completion score - kl_coef * sequence KL minus the
mean of the other k - 1 samples of its prompt (leave-one-out), broadcast to its tokens (pefrl/algorithms/rloo.py).

    accelerate launch recipes/rloo.py --config recipes/configs/arithmetic_rloo.yaml [dotted.key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for ppo when run as a script

from ppo import main  # noqa: E402

if __name__ == "__main__":
    summary = main("rloo")
    print({k: v for k, v in summary.items() if k.startswith("eval") or k in ("steps", "train_seconds")})

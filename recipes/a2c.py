"""A2C (Mnih et al. 2016) on LoRA adapters: the loop of recipes/ppo.py with algo=a2c.

What changes against PPO: stage 6 takes one on-policy step over the whole batch (no epochs, no clipping):
-A log pi + vf_coef * (V - R)^2 (pefrl/algorithms/a2c.py).

    accelerate launch recipes/a2c.py --config recipes/configs/arithmetic_a2c.yaml [dotted.key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for ppo when run as a script

from ppo import main  # noqa: E402

if __name__ == "__main__":
    summary = main("a2c")
    print({k: v for k, v in summary.items() if k.startswith("eval") or k in ("steps", "train_seconds")})

"""PPO on LoRA adapters: GAE, clipped policy and value losses, per-token KL to the reference.

    accelerate launch recipes/ppo.py --config recipes/configs/arithmetic_ppo.yaml [dotted.key=value ...]
    python recipes/ppo.py --config recipes/configs/arithmetic_ppo.yaml train.steps=20

The loop itself lives in pefrl/trainer.py (numbered stages); the math in pefrl/ops/ and pefrl/algorithms.py.
Copy this file to add your own reward functions in Python: pass them to `train(cfg, extra_rewards=[...])`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _launch when run as a script

from _launch import parse_config  # noqa: E402

from pefrl.trainer import train  # noqa: E402

if __name__ == "__main__":
    summary = train(parse_config("ppo"))
    print({k: v for k, v in summary.items() if k.startswith("eval") or k in ("steps", "train_seconds")})

"""Thin wrapper of `pefrl export` for checkouts without the console script:

    python scripts/export.py runs/smollm2_ppo --out exported/smollm2 --merge --dtype bf16
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pefrl.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))

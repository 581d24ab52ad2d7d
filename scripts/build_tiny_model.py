"""Build the embedded default model (see pefrl/tasks/arithmetic_model.py, which does the work).

    python scripts/build_tiny_model.py [--out pefrl/assets/tiny-arith] [--steps N] [--seed S]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pefrl.tasks.arithmetic_model import main  # noqa: E402

if __name__ == "__main__":
    main()

"""Write the config reference (`pefrl.config_loader.reference()`, built from the dataclass docstrings) into README.md.

    python scripts/gen_config_reference.py            # rewrite the block between the markers
    python scripts/gen_config_reference.py --check    # exit 1 if the README's block is stale (for CI)

The block sits between `<!-- config-reference:start -->` and `<!-- config-reference:end -->`; everything
outside the markers is left byte for byte.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def render(text: str, reference: str) -> str:
    """`text` with the block between the markers replaced by `reference`; raises if the markers are missing."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"README needs the markers {START} and {END}, in that order")
    if text.count(START) != 1 or text.count(END) != 1:
        raise ValueError("README must hold each config-reference marker exactly once")
    return text[: start + len(START)] + "\n" + reference.strip() + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=README, help="file to update (default: the repo README.md)")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the block is stale")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))  # run from a checkout without installing
    from pefrl.config_loader import reference

    text = args.readme.read_text()
    try:
        updated = render(text, reference())
    except ValueError as e:
        print(f"{args.readme}: {e}", file=sys.stderr)
        return 2
    if args.check:
        if updated != text:
            print(f"{args.readme}: config reference is stale; run python scripts/gen_config_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    if updated != text:
        args.readme.write_text(updated)
        print(f"updated the config reference in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

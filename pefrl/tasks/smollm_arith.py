"""Small additions in words for a real chat model (SmolLM2-135M-Instruct): "What is 7 + 5? Reply with just the
number." The recipe recipes/configs/smollm2_ppo.yaml trains on it.

Out of the box the model mostly answers in a sentence ("7 + 5 = 12") and is often wrong at temperature 0.7;
the reward pays for the right number and more for the bare number the prompt asks for, so PPO has two things to
learn fast: get the sum right, and stop after it.

Pairs (a, b) with a, b in 0..9 (the model is unreliable beyond one digit) are split by sha256 as in
pefrl/tasks/arithmetic.py: the 25 smallest hashes are `eval`, the other 75 `train`. `write_data` writes them to recipes/data/smollm_arith_{train,eval}.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

MAX_OPERAND = 9
EVAL_SIZE = 25
DATA_DIR = Path(__file__).resolve().parents[2] / "recipes" / "data"
_STATED = re.compile(r"(?:=|\bis\b:?)\s*(-?\d+)")
"""A number stated as a result: after "=" or "is" ("6 + 3 = 9", "The answer is: 9")."""


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}? Reply with just the number."


def problems(split: str) -> list[dict[str, str]]:
    """Rows {'prompt', 'answer'} of `split` ('train': 75, 'eval': 25) in a fixed pseudo-random order."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    pairs.sort(key=lambda ab: hashlib.sha256(question(*ab).encode()).digest())
    chosen = pairs[:EVAL_SIZE] if split == "eval" else pairs[EVAL_SIZE:]
    return [{"prompt": question(a, b), "answer": str(a + b)} for a, b in chosen]


def answer_reward(prompts: list[str], completions: list[str], answer: list[str], **columns: Any) -> list[float]:
    """1.0 for exactly the answer (whitespace and one trailing period aside), 0.5 when the first number stated as
    a result is the answer ("7 + 5 = 12, ...", "The answer is 12."), 0.0 otherwise. Not "the last number": in
    "3 + 0 = 3" vs "A simple solution: 3 +" an operand would often pass for the answer."""
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
    return [_score(c, str(ans).strip()) for c, ans in zip(completions, answer)]


def _score(completion: str, answer: str) -> float:
    text = completion.strip()
    if text.removesuffix(".").strip() == answer:
        return 1.0
    stated = _STATED.search(text)
    return 0.5 if stated and stated.group(1) == answer else 0.0


def write_data(directory: Path = DATA_DIR) -> list[Path]:
    """Write both splits as JSONL (the recipe's data.prompts / data.eval_prompts)."""
    paths = []
    for split in ("train", "eval"):
        path = Path(directory) / f"smollm_arith_{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in problems(split)))
        paths.append(path)
    return paths


if __name__ == "__main__":
    print("\n".join(str(p) for p in write_data()))

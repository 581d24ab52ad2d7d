"""One-digit sums in a fixed reply form, for a real chat model (SmolLM2-135M-Instruct): "What is 7 + 5? Reply in
the form 'The answer is N.'" The recipes recipes/configs/smollm2_ppo{,_4bit}.yaml train on it.

What is learned is mostly format following, named so: out of the box the model answers about half of these
prompts in its habitual "7 + 5 = 12" and the rest in the requested sentence, which it gets right only about half
the time. The reward is strict and all-or-nothing: 1.0 for exactly "The answer is 12." (trailing period and
whitespace aside) with the right sum, 0.0 for anything else, so neither the habitual equation (right or wrong) nor
the requested sentence with a wrong number earns anything. A greedy eval mean is then the fraction of prompts
answered exactly, and its standard error is sqrt(p (1 - p) / n).

Pairs (a, b) with a, b in 0..9 are split by the sha256 of the unordered pair, so "3 + 4" and "4 + 3" land in the
same split and a held-out sum is never seen in training in the other order: unordered pairs in hash order go to
`eval` until it holds EVAL_SIZE prompts or one more, the rest to `train`. `write_data` writes both splits to
recipes/data/smollm_arith_{train,eval}.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

MAX_OPERAND = 9
EVAL_SIZE = 50
DATA_DIR = Path(__file__).resolve().parents[2] / "recipes" / "data"
_FORM = re.compile(r"The answer is (\d+)\.?")
"""The requested reply, whole: "The answer is 12." (the period may be left off; nothing else may be added)."""


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}? Reply in the form 'The answer is N.'"


def problems(split: str) -> list[dict[str, str]]:
    """Rows {'prompt', 'answer'} of `split` ('train': 50, 'eval': 50) in a fixed pseudo-random order."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    unordered = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(a, MAX_OPERAND + 1)]
    unordered.sort(key=lambda ab: hashlib.sha256(f"{ab[0]}+{ab[1]}".encode()).digest())
    evals: list[tuple[int, int]] = []
    train: list[tuple[int, int]] = []
    for a, b in unordered:
        orders = [(a, b)] if a == b else [(a, b), (b, a)]
        (evals if len(evals) < EVAL_SIZE else train).extend(orders)
    chosen = evals if split == "eval" else train
    return [{"prompt": question(a, b), "answer": str(a + b)} for a, b in chosen]


def answer_form_reward(prompts: list[str], completions: list[str], answer: list[str], **columns: Any) -> list[float]:
    """1.0 when the completion is exactly "The answer is N." with N the answer (the period optional, surrounding
    whitespace ignored), else 0.0. No partial credit: the base model's habitual "7 + 5 = 12" is right but not
    what was asked, and the requested sentence with a wrong number is not arithmetic."""
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
    return [_score(c, str(ans).strip()) for c, ans in zip(completions, answer)]


def _score(completion: str, answer: str) -> float:
    match = _FORM.fullmatch(completion.strip())
    return 1.0 if match is not None and match.group(1) == answer else 0.0


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

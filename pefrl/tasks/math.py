"""Math word problems, GSM8K style: extract the final answer from free text and reward an exact match.

GSM8K's reference solutions end with `#### 72` (Cobbe et al. 2021, "Training Verifiers to Solve Math Word
Problems"); chat models usually write "The answer is 72." or `\\boxed{72}` (MATH, Hendrycks et al. 2021).
`extract_answer` looks for these markers in that order and, unless `strict`, falls back to the last number in
the text, as lm-evaluation-harness's "flexible-extract" filter for gsm8k does. Numbers are normalized so that
"$1,234.00" and "1234" compare equal.

Use in a config:

    reward:
      functions: [pefrl.tasks.math:exact_match_extracted]   # data needs an `answer` column

The `answer` column may be a bare number or a full GSM8K solution ending in "#### 72": both sides are extracted.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

_NUMBER = r"-?[$]?\d[\d,]*(?:\.\d+)?"
# Markers in order of precedence; the first that matches anywhere wins, its LAST occurrence is taken (a model
# may restate an intermediate "the answer is" before the final one).
_MARKERS = (
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"answer is[:\s]*\**\s*(" + _NUMBER + ")", re.IGNORECASE),
    re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),
)
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str) -> str:
    """'$1,234.50' -> '1234.5', '42.0' -> '42', '-7' -> '-7', '007' -> '7'; non-numbers are returned stripped."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)  # exact: float would merge large integers
    except InvalidOperation:
        return text.strip()
    if not value.is_finite():
        return text.strip()
    return format((value + 0).normalize(), "f")  # + 0 turns -0 into 0; normalize drops trailing zeros


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The final answer in `text`, normalized, or None when there is none.

    Precedence: '#### N', 'the answer is N', '\\boxed{N}', then (not strict) the last number anywhere.
    """
    for marker in _MARKERS:
        found = marker.findall(text)
        if found:
            return normalize_number(found[-1])
    if strict:
        return None
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def exact_match_extracted(prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    """1.0 where the completion's extracted answer equals the reference's (flexible extraction), else 0.0.

    A reference with no number at all is an error in the data, not a 0 reward: it raises naming the row.
    """
    return _match(completions, answer, strict=False)


def exact_match_strict(prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    """As `exact_match_extracted`, but the completion must state its answer with a marker ('####',
    'the answer is', '\\boxed{}'): a bare number scores 0. Rewards the format as well as the value."""
    return _match(completions, answer, strict=True)


def _match(completions: list[str], answer: list[Any], strict: bool) -> list[float]:
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
    scores = []
    for i, (completion, ref) in enumerate(zip(completions, answer)):
        expected = extract_answer(str(ref))
        if expected is None:
            raise ValueError(f"answer {i} ({ref!r}) holds no number")
        got = extract_answer(completion, strict=strict)
        scores.append(1.0 if got == expected else 0.0)
    return scores

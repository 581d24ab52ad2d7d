"""Rule rewards for output format and length: no model, no tokenizer, plain text in, floats out.

Parameters come from data columns (one value per row, so a dataset can ask for different lengths or formats
per prompt), with module defaults when the column is absent:

    reward:
      functions: [pefrl.tasks.format:format_regex, pefrl.tasks.format:length_target]
      weights: [1.0, 0.5]

From Python, `make_length_target(40)` / `make_format_regex(r"...")` build fixed-parameter versions to pass as
`train(cfg, extra_rewards=[("len40", make_length_target(40))])`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

DEFAULT_TARGET_LENGTH = 2
"""Characters `length_target` aims at when the data has no `target_length` column."""
DEFAULT_PATTERN = r"\d+"
"""Pattern `format_regex` requires when the data has no `pattern` column: digits only."""


def length_score(length: int, target: int) -> float:
    """1 at the target length, falling linearly to 0 at 0 or 2x the target: 1 - min(1, |length - target| / target).

    target 10: length 10 -> 1.0, 15 -> 0.5, 5 -> 0.5, 20 or more -> 0.0.
    """
    if target <= 0:
        raise ValueError(f"target length must be > 0, got {target}")
    return 1.0 - min(1.0, abs(length - target) / target)


def length_target(prompts: list[str], completions: list[str], target_length: list[int] | None = None,
                  **_: Any) -> list[float]:
    """`length_score` of each completion's length in characters (whitespace at the ends stripped) against its
    row's `target_length` column (default DEFAULT_TARGET_LENGTH)."""
    targets = target_length if target_length is not None else [DEFAULT_TARGET_LENGTH] * len(completions)
    return [length_score(len(c.strip()), int(t)) for c, t in zip(completions, targets, strict=True)]


def format_regex(prompts: list[str], completions: list[str], pattern: list[str] | None = None,
                 **_: Any) -> list[float]:
    """1.0 where the whole completion (ends stripped) matches its row's `pattern` column (a Python regex, default
    DEFAULT_PATTERN) by `re.fullmatch`, else 0.0. Use `(?s)` in the pattern to let `.` match newlines."""
    patterns = pattern if pattern is not None else [DEFAULT_PATTERN] * len(completions)
    return [1.0 if re.fullmatch(p, c.strip()) else 0.0 for c, p in zip(completions, patterns, strict=True)]


def make_length_target(target: int) -> Callable[..., list[float]]:
    """A reward function with a fixed target length (ignores any `target_length` column)."""
    length_score(target, target)  # validate now, not at the first step

    def reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return [length_score(len(c.strip()), target) for c in completions]

    return reward


def make_format_regex(pattern: str) -> Callable[..., list[float]]:
    """A reward function with a fixed pattern (ignores any `pattern` column)."""
    compiled = re.compile(pattern)  # a bad pattern fails here, not at the first step

    def reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return [1.0 if compiled.fullmatch(c.strip()) else 0.0 for c in completions]

    return reward

"""Rewards: Python functions named by import path, a reward model, or both, summed with weights.

A reward function has the signature `fn(prompts: list[str], completions: list[str], **columns) -> list[float]`
where `columns` holds every extra data column (one list entry per completion). A function that raises is re-run
sample by sample to name the one that fails; NaN/inf scores are rejected naming the sample.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pefrl.config import RewardConfig
from pefrl.errors import PefrlError

RewardFn = Callable[..., Sequence[float]]


class RewardError(PefrlError, RuntimeError):
    """A reward function failed or returned a bad value; the message names the function and the sample."""


def load_function(spec: str) -> RewardFn:
    """'pkg.module:function' or 'path/to/file.py:function' -> the callable."""
    if ":" not in spec:
        raise ValueError(f"reward function {spec!r} must look like 'pkg.module:function' or 'file.py:function'")
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"reward function file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {module_name} has no callable {attr!r}")
    return fn


@dataclass
class RewardModel:
    """A sequence-classification checkpoint scoring prompt + completion; the score is logit 0."""

    path: str
    batch_size: int = 16
    model: Any = field(init=False)
    tokenizer: Any = field(init=False)

    def __post_init__(self):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(self.path).exists():
            raise FileNotFoundError(f"reward.model {self.path} does not exist")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        scores = []
        texts = [p + c for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True).to(device)
            scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores


@dataclass
class Scorer:
    """Weighted sum of reward functions (and a reward model), with per-sample error isolation."""

    functions: list[tuple[str, RewardFn, float]]
    on_error: str = "raise"
    timeout_s: float = 0.0

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> tuple[torch.Tensor, dict]:
        """-> scores (B,), stats {reward/<name>: mean, reward_failures: count}."""
        total = torch.zeros(len(completions), dtype=torch.float32)
        stats: dict[str, float] = {"reward_failures": 0.0}
        for name, fn, weight in self.functions:
            values, failures = self._run(name, fn, prompts, completions, columns)
            stats[f"reward/{name}"] = float(sum(values) / max(len(values), 1))
            stats["reward_failures"] += failures
            total += weight * torch.tensor(values, dtype=torch.float32)
        return total, stats

    def _call(self, fn: RewardFn, prompts, completions, columns) -> list[float]:
        if not self.timeout_s:
            return list(fn(prompts, completions, **columns))
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            return list(pool.submit(fn, prompts, completions, **columns).result(timeout=self.timeout_s))
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"took longer than reward.timeout_s={self.timeout_s}s") from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, name, fn, prompts, completions, columns) -> tuple[list[float], int]:
        try:
            values = self._call(fn, prompts, completions, columns)
            if len(values) != len(completions):
                raise RewardError(f"reward function {name} returned {len(values)} scores for {len(completions)} completions")
        except RewardError:
            raise
        except Exception:
            # Re-run one sample at a time to name the sample that fails (or to skip only that one).
            values = [self._one(name, fn, i, prompts, completions, columns) for i in range(len(completions))]
        failures = sum(v is None for v in values)
        values = [0.0 if v is None else v for v in values]
        for i, v in enumerate(values):
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RewardError(f"reward function {name} returned {v!r} for sample {i} (prompt {prompts[i]!r})")
        return [float(v) for v in values], failures

    def _one(self, name, fn, i, prompts, completions, columns) -> float | None:
        try:
            (value,) = self._call(fn, [prompts[i]], [completions[i]], {k: [v[i]] for k, v in columns.items()})
            return value
        except Exception as e:
            if self.on_error == "skip":
                return None
            raise RewardError(
                f"reward function {name} failed on sample {i} (prompt {prompts[i]!r}, completion "
                f"{completions[i]!r}): {type(e).__name__}: {e}"
            ) from e


def build_scorer(cfg: RewardConfig, extra: Sequence[tuple[str, RewardFn]] = ()) -> Scorer:
    """Scorer from config: functions by import path (weights), the reward model, and any callables passed in."""
    weights = cfg.weights or [1.0] * len(cfg.functions)
    functions = [(spec.rpartition(":")[2], load_function(spec), w) for spec, w in zip(cfg.functions, weights)]
    functions += [(name, fn, 1.0) for name, fn in extra]
    if cfg.model:
        functions.append(("reward_model", RewardModel(cfg.model), cfg.model_weight))
    if not functions:
        raise ValueError("no reward: set reward.functions and/or reward.model")
    return Scorer(functions, on_error=cfg.on_error, timeout_s=cfg.timeout_s)

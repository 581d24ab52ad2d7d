"""Step metrics: one JSON object per line in output_dir/metrics.jsonl, a short progress line, trackers."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, then os.replace: a crash at any point leaves
    either the old file or the new one, never an empty or half-written one."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file. A torn last line (a crash mid-append) is dropped with a warning; a
    bad line before it is an error naming the line."""
    lines = [l for l in Path(path).read_text().splitlines() if l.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise ValueError(f"{path} line {i + 1} is not JSON ({e}): {line[:80]!r}") from None
            warnings.warn(f"{path}: dropped a torn last line (a crash while writing it?): {line[:80]!r}",
                          stacklevel=2)
    return records


class MetricsWriter:
    """Appends one JSON line per step (main process only); the file is flushed every line so a crash keeps it."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, resume_step: int = 0):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step:  # drop lines of steps the resumed run will redo, so each step appears once
                for path in (self.path, self.path.parent / "samples.jsonl"):
                    if path.exists():
                        kept = [r for r in read_jsonl(path) if r.get("step", 0) < resume_step]
                        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
            else:
                self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


    def write_samples(self, step: int, prompts: list[str], completions: list[str], scores: list[float],
                      n: int = 8) -> str:
        """Append the first n samples to samples.jsonl; return them as a text table for the console. prompts: as
        the model saw them (after the chat template: evaluation.prompts_seen)."""
        rows = list(zip(prompts, completions, scores))[:n]
        if self.enabled:
            with (self.path.parent / "samples.jsonl").open("a") as f:
                for p, c, r in rows:
                    f.write(json.dumps({"step": step, "prompt": p, "completion": c, "reward": r}) + "\n")
        clip = lambda t: repr(t if len(t) <= 40 else t[:37] + "...")  # noqa: E731
        lines = [f"samples at step {step + 1}:", f"  {'reward':>8}  {'prompt':<42} completion"]
        lines += [f"  {r:>8.3f}  {clip(p):<42} {clip(c)}" for p, c, r in rows]
        return "\n".join(lines)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a pefrl run directory?")
    return read_jsonl(path)


def progress_line(record: dict[str, Any], total_steps: int) -> str:
    keys = [("reward_mean", "reward", "{:.3f}"), ("kl", "kl", "{:.4f}"), ("entropy", "ent", "{:.3f}"),
            ("gen_tokens_per_s", "tok/s", "{:.0f}"), ("step_time_s", "s/step", "{:.2f}"),
            ("eval_reward_mean", "eval", "{:.3f}")]
    parts = [f"step {record['step'] + 1}/{total_steps}"]
    parts += [f"{label} {fmt.format(record[k])}" for k, label, fmt in keys if record.get(k) is not None]
    return " | ".join(parts)


class Timer:
    """Accumulates wall time per named stage: `with timer('gen'): ...`; `timer.times` holds seconds."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t0

        return _Span()

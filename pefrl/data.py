"""Prompt sources: files, `datasets` datasets, the builtin task, or any Python iterable (online data).

A source yields rows: dicts with the prompt under `prompt_field` and any other columns, which reach reward
functions by name. `PromptStream` hands out one global batch per step (every rank sees the same global batch
and keeps its own slice), reshuffles each pass with a seed, and can report and restore its position so a
resumed run sees the same prompts as an uninterrupted one.
"""

from __future__ import annotations

import importlib
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pefrl.config import DataConfig
from pefrl.errors import PefrlError, looks_local, read_utf8
from pefrl.hub import check_hub_name

# Builtin prompt sources: name -> ('module:function', argument), the function returning the rows. Resolved on
# first use, as reward functions are by spec, so this layer never imports a task (tasks live under tasks/).
BUILTINS: dict[str, tuple[str, str]] = {
    "builtin:arithmetic": ("pefrl.tasks.arithmetic:problems", "train"),
    "builtin:arithmetic-eval": ("pefrl.tasks.arithmetic:problems", "eval"),
}


def _builtin_rows(source: str) -> list[dict[str, Any]]:
    spec, argument = BUILTINS[source]
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)(argument)


class DataError(PefrlError, ValueError):
    """Prompt data is missing or malformed; the message names the file and row."""


FORMATS = ".jsonl/.json (one JSON object a line), .txt (one prompt a line), .csv, .parquet"


def load_rows(source: str, prompt_field: str = "prompt", split: str = "train",
              field: str = "prompt source") -> list[dict[str, Any]]:
    """All rows of a finite prompt source, each checked to hold a string prompt. `field` names the source in
    errors (data.prompts, data.eval_prompts, --data).

    A source that looks like a local path (absolute, ./ or ~, nested, or a file extension) is read from disk and
    never looked up on the hub: a missing one is an error at once, not a slow network timeout; so is a dataset
    name that is not cached while the hub cannot be reached."""
    if source in BUILTINS:
        rows = _builtin_rows(source)
    else:
        path = Path(source).expanduser()
        if path.suffix and not path.is_dir() and path.suffix not in (".jsonl", ".json", ".txt", ".csv", ".parquet"):
            raise DataError(f"{field} {source}: unknown format {path.suffix!r}; pefrl reads {FORMATS}, a "
                            f"dataset directory or name, or one of {sorted(BUILTINS)}")
        if (path.suffix or looks_local(source)) and not path.exists():
            raise DataError(f"{field} {source} does not exist (a local path: not looked up on the hub)")
        if not path.exists():
            check_hub_name(source, field, kind="dataset")
        if path.suffix in (".jsonl", ".json"):
            rows = _read_jsonl(path)
        elif path.suffix == ".txt":
            rows = [{prompt_field: line} for line in read_utf8(path, DataError).splitlines() if line.strip()]
        else:
            rows = _read_datasets(str(path) if path.exists() else source, split)
    if not rows:
        raise DataError(f"prompt source {source} holds no rows")
    for i, row in enumerate(rows):
        if not isinstance(row.get(prompt_field), str):
            raise DataError(f"{source}: row {i} has no string field {prompt_field!r} (fields: {sorted(row)})")
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(read_utf8(path, DataError).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_datasets(source: str, split: str) -> list[dict[str, Any]]:
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(source)
    elif path.suffix in (".csv", ".parquet"):
        if not path.is_file():
            raise DataError(f"prompt file {source} does not exist")
        try:
            ds = datasets.load_dataset(path.suffix[1:], data_files=source, split="train")
        except Exception as e:  # zero-byte or header-only files fail inside datasets with messages naming no file
            raise DataError(f"prompt file {source} holds no rows or is not valid {path.suffix[1:]} "
                            f"({type(e).__name__}: {e})") from e
    else:
        ds = datasets.load_dataset(source)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"dataset {source} has no split {split!r} (splits: {list(ds)})")
        ds = ds[split]
    return [dict(r) for r in ds]


class PromptStream:
    """Global batches of rows, forever (finite data, reshuffled each pass) or until an iterable ends.

    `state_dict()` / `load_state_dict()` give the position (pass number and offset) for exact resume.
    """

    def __init__(self, source: list[dict[str, Any]] | Iterable[dict[str, Any]], seed: int, shuffle: bool = True):
        self.rows = source if isinstance(source, list) else None
        self.iterator: Iterator[dict[str, Any]] | None = None if self.rows is not None else iter(source)
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if self.rows is None:
            return []
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self, size: int) -> list[dict[str, Any]] | None:
        """`size` rows, or None when an online iterable has fewer left (the run ends there)."""
        if self.rows is None:
            batch = []
            for row in self.iterator:
                batch.append(row)
                if len(batch) == size:
                    self.offset += size
                    return batch
            return None
        batch = []
        while len(batch) < size:
            if self.offset == len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._make_order()
            take = self._order[self.offset : self.offset + size - len(batch)]
            batch += [self.rows[i] for i in take]
            self.offset += len(take)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.rows is None:
            # An online source cannot be rewound; skip what the interrupted run consumed.
            for _ in range(state["offset"] - self.offset):
                next(self.iterator, None)
            self.offset = state["offset"]
            return
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._make_order()


def check_prompt_lengths(
    rows: list[dict[str, Any]] | Iterable[dict[str, Any]],
    tokenizer,
    data_cfg: DataConfig,
    max_new_tokens: int,
    max_positions: int | None,
    source: str,
) -> list[dict[str, Any]] | Iterable[dict[str, Any]]:
    """`rows`, after checking that every prompt fits: a list is checked now (fail at start, not hours in), an
    online iterable row by row as it is drawn. Prompts are never cut silently; the error names the row index.

    Limit: data.max_prompt_length tokens, and prompt + rollout.max_new_tokens within the model's positions.
    Counted as `generate` encodes: after the chat template, plus the special tokens the tokenizer adds.
    """
    max_prompt_length, prompt_field, chat_template = (data_cfg.max_prompt_length, data_cfg.prompt_field,
                                                      data_cfg.chat_template)
    limit = max_prompt_length
    if max_positions is not None:
        limit = min(limit, max_positions - max_new_tokens)

    def check(index: int, batch: list[dict[str, Any]]) -> None:
        texts = [format_prompt(tokenizer, row[prompt_field], chat_template) for row in batch]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        bos = tokenizer.bos_token
        specials = len(tokenizer("", add_special_tokens=True)["input_ids"])  # what encoding adds (BOS, ...)
        for i, (text, n) in enumerate(zip(texts, lengths)):
            n += 0 if bos and text.startswith(bos) else specials
            if n > limit:
                why = (f"data.max_prompt_length is {max_prompt_length}" if n > max_prompt_length else
                       f"with rollout.max_new_tokens={max_new_tokens} it needs {n + max_new_tokens} positions, the "
                       f"model has {max_positions}")
                raise DataError(f"{source}: row {index + i} has a {n}-token prompt; {why} (prompts are never cut: "
                                f"shorten or drop it). Prompt starts {text[:80]!r}")

    if isinstance(rows, list):
        for start in range(0, len(rows), 1024):
            check(start, rows[start : start + 1024])
        return rows

    def checked() -> Iterator[dict[str, Any]]:
        for i, row in enumerate(rows):
            check(i, [row])
            yield row

    return checked()


def format_prompt(tokenizer, text: str, mode: str) -> str:
    """Apply the tokenizer's chat template ('auto': when it has one; 'on': must have one; 'off': raw)."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if mode == "on" and not has_template:
        raise DataError("data.chat_template is 'on' but the tokenizer has no chat template")
    if mode == "off" or not has_template:
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )

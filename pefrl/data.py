"""Prompt sources: files, `datasets` datasets, the builtin task, or any Python iterable (online data).

A source yields rows: dicts with the prompt under `prompt_field` and any other columns, which reach reward
functions by name. A prompt follows TRL's dataset conventions: a string (standard) or a list of {role, content}
messages (conversational), or `data.prompt_template` makes one from the row's columns. `format_prompt` renders it
as the model sees it: through the tokenizer's chat template, with `data.system_prompt` and
`data.chat_template_kwargs`, and with the generation prompt. `PromptStream` hands out one global batch per step (every rank sees the same global batch
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
# 'builtin:X-eval' is the held-out set of 'builtin:X' (data.eval_prompts 'auto', config.DataConfig.eval_source).
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


def load_rows(source: str, data: DataConfig | None = None, field: str = "prompt source") -> list[dict[str, Any]]:
    """All rows of a finite prompt source, each checked to hold a prompt (`row_prompt`). `data`: the run's
    DataConfig (prompt_field, split, prompt_template; default: DataConfig()). `field` names the source in errors
    (data.prompts, data.eval_prompts, --data).

    A source that looks like a local path (absolute, ./ or ~, nested, or a file extension) is read from disk and
    never looked up on the hub: a missing one is an error at once, not a slow network timeout; so is a dataset
    name that is not cached while the hub cannot be reached."""
    data = data or DataConfig()
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
            rows = [{data.prompt_field: line} for line in read_utf8(path, DataError).splitlines() if line.strip()]
        else:
            rows = _read_datasets(str(path) if path.exists() else source, data.split)
    if not rows:
        raise DataError(f"prompt source {source} holds no rows")
    for i, row in enumerate(rows):
        row_prompt(row, data, f"{source}: row {i}")
    return rows


ROLES = ("system", "user", "assistant", "tool")


def row_prompt(row: dict[str, Any], data: DataConfig, where: str) -> str | list[dict[str, Any]]:
    """The prompt of one row as given: data.prompt_template formatted over its columns, else its prompt_field,
    a string or a list of {role, content} messages (TRL's standard and conversational forms). Anything else
    raises naming `where` (source and row) and the field: a structure is never turned into text."""
    if data.prompt_template is not None:
        try:
            return data.prompt_template.format_map(row)
        except KeyError as e:
            raise DataError(f"{where} has no column {e.args[0]!r}, which data.prompt_template "
                            f"{data.prompt_template!r} names (columns: {sorted(row)})") from None
        except (IndexError, AttributeError, TypeError, ValueError) as e:
            raise DataError(f"{where}: data.prompt_template {data.prompt_template!r} does not apply "
                            f"({type(e).__name__}: {e})") from None
    if not isinstance(row, dict) or data.prompt_field not in row:
        fields = sorted(row) if isinstance(row, dict) else f"not a dict but a {type(row).__name__}"
        raise DataError(f"{where} has no field {data.prompt_field!r} (fields: {fields}): name the prompt's column "
                        "with data.prompt_field, or build the prompt from columns with data.prompt_template")
    prompt = row[data.prompt_field]
    problem = None if isinstance(prompt, str) else _messages_problem(prompt)
    if problem:
        raise DataError(f"{where}: field {data.prompt_field!r} must hold a string or a list of {{role, content}} "
                        f"messages; {problem}")
    return prompt


def _messages_problem(prompt: Any) -> str | None:
    """What keeps `prompt` from being a list of chat messages, or None."""
    if not isinstance(prompt, list):
        return f"got a {type(prompt).__name__}: {str(prompt)[:60]!r}"
    if not prompt:
        return "got an empty list"
    for j, message in enumerate(prompt):
        if not isinstance(message, dict):
            return f"message {j} is a {type(message).__name__}, not a {{role, content}} mapping"
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            return f"message {j} needs a string 'role' and a string 'content' (keys: {sorted(message)})"
        if message["role"] not in ROLES:
            return f"message {j} has role {message['role']!r}, not one of {list(ROLES)}"
    return None


def hold_out(rows: list[dict[str, Any]] | Iterable[dict[str, Any]], n: int, seed: int,
             source: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, held-out rows): n rows drawn by `seed` (data.eval_holdout), the rest in their order."""
    if not isinstance(rows, list):
        raise DataError(f"data.eval_holdout needs a finite prompt source, but {source} is an online iterable (read "
                        "once, never rewound): pass a list, or give held-out rows as data.eval_prompts")
    if n >= len(rows):
        raise DataError(f"data.eval_holdout ({n}) must be below the number of rows of {source} ({len(rows)}): "
                        "some must be left to train on")
    picked = set(random.Random(f"eval_holdout {seed}").sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i not in picked], [rows[i] for i in sorted(picked)]


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


def check_prompts(
    rows: list[dict[str, Any]] | Iterable[dict[str, Any]],
    tokenizer,
    data_cfg: DataConfig,
    max_new_tokens: int,
    max_positions: int | None,
    source: str,
) -> list[dict[str, Any]] | Iterable[dict[str, Any]]:
    """`rows`, after checking that every prompt has a valid shape (`row_prompt`), renders (`format_prompt`) and
    fits: a list is checked now (fail at start, not hours in), an online iterable row by row as it is drawn.
    Prompts are never cut silently; the error names the row index.

    Limit: data.max_prompt_length tokens, and prompt + rollout.max_new_tokens within the model's positions.
    Counted as `generate` encodes: after the chat template, plus the special tokens the tokenizer adds.
    """
    max_prompt_length = data_cfg.max_prompt_length
    limit = max_prompt_length
    if max_positions is not None:
        limit = min(limit, max_positions - max_new_tokens)

    def check(index: int, batch: list[dict[str, Any]]) -> None:
        texts = [render_row(tokenizer, row, data_cfg, f"{source}: row {index + i}") for i, row in enumerate(batch)]
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


def render_row(tokenizer, row: dict[str, Any], data: DataConfig, where: str) -> str:
    """The text the model sees for `row` (`row_prompt` through `format_prompt`); errors name `where`."""
    prompt = row_prompt(row, data, where)
    try:
        return format_prompt(tokenizer, prompt, data)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def _template_applies(tokenizer, data: DataConfig) -> bool:
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if data.chat_template == "on" and not has_template:
        raise DataError("data.chat_template is 'on' but the tokenizer has no chat template")
    return data.chat_template != "off" and has_template


def _apply_template(tokenizer, messages: list[dict[str, Any]], data: DataConfig) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **data.chat_template_kwargs)
    except Exception as e:  # jinja raises on roles or orders a template does not allow
        raise DataError(f"the tokenizer's chat template rejected the prompt ({type(e).__name__}: {e})") from None


def format_prompt(tokenizer, prompt: str | list[dict[str, Any]], data: DataConfig) -> str:
    """The text the model sees for a prompt (a string or chat messages): through the tokenizer's chat template
    when one applies (data.chat_template 'auto': when it has one; 'on': must have one; 'off': raw), with
    data.system_prompt as a first system message (unless the messages bring their own), data.chat_template_kwargs
    and the generation prompt (TRL: add_generation_prompt=True). Chat messages, a system prompt or template
    arguments without a template are an error: they are never flattened into text."""
    if not _template_applies(tokenizer, data):
        why = "data.chat_template is 'off'" if data.chat_template == "off" else "the tokenizer has no chat template"
        if not isinstance(prompt, str):
            raise DataError(f"a prompt of chat messages needs a chat template, but {why}")
        for name in ("system_prompt", "chat_template_kwargs"):
            if getattr(data, name):
                raise DataError(f"data.{name} needs a chat template, but {why}")
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if data.system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": data.system_prompt}, *messages]
    return _apply_template(tokenizer, messages, data)


TURN_MARK = "PEFRL-TURN-MARK"
"""A stand-in policy turn: where it ends in a rendered conversation, the observation's text begins."""


def format_turn(tokenizer, observation: str, data: DataConfig, after: str = "") -> str:
    """The text that hands an environment's observation back to the policy as the next user turn, ending in the
    generation prompt: what the chat template puts after an assistant turn's content in [user, assistant,
    user: observation]; the observation itself when no template applies. `after`: the special token that ended
    the policy's turn, dropped from the front where the template would repeat it (an end-of-turn EOS)."""
    if not _template_applies(tokenizer, data):
        return observation
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": TURN_MARK},
                {"role": "user", "content": observation}]
    text = _apply_template(tokenizer, messages, data)
    tail = text[text.index(TURN_MARK) + len(TURN_MARK):]
    return tail[len(after):] if after and tail.startswith(after) else tail

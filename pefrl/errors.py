"""pefrl's own errors: one base class, so the command line prints any of them as one line (see cli.main).

A `PefrlError` is a mistake in what the user brought (config, data, reward, a path, a checkpoint) and its message
says what and where; anything else is a bug and keeps its traceback. Each subclass also derives from the builtin
exception callers caught before it existed (ValueError, FileNotFoundError, ...).
"""

from __future__ import annotations

import os
from pathlib import Path


class PefrlError(Exception):
    """A user-facing error whose message names the file, field or sample at fault."""


class PathError(PefrlError, FileNotFoundError):
    """A local path named in the config or on the command line does not exist; the message names the field."""


def read_utf8(path: str | Path, error: type[Exception] = PefrlError) -> str:
    """The text of `path`, decoded as UTF-8; bytes that are not UTF-8 raise `error` naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                    "save the file as UTF-8") from None


LOCAL_SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".parquet", ".yaml", ".yml", ".safetensors", ".bin", ".gguf",
                  ".pt")
"""File extensions no hub id ends with: a name ending in one is a local path."""


def looks_local(name: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything absolute, relative-marked (./, ../, ~), deeper, or ending in a
    file extension is a local path, so a missing one is an error at once instead of a slow hub lookup."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or name.endswith("/")
            or name.lower().endswith(LOCAL_SUFFIXES))

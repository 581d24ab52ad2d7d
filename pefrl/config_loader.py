"""Reading, writing and documenting the run configuration; the schema itself is pefrl/config.py.

A YAML file and `dotted.key=value` overrides are loaded strictly: a file that is not UTF-8, not YAML, empty, not a
mapping or holds a key twice raises naming the file; an unknown key raises naming the key and the nearest valid
one (`lr` -> `train.lr`); a value of the wrong type, or a float that is nan or inf, raises naming the field. The
dataclasses' own `__post_init__` then check ranges and choices. `reference()` turns the field docstrings into the
README's config reference, so the two cannot drift.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pefrl.config import Config, ConfigError
from pefrl.errors import read_utf8
from pefrl.saved import saved_form


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping raises (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; raises ConfigError naming the file when it is anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = _parse_yaml(read_utf8(path, ConfigError), f"config file {path}")
    if raw is None or raw == {}:
        raise ConfigError(f"config file {path} is empty; give at least one section (e.g. `train: {{steps: 10}}`) "
                          "or omit the file for all defaults")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (algo, model, train, ...), "
                          f"got a {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Config from a YAML file (or defaults) plus `dotted.key=value` overrides; strict about keys and types."""
    from pefrl.algorithms import check_config  # the registry sits above the schema (and imports torch)

    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    return check_config(from_dict(Config, apply_overrides(raw, overrides)))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`raw` (changed in place and returned) with each `dotted.key=value` set; values parsed as YAML."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_yaml(value, f"override {item!r}") if value.strip() else None
    return raw


def save_config(cfg: Config, path: str | Path) -> None:
    """Write cfg as a run records it: local paths absolute, reward callables by import path (pefrl/saved.py)."""
    Path(path).write_text(yaml.safe_dump(saved_form(cfg).to_dict(), sort_keys=False))


# --- mapping -> dataclasses ---------------------------------------------------------------------------------


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping: unknown keys raise naming the nearest field, types are checked."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix}{key}{_suggestion(str(key), fields, prefix)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _suggestion(key: str, fields: dict, prefix: str) -> str:
    """'; did you mean train.lr?': a field of the same name in another section (`lr=` for `train.lr=`) first,
    else the nearest spelling among this section's fields, else the list of them."""
    elsewhere = [k for k in leaf_keys(Config) if k.rsplit(".", 1)[-1] == key and k != prefix + key]
    if elsewhere:
        return f"; did you mean {' or '.join(elsewhere)}?"
    near = difflib.get_close_matches(key, list(fields), n=1)
    return f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {sorted(fields)}"


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of dataclass `cls` that holds a value (sections expanded): ['algo', ..., 'train.lr', ...]."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _coerce(tp: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, name + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, name)
    if value is None:
        raise ConfigError(f"{name} must not be empty (it has no 'none' setting)")
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:  # free-form arguments handed on as they are (data.chat_template_kwargs)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{name} must be a mapping of names to values, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 3e-4 as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):  # nan passes every `x > 0` check below it, and inf turns weights into nan
            raise ConfigError(f"{name} must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans; take them back as on/off
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {name}")


# --- reference docs -----------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> docstring, read from the string literal under each field in the class source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def reference() -> str:
    """Markdown table of every config field: key, type, default, docstring."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tname = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
            tname = tname or str(tp).replace("typing.", "").replace(" | ", " or ")
            lines.append(f"| `{prefix}{f.name}` | {tname} | `{default!r}` | {docs.get(f.name, '')} |")

    walk(Config, "")
    return "\n".join(lines)

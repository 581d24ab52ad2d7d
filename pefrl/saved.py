"""What a run's saved config.yaml records, so that `pefrl eval RUN` and `pefrl export RUN` work from anywhere.

Paths. A config is read with the shell's semantics: a relative path (data.prompts, reward.functions' `file.py`,
model.name_or_path, ...) is relative to the directory pefrl runs in, as `recipes/data/...` in the README's
recipes run from the repository root, and as TRL and transformers read theirs. The run's saved config.yaml
records each such path that exists as an ABSOLUTE path, so the run can be evaluated, exported or resumed from any
directory. Names that are not local paths (hub ids, `builtin:...`, `pkg.module:fn`) are kept as written.

Reward callables (Python API). A callable in reward.functions is recorded by import path, `module:qualname`,
when importing that path gives the same object back; one that cannot be re-imported (defined in `__main__`, a
lambda, a closure, a callable object) is recorded as `<callable>:name`. A run with such a reward can be
evaluated only when the caller passes the function again (`pefrl eval RUN --reward module:name`, or
`pefrl.evaluate(RUN, rewards=[fn])`); `rewards.build_scorer` says so.
"""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Callable
from pathlib import Path

from pefrl.config import Config

UNIMPORTABLE = "<callable>"
"""Module part of the spec recorded for a reward callable that cannot be re-imported: `<callable>:name`."""


def reward_name(fn: Callable) -> str:
    """The name a reward callable is logged under (`reward/<name>`): its __name__, else its class's name."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def import_path(fn: Callable) -> str | None:
    """'module:qualname' when importing it gives `fn` back, else None (__main__, lambdas, closures, objects)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "." in qualname or "<" in qualname:
        return None
    try:
        found = getattr(importlib.import_module(module), qualname, None)
    except Exception:  # any failure to import means: not importable
        return None
    return f"{module}:{qualname}" if found is fn else None


def callable_spec(fn: Callable) -> str:
    """How the saved config names a reward callable: its import path, or `<callable>:name`."""
    return import_path(fn) or f"{UNIMPORTABLE}:{reward_name(fn)}"


def unimportable_name(spec: object) -> str | None:
    """The function name in a `<callable>:name` spec; None for anything else."""
    if isinstance(spec, str) and spec.startswith(UNIMPORTABLE + ":"):
        return spec.split(":", 1)[1]
    return None


def absolute(value: str | None) -> str | None:
    """An existing local path made absolute (`~` expanded, symlinks kept); anything else unchanged."""
    if not value:
        return value
    path = Path(value).expanduser()
    return os.path.abspath(path) if path.exists() else value


def _reward_spec(spec: object) -> str:
    if callable(spec):
        return callable_spec(spec)
    module, sep, attr = str(spec).rpartition(":")
    return f"{absolute(module)}:{attr}" if sep and module.endswith(".py") else str(spec)


def saved_form(cfg: Config) -> Config:
    """A copy of `cfg` as the run's config.yaml records it: existing local paths absolute, reward callables as
    specs (see the module docstring). `cfg` itself is not changed."""
    out = copy.copy(cfg)
    out.model = copy.copy(cfg.model)
    out.data = copy.copy(cfg.data)
    out.reward = copy.copy(cfg.reward)
    out.model.name_or_path = absolute(cfg.model.name_or_path)
    out.model.reference_adapter = absolute(cfg.model.reference_adapter)
    out.data.prompts = absolute(cfg.data.prompts)
    out.data.eval_prompts = absolute(cfg.data.eval_prompts)
    out.reward.model = absolute(cfg.reward.model)
    out.reward.functions = [_reward_spec(spec) for spec in cfg.reward.functions]
    return out

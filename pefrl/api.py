"""The Python API: `pefrl.load_config`, `pefrl.train`, `pefrl.evaluate` (see docs/api.md).

    import pefrl

    def brevity(prompts, completions, **columns):
        return [-len(c) / 10 for c in completions]

    cfg = pefrl.load_config({"train": {"steps": 5}}, overrides=["rollout.batch_size=8"])
    summary = pefrl.train(cfg, rewards=[brevity], prompts=["2+3=", "4+4="])
    print(pefrl.evaluate(cfg.output_dir, rewards=[brevity]))

The same config, reward and data rules as `pefrl train`; these add Python objects where the command line takes
names: reward callables (`rewards=[fn]`, or callables inside `reward.functions` of a dict config) and prompt rows
(an iterable of dicts or strings, or a `datasets.Dataset`). How a run records callables so that it can be
evaluated later: pefrl/saved.py.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pefrl import _quiet  # noqa: F401  (known third-party noise off, as on the command line)
from pefrl.config import Config, ConfigError
from pefrl.data import DataError

RewardLike = Callable[..., Sequence[float]] | str


def load_config(path_or_dict: str | Path | Mapping[str, Any] | Config | None = None,
                overrides: Sequence[str] = ()) -> Config:
    """A Config from a YAML file, a dict shaped like one (sections as nested dicts), a Config, or None (all
    defaults), plus `dotted.key=value` overrides; as strict as `pefrl train` about keys and types.

    In a dict, `reward.functions` may hold callables besides 'module:fn' / 'file.py:fn' strings."""
    from pefrl.config_loader import apply_overrides, from_dict, load_config as load_yaml

    if path_or_dict is None or isinstance(path_or_dict, (str, Path)):
        return load_yaml(path_or_dict, tuple(overrides))
    if isinstance(path_or_dict, Config):
        path_or_dict = path_or_dict.to_dict()
    if not isinstance(path_or_dict, Mapping):
        raise ConfigError(f"load_config takes a YAML path, a dict or a Config, got a {type(path_or_dict).__name__}")
    raw = copy.deepcopy(dict(path_or_dict))  # functions are copied by reference
    functions, callables = (raw.get("reward") or {}).get("functions"), {}
    if callable(functions):
        functions = [functions]
    if isinstance(functions, list):  # callables stand aside while the strings are checked, then go back
        callables = {i: f for i, f in enumerate(functions) if callable(f)}
        raw["reward"] = {**raw["reward"], "functions": [f"<placeholder {i}>" if i in callables else f
                                                        for i, f in enumerate(functions)]}
    from pefrl.algorithms import check_config

    cfg = check_config(from_dict(Config, apply_overrides(raw, tuple(overrides))))
    cfg.reward.functions = [callables.get(i, f) if f == f"<placeholder {i}>" else f
                            for i, f in enumerate(cfg.reward.functions)]
    return cfg


def train(config: str | Path | Mapping[str, Any] | Config, rewards: Sequence[RewardLike] = (),
          prompts: Iterable[Mapping[str, Any] | str] | None = None) -> dict[str, Any]:
    """Train as `pefrl train` does; returns the run's summary (eval before/after, steps, seconds).

    config: a Config, a YAML path or a dict (load_config). rewards: callables `fn(prompts, completions,
    **columns) -> list[float]` (or 'module:fn' strings) added to reward.functions with weight 1, each logged as
    `reward/<name>`. prompts: rows instead of data.prompts: dicts holding data.prompt_field, a string or a list of
    {role, content} messages, or the columns data.prompt_template names (other keys reach the rewards as
    columns), plain strings (-> {prompt_field: s}), or a `datasets.Dataset`. A list or a Dataset is
    reshuffled each pass like a file; any other iterable is read once, in order, and the run ends when it does."""
    from pefrl.trainer import train as run_training

    cfg = config if isinstance(config, Config) else load_config(config)
    rewards = [rewards] if callable(rewards) or isinstance(rewards, str) else list(rewards)
    if rewards:
        reward = dataclasses.replace(cfg.reward, functions=[*cfg.reward.functions, *rewards],
                                     weights=None if cfg.reward.weights is None else [*cfg.reward.weights,
                                                                                      *[1.0] * len(rewards)])
        cfg = dataclasses.replace(cfg, reward=reward)
    return run_training(cfg, prompt_source=prompt_rows(prompts, cfg.data.prompt_field))


def evaluate(run_dir: str | Path, rewards: Sequence[RewardLike] = (), data: str | None = None,
             adapter: str = "final", size: int | None = None, overrides: Sequence[str] = (),
             num_samples: int | None = None) -> dict[str, Any]:
    """`pefrl eval` from Python: the run's evaluation on `data` (default: the run's data.eval_prompts) ->
    {"reward_mean" (greedy), "reward/<function>", ..., "n", "adapter", "data"}, plus "pass@1", "pass@k", "mean@k"
    with num_samples k (default: the run's eval.num_samples). rewards: callables (or 'module:fn' strings)
    that replace the run's reward functions of the same name; a run trained with a callable that cannot be
    re-imported (defined in __main__, a lambda) needs it here."""
    from pefrl.evaluation import evaluate_run

    rewards = [rewards] if callable(rewards) or isinstance(rewards, str) else list(rewards)
    return evaluate_run(run_dir, data, adapter, size, tuple(overrides), rewards, num_samples)


def prompt_rows(prompts: Any, prompt_field: str = "prompt") -> list[dict[str, Any]] | Iterator[dict[str, Any]] | None:
    """The rows of `prompts` (see `train`): a list for a list, tuple or Dataset, else a lazy iterator."""
    if prompts is None:
        return None
    if isinstance(prompts, (str, bytes, Mapping)):
        raise DataError(f"prompts must be an iterable of rows or strings, got one {type(prompts).__name__}; "
                        "for a file or a dataset name set data.prompts in the config")
    if hasattr(prompts, "column_names") and hasattr(prompts, "__len__"):  # datasets.Dataset (not imported here)
        return [_row(dict(r), i, prompt_field) for i, r in enumerate(prompts)]
    if isinstance(prompts, Sequence):
        return [_row(r, i, prompt_field) for i, r in enumerate(prompts)]
    return (_row(r, i, prompt_field) for i, r in enumerate(prompts))


def _row(row: Any, index: int, prompt_field: str) -> dict[str, Any]:
    """A row as a dict; its prompt is checked as it is drawn (data.check_prompts), as a file's rows are."""
    if isinstance(row, str):
        return {prompt_field: row}
    if not isinstance(row, Mapping):
        raise DataError(f"prompts: row {index} must be a string or a dict of columns, got a {type(row).__name__}: "
                        f"{str(row)[:60]!r}")
    return dict(row)

"""The run directory: whether a config may start or continue a run in output_dir, and which files are the run's.

A pefrl run in output_dir is any of: metrics.jsonl, samples.jsonl, config.yaml, summary.json, final/, best/,
pefrl_run.json (the run id), checkpoint-<step>/ written by pefrl (`checkpoint.written_by_pefrl`) and
.tmp-checkpoint-* / .tmp-best* leftovers. Everything else there (another tool's checkpoint-N/, your notes) is not
the run's and is never deleted.

| output_dir            | train.resume: empty  | latest                                  | PATH                      |
|-----------------------|----------------------|-----------------------------------------|---------------------------|
| holds no pefrl run    | fresh                | fresh                                   | continue PATH, new run id |
| holds a run           | refused              | continue its newest intact checkpoint;  | PATH in output_dir:       |
|                       |                      | none: fresh, unless it finished (final/)| continue; else refused    |
| + train.overwrite     | delete the run's files, then fresh (overwrite with resume set is a config error)     |

A fresh start (the run's old files deleted first, if allowed) writes a new run id into pefrl_run.json;
checkpoints record it, and keep_last deletes only checkpoints with this id.
A resume compares the new config with the config.yaml beside the checkpoint and refuses any change outside
RESUME_SAFE_FIELDS, naming every changed field: a checkpoint restores the optimizer, scheduler and algorithm
state, so a changed lr or algo would only be half applied.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

from pefrl.checkpoint import BEST_DIR, BEST_TMP, PREFIX, RUN_FILE, TMP_PREFIX, list_checkpoints, resolve_resume, run_id, written_by_pefrl
from pefrl.config import Config, ConfigError
from pefrl.config_loader import load_config, save_config
from pefrl.metrics import atomic_write_text
from pefrl.saved import saved_form

RUN_FILES = ("metrics.jsonl", "samples.jsonl", "config.yaml", "summary.json", "final", BEST_DIR, RUN_FILE)

# Fields a resume may change: each is read afresh every step and touches only how long the run goes, what it
# logs, evaluates or saves, or where it writes; none is part of the state a checkpoint restores, and none
# changes an update. Everything else (lr, algo, lora, rollout, reward, data.prompts, seed, ...) is refused.
RESUME_SAFE_FIELDS = frozenset({
    "output_dir",  # a checkpoint may continue into a new directory
    "train.steps", "train.resume", "train.overwrite", "train.max_bad_steps",
    "train.log_every", "train.samples_every", "train.trackers",  # logging
    "train.eval_every", "data.eval_size", "data.eval_prompts",  # evaluation
    "eval.num_samples", "eval.temperature", "eval.correct_threshold",
    "train.keep_best",  # another metric starts a new best; the checkpoint's best is compared only with its own
    "train.save_every", "train.keep_last",  # saving
    "train.mmap_threshold_mib",  # where the allocator puts blocks, not what is computed
})


class RunDirError(ConfigError):
    """output_dir holds a run that this config may not start over or continue as asked."""


def run_files(output_dir: str | Path) -> list[str]:
    """Names of the pefrl run files in output_dir (see the module docstring); [] for an unused directory."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [name for name in RUN_FILES if (root / name).exists()]
    found += [p.name for p in list_checkpoints(root) if written_by_pefrl(p)]
    return found + sorted(p.name for pattern in (TMP_PREFIX, BEST_TMP) for p in root.glob(f"{pattern}*"))


def resolve_run(cfg: Config) -> Path | None:
    """The checkpoint this config continues (None: start fresh), after checking output_dir and the config.

    Read-only, so every rank may call it; `start_run` (main process, later) does the writing. Raises RunDirError
    for a fresh run into a used output_dir and for a resume whose config changed outside RESUME_SAFE_FIELDS.
    """
    root, resume = Path(cfg.output_dir), cfg.train.resume
    path = resolve_resume(root, resume)
    found = run_files(root)
    if found and not cfg.train.overwrite:
        continues = path is not None and path.resolve().parent == root.resolve()
        restarts = path is None and resume == "latest" and not (root / "final").exists()  # killed before a save
        if not (continues or restarts):
            why = {None: "a fresh run there would mix with it",
                   "latest": "train.resume=latest found no checkpoint to continue (the run finished: final/; "
                             "train.save_every writes checkpoints)"}
            go_on = "" if resume == "latest" else "Continue it with train.resume=latest, "
            raise RunDirError(
                f"output_dir {root} already holds a pefrl run ({', '.join(found[:6])}): "
                f"{why.get(resume, f'train.resume={resume} is not one of its checkpoints')}. {go_on}"
                f"{'replace' if go_on else 'Replace'} it with train.overwrite=true (deletes pefrl's run files there, "
                "nothing else), or choose another output_dir")
    if path is not None:
        check_resume_config(path.parent / "config.yaml", cfg)
    return path


def resume_config_diff(saved: Config, new: Config) -> list[str]:
    """'key: old -> new' for every field that differs between two configs, outside RESUME_SAFE_FIELDS."""
    old, cur = _fields(saved), _fields(new)
    return [f"{k}: {old[k]!r} -> {cur[k]!r}" for k in cur if k not in RESUME_SAFE_FIELDS and old.get(k) != cur[k]]


def check_resume_config(saved_path: Path, cfg: Config) -> None:
    """Raise RunDirError naming every unsafe change since the config saved at saved_path (its run's
    config.yaml); warn and skip when there is none (a checkpoint copied out of its run)."""
    if not saved_path.is_file():
        warnings.warn(f"{saved_path} does not exist: the resumed config is not compared with the run's",
                      stacklevel=2)
        return
    try:
        saved = load_config(saved_path)
    except ConfigError as e:
        raise RunDirError(f"train.resume: cannot read the run's saved config {saved_path}: {e}") from None
    changed = resume_config_diff(saved_form(saved), saved_form(cfg))  # paths absolute on both sides
    if changed:
        raise RunDirError(
            f"train.resume: the config differs from the run's {saved_path} in {'; '.join(changed)}. A checkpoint "
            f"restores optimizer, scheduler and algorithm state, so these would be half applied. A resume may "
            f"change only {', '.join(sorted(RESUME_SAFE_FIELDS))}; start a new run (another output_dir, or "
            "train.overwrite=true) to change the others")


def start_run(cfg: Config, resumed_from: Path | None) -> None:
    """Main process, once per launch, after `resolve_run` allowed it: a fresh start deletes the run's old files
    (if any) and writes a new run id; then config.yaml is written (atomically: a resume compares against it)."""
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    if resumed_from is None:
        clear_run(root)
    if resumed_from is None or resumed_from.resolve().parent != root.resolve() or run_id(root) is None:
        atomic_write_text(root / RUN_FILE, json.dumps({"run_id": uuid.uuid4().hex}) + "\n")
    tmp = root / ".tmp-config.yaml"
    save_config(cfg, tmp)
    os.replace(tmp, root / "config.yaml")


def clear_run(output_dir: str | Path) -> None:
    """Delete pefrl's run files in output_dir, checkpoints first (a kill midway leaves nothing to resume from);
    other files and other tools' checkpoint-N/ stay."""
    root = Path(output_dir)
    for name in sorted(run_files(root), key=lambda n: not n.startswith((PREFIX, TMP_PREFIX))):
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _fields(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted config key -> value, for every leaf field of a config dataclass."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out |= _fields(value, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = value
    return out

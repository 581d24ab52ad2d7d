"""Atomic, pickle-free checkpoints: everything a run needs to continue exactly where it stopped.

```
output_dir/checkpoint-<step>/          <step> = optimizer-step count of RL steps done = the step a resume starts at
    adapters/                          adapters_io.save_adapters: peft adapters + value head (safetensors + JSON)
    optimizer.safetensors              every optimizer state tensor, keyed 'state.<param index>.<name>'
    trainer_state.json                 step, world size, optimizer param_groups and non-tensor state, scheduler,
                                       KL controller, algo_state, prompt-stream position, format version
    rng-rank<r>.safetensors / .json    per rank: torch CPU (and CUDA) generator states / python `random` state
```
Atomic: every rank writes into `output_dir/.tmp-checkpoint-<step>`, files and directories are fsynced, then rank 0
renames it to `checkpoint-<step>` (one rename is atomic on POSIX). A crash mid-save leaves only a `.tmp-` directory,
which is never picked as latest and is removed by the next save; older checkpoints are deleted only after the new
one is in place (keep-last-N). Re-saving an existing step (after resuming an older checkpoint) swaps the two
directories in one step (Linux renameat2 RENAME_EXCHANGE), and deletes the old one only then.

Best: with train.keep_best, `output_dir/best/` holds the adapters of the best evaluation so far and best.json
({"metric", "value", "step"}); written like a checkpoint (`.tmp-best`, fsync, one atomic swap), so a crash keeps
the previous best. trainer_state.json carries the best so far, so a resume compares against the best of the run it
continues (not a later, abandoned one's). keep-last-N deletes only checkpoint-<step>/ directories, never best/.

Ownership: trainer_state.json records the run id of `output_dir/pefrl_run.json` (pefrl.rundir writes it when a
run starts). keep-last-N deletes only checkpoints carrying this run's id: another tool's (or an older pefrl's)
`checkpoint-N/` is never touched.

Intact: `latest` skips, with a warning naming the file, a checkpoint whose trainer_state.json is not JSON or whose
safetensors files are truncated (their header must cover the file), and resumes from the previous intact one.

No pickle: safetensors and JSON only. A checkpoint directory holding pickle files (`*.bin`, `*.pt`, `*.pth`,
`*.pkl`, `*.ckpt`) is refused, since unpickling runs arbitrary code; set PEFRL_ALLOW_PICKLE=1 to accept one
you trust (peft then reads `adapter_model.bin` adapters with torch.load(weights_only=True)).
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pefrl.adapters_io import load_adapters, save_adapters
from pefrl.errors import PefrlError
from pefrl.models import Models

FORMAT_VERSION = 1
PREFIX, TMP_PREFIX = "checkpoint-", ".tmp-checkpoint-"
STATE_FILE, OPTIMIZER_FILE, ADAPTERS_DIR = "trainer_state.json", "optimizer.safetensors", "adapters"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ALLOW_PICKLE_ENV = "PEFRL_ALLOW_PICKLE"
RUN_FILE = "pefrl_run.json"  # {"run_id": ...}: which run owns output_dir (pefrl.rundir)
BEST_DIR, BEST_FILE, BEST_TMP = "best", "best.json", ".tmp-best"


@dataclass
class TrainState:
    """What a checkpoint saves and restores besides the RNG: the adapters and every stateful part of the loop
    (each with state_dict / load_state_dict; algo_state a JSON-able dict, restored in place)."""

    models: Models
    optimizer: torch.optim.Optimizer
    scheduler: Any
    kl_ctl: Any
    algo_state: dict[str, Any]
    stream: Any
    best: dict[str, Any] = field(default_factory=dict)  # train.keep_best's best so far: {metric, value, step}


class CheckpointError(PefrlError, RuntimeError):
    """A checkpoint is missing, incomplete, from another run shape, or holds pickle files."""


# --- finding ------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first. `.tmp-` directories (interrupted saves) never count."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = re.fullmatch(rf"{PREFIX}(\d+)", d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """train.resume -> the checkpoint directory to load, or None to start fresh.

    'latest': the newest complete checkpoint in output_dir, or None when there is none yet (so one launch
    command serves both the first start and every restart after a crash). A path must be a checkpoint.
    A damaged checkpoint (see `damage`) is skipped for the previous intact one with a warning naming the bad
    file; another tool's checkpoint-N/ is skipped silently. An explicit path must be an intact checkpoint.
    """
    if not resume:
        return None
    if resume == "latest":
        bad = []
        for path in reversed([p for p in list_checkpoints(output_dir) if written_by_pefrl(p)]):
            problem = damage(path)
            if problem is None:
                if bad:
                    warnings.warn(f"skipped damaged checkpoints ({'; '.join(bad)}): resuming from {path}", stacklevel=2)
                return path
            bad.append(problem)
        if bad:
            raise CheckpointError(f"train.resume=latest: no intact checkpoint in {output_dir}: {'; '.join(bad)}")
        return None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"train.resume={resume}: {path / STATE_FILE} does not exist (not a complete checkpoint)")
    problem = damage(path)
    if problem is not None:
        raise CheckpointError(f"train.resume={resume}: {problem}")
    return path


def _read_state(path: Path) -> dict[str, Any] | None:
    """trainer_state.json as a dict, or None when it is missing, not JSON (truncated) or not a mapping."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def written_by_pefrl(path: Path) -> bool:
    """A pefrl checkpoint: its trainer_state.json has a format_version, or (that file damaged) it holds pefrl's
    optimizer.safetensors and adapters/. Other tools' checkpoint-N/ (e.g. transformers.Trainer's) do not."""
    state = _read_state(path)
    if state is not None:
        return "format_version" in state
    return (path / OPTIMIZER_FILE).is_file() and (path / ADAPTERS_DIR).is_dir()


def damage(path: Path) -> str | None:
    """None for an intact checkpoint, else which file is bad and how: trainer_state.json must be a JSON mapping,
    optimizer.safetensors must exist, and every .safetensors / .json file must be whole (a safetensors header
    names every byte of the file, so truncation is caught without loading tensors)."""
    if _read_state(path) is None:
        return f"{path / STATE_FILE} is not a JSON mapping (truncated?)"
    if not (path / OPTIMIZER_FILE).is_file():
        return f"{path / OPTIMIZER_FILE} is missing"
    for file in sorted(path.rglob("*")):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt"):
                    pass
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except (SafetensorError, OSError, ValueError) as e:
            return f"{file} is damaged (truncated?): {e}"
    return None


def run_id(output_dir: str | Path) -> str | None:
    """The id in output_dir/pefrl_run.json, None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(output_dir) / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def owned_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints written by the run that owns output_dir (same run id), oldest first."""
    rid = run_id(output_dir)
    return [p for p in list_checkpoints(output_dir) if rid is not None and (_read_state(p) or {}).get("run_id") == rid]


# --- saving -------------------------------------------------------------------------------------------------


def save_checkpoint(run: TrainState, acc: Any, output_dir: str | Path, step: int, keep_last: int) -> Path:
    """Write checkpoint-<step> of `run` into output_dir atomically (collective: every rank must call it, acc the
    Accelerator), then keep the last `keep_last`."""
    root = Path(output_dir)
    tmp, final = root / f"{TMP_PREFIX}{step}", root / f"{PREFIX}{step}"
    if final.exists() and not written_by_pefrl(final):  # every rank checks: all stop together
        raise CheckpointError(f"{final} exists and was not written by pefrl (another tool's?): it is never "
                              "replaced; move it or choose another output_dir")
    if acc.is_main_process:
        for stale in root.glob(f"{TMP_PREFIX}*"):  # leftovers of saves that crashed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    _save_rng(tmp, acc.process_index)
    if acc.is_main_process:
        save_adapters(run.models, tmp / ADAPTERS_DIR)
        tensors, opt_json = _split_optimizer(run.optimizer.state_dict())
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        state = {
            "format_version": FORMAT_VERSION,
            "run_id": run_id(root),
            "step": step,
            "world_size": acc.num_processes,
            "optimizer": opt_json,
            "scheduler": _jsonable(run.scheduler.state_dict(), "scheduler"),
            "kl_controller": run.kl_ctl.state_dict(),
            "algo_state": _jsonable(run.algo_state, "algo_state"),
            "stream": run.stream.state_dict(),
            "best": _jsonable(run.best, "best"),
        }
        _write_json(tmp / STATE_FILE, state)
    acc.wait_for_everyone()
    if acc.is_main_process:
        _fsync_tree(tmp)
        _publish(tmp, final)
        _fsync_dir(root)
        for old in owned_checkpoints(root)[:-keep_last]:  # never another tool's or run's checkpoint
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def best_metric(metrics: dict[str, float], metric: str) -> float:
    """metrics[metric], or a CheckpointError naming the evaluation metrics there are (train.keep_best misspelt)."""
    if metric not in metrics:
        raise CheckpointError(f"train.keep_best={metric} is not an evaluation metric of this run; it logs "
                              f"{sorted(k for k in metrics if k.startswith('eval_'))}")
    return metrics[metric]


def keep_best(models: Models, acc: Any, output_dir: str | Path, best: dict[str, Any], metric: str,
              metrics: dict[str, float], step: int) -> bool:
    """train.keep_best: when metrics[metric] beats `best` (the best so far, {metric, value, step}; empty or another
    metric's: none yet), write the adapters to output_dir/best/ atomically with best.json and update `best` in
    place. Higher is better; a nan never is. Collective (acc the Accelerator): every rank decides alike, since
    evaluation metrics are reduced over ranks, and rank 0 writes. -> whether best/ was replaced."""
    value = best_metric(metrics, metric)
    if not value > (best["value"] if best.get("metric") == metric else -math.inf):
        return False
    best.clear()
    best.update(metric=metric, value=value, step=step)
    root = Path(output_dir)
    acc.wait_for_everyone()
    if acc.is_main_process:
        tmp = root / BEST_TMP
        for stale in root.glob(f"{BEST_TMP}*"):  # leftovers of a save that crashed
            shutil.rmtree(stale)
        save_adapters(models, tmp)
        _write_json(tmp / BEST_FILE, best)
        _fsync_tree(tmp)
        _publish(tmp, root / BEST_DIR)
        _fsync_dir(root)
    acc.wait_for_everyone()
    return True


def _publish(tmp: Path, final: Path) -> None:
    """Rename tmp to final. An existing final (re-saving a step after resuming an older checkpoint) is swapped
    out in one atomic step and deleted only then; where the OS cannot swap, it is renamed aside first, so a
    crash between the two renames leaves the previous checkpoints as latest and both copies in .tmp- dirs."""
    if not final.exists():
        os.rename(tmp, final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp)  # tmp now holds the replaced checkpoint
    else:
        aside = tmp.with_name(tmp.name + "-replaced")
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 (macOS, musl, Windows)
        return False
    at_fdcwd, rename_exchange = -100, 2  # <fcntl.h>, <linux/fs.h>
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or filesystem without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors for safetensors, the rest as JSON). Keys: 'state.<idx>.<name>'."""
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": _jsonable(state["param_groups"], "optimizer.param_groups"), "scalars": scalars}


def _save_rng(directory: Path, rank: int) -> None:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(tensors, str(directory / f"rng-rank{rank}.safetensors"))
    version, internal, gauss = random.getstate()
    _write_json(directory / f"rng-rank{rank}.json", {"python": [version, list(internal), gauss]})


def _jsonable(obj: Any, what: str) -> Any:
    """obj with tuples as lists and 0-d tensors as numbers; anything else non-JSON raises naming `what`."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, what) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, what) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot checkpoint {what}: {type(obj).__name__} is not JSON (safetensors/JSON only)")


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under root, so the rename publishes data that is on disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


# --- loading ------------------------------------------------------------------------------------------------


def pickle_allowed() -> bool:
    return os.environ.get(ALLOW_PICKLE_ENV, "") in ("1", "true", "yes")


def check_no_pickle(directory: str | Path) -> None:
    """Raise if `directory` holds pickle files and PEFRL_ALLOW_PICKLE is not set (unpickling runs code)."""
    found = sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if found and not pickle_allowed():
        raise CheckpointError(
            f"{directory} holds pickle files {found[:5]}; pefrl loads safetensors and JSON only. If you trust "
            f"them, set {ALLOW_PICKLE_ENV}=1 (pickled adapters are then read with torch.load(weights_only=True))"
        )


def load_checkpoint(run: TrainState, path: str | Path) -> int:
    """Restore adapters, value head, optimizer, scheduler, KL controller, algo_state and the prompt stream from
    `path` into `run`; returns the step to start at. RNG states are restored separately by `restore_rng`,
    at the start of the loop (evaluation before training draws from the RNG too)."""
    path = Path(path)
    check_no_pickle(path)
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {state.get('format_version')}, "
                              f"this pefrl reads {FORMAT_VERSION}")
    load_adapters(run.models, path / ADAPTERS_DIR)
    run.optimizer.load_state_dict(_join_optimizer(path, state["optimizer"], run.optimizer))
    run.scheduler.load_state_dict(state["scheduler"])
    run.kl_ctl.load_state_dict(state["kl_controller"])
    run.algo_state.clear()
    run.algo_state.update(state["algo_state"])
    run.stream.load_state_dict(state["stream"])
    run.best.clear()
    run.best.update(state.get("best", {}))  # a checkpoint from before keep_best: no best yet
    return int(state["step"])


def _join_optimizer(path: Path, opt_json: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    file = path / OPTIMIZER_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} missing")
    tensors = load_file(str(file))
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    n_saved = sum(len(g["params"]) for g in opt_json["param_groups"])
    if n_params != n_saved:
        raise CheckpointError(f"{path}: optimizer has {n_saved} parameters, this run trains {n_params} "
                              "(different lora / critic settings?)")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in opt_json["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": opt_json["param_groups"]}


def restore_rng(path: str | Path, rank: int) -> bool:
    """Set this rank's torch / CUDA / python RNG to the checkpoint's; False (RNG untouched) when the checkpoint
    has no file for this rank (it was written with fewer ranks: samples then differ from an uninterrupted run)."""
    path = Path(path)
    file = path / f"rng-rank{rank}.safetensors"
    if not file.is_file():
        warnings.warn(f"{path} has no RNG state for rank {rank} (saved with fewer ranks): this rank keeps its fresh "
                      "seed, so its samples differ from an uninterrupted run", stacklevel=2)
        return False
    tensors = load_file(str(file))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"cuda_{i}"] for i in range(sum(k.startswith("cuda_") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = json.loads((path / f"rng-rank{rank}.json").read_text())["python"]
    random.setstate((version, tuple(internal), gauss))
    return True

"""Rewards: Python functions named by import path, a reward model, or both, summed with weights.

A reward function has the signature `fn(prompts: list[str], completions: list[str], **columns) -> list[float]`
where `columns` holds every extra data column (one list entry per completion).

Return values: one number per completion, as a list or tuple, or a 1-D numpy array or torch tensor; the
numbers may be Python, numpy or torch scalars. A dict, a string, a scalar or the wrong length is an error, and so
is NaN/inf. None means "no score" for that sample: an error naming it with `on_error: raise`, a failure scored 0
and counted in `reward_failures` with `on_error: skip`.

Failures: a function is called once on the whole batch. One that raises or times out is re-run sample by sample
to name the sample that fails (`on_error: raise`), or to score only that one 0 (`on_error: skip`). A batch call
that fails while every sample alone succeeds is a bug or a limit of the function that doubles its cost: it is
counted in `reward_batch_retries` and warned about once per function.

Where the calls run. With `timeout_s` and `workers` both 0, in the training process: no overhead, no isolation.
With either set, in worker processes started by fork, and a call past `timeout_s` is abandoned: its process is
killed (SIGKILL) and replaced at the next call. Threads cannot do this: Python cannot stop a thread, so a hung
call kept its thread alive and interpreter exit waited on it forever. Fork rather than spawn or forkserver: the
child inherits the functions, so closures and lambdas passed as `train(cfg, extra_rewards=[...])` work without
pickling (spawn needs picklable callables); only the arguments and the return value cross a pipe. PyTorch's
DataLoader forks its workers from a training process the same way. The price: a forked child must not use CUDA
(the reward model therefore always runs in the training process), and fork does not exist on Windows. Workers
are not daemons, so a reward may start processes of its own; they are killed at `Scorer.close()`, when the
Scorer is collected, at interpreter exit, and a worker whose parent died exits by itself.

Deadline: each call is cut at `timeout_s`. The sample-by-sample retries after failed batch calls run on all the
workers at once and share one deadline of `timeout_s`: a retry not finished (or not started) by then is a failure
of that sample. So a reward that hangs costs about 2 x timeout_s per step (the batch call, then the retries),
not (samples + 1) x timeout_s.

`workers: N > 1` also splits each function's batch call into N contiguous slices run at once (slow judges,
remote calls): a function that needs the whole batch at once (ranking within it) must keep workers <= 1.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import importlib.util
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # imported before the atexit hook below, so the hook runs before its join of children
import numbers
import os
import signal
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pefrl.config import ConfigError, RewardConfig
from pefrl.errors import PefrlError
from pefrl.saved import reward_name, unimportable_name

RewardFn = Callable[..., Sequence[float]]
COUNTS = ("reward_failures", "reward_batch_retries")  # summed over ranks; the other reward stats are means


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
        # a conversational prompt (chat messages) is rendered by the reward model's own template, as TRL does
        texts = [p + c if isinstance(p, str) else self.tokenizer.apply_chat_template(
            [*p, {"role": "assistant", "content": c}], tokenize=False) for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True).to(device)
            scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores


@dataclass
class _Failure:
    """A call that raised, timed out, died or was not run; `text` reads 'ValueError: message'."""

    text: str
    exc: BaseException | None = None


def _failure(e: BaseException) -> _Failure:
    return _Failure(f"{type(e).__name__}: {e}", e)


def _number(v: Any) -> Any:
    """numpy and torch scalars (0-d arrays and tensors included) -> Python numbers; anything else unchanged."""
    return v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v


def _scores(name: str, result: Any, prompts: list[str], lo: int, hi: int, none_ok: bool) -> list[float | None]:
    """A function's return value for samples lo..hi-1 -> one float each (None: no score, only when none_ok)."""
    n = hi - lo
    if hasattr(result, "ndim") and hasattr(result, "tolist"):  # numpy array or torch tensor
        if result.ndim != 1:
            raise RewardError(f"reward function {name} returned an array of shape {tuple(result.shape)} for "
                              f"{n} completions: return one score per completion")
        result = result.tolist()
    if isinstance(result, (Mapping, str, bytes, set)) or not hasattr(result, "__iter__"):
        raise RewardError(f"reward function {name} returned a {type(result).__name__} for {n} completions: return "
                          f"a list with one score per completion")
    values = [_number(v) for v in result]
    if len(values) != n:
        raise RewardError(f"reward function {name} returned {len(values)} scores for {n} completions")
    for i, v in enumerate(values, lo):
        if v is None and none_ok:
            continue
        if not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise RewardError(f"reward function {name} returned {v!r} for sample {i} (prompt {prompts[i]!r})")
    return [None if v is None else float(v) for v in values]


# --- worker processes ---------------------------------------------------------------------------------------


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:  # reparented: the training process is gone, even by SIGKILL
        time.sleep(1.0)
    os._exit(1)


def _serve(conn, functions: list[RewardFn], parent: int) -> None:
    """A worker's loop: (function index, prompts, completions, columns) in, return value or _Failure out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    while True:
        try:
            index, prompts, completions, columns = conn.recv()
        except EOFError:
            return
        try:
            result = functions[index](prompts, completions, **columns)
        except Exception as e:
            result = _Failure(f"{type(e).__name__}: {e}")
        try:
            conn.send(result)
        except Exception as e:  # pickling failed before anything was written
            conn.send(_Failure(f"its return value cannot leave the worker process: {type(e).__name__}: {e}"))


def _kill(workers: list, slots: range | None = None) -> None:
    """Stop workers[slot] for each slot (default: all) and leave None there."""
    for i in range(len(workers)) if slots is None else slots:
        if workers[i] is not None:
            proc, conn = workers[i]
            proc.kill()  # SIGKILL: a hung reward may ignore SIGTERM
            proc.join()  # reaped: no zombie
            conn.close()
            workers[i] = None


_LIVE: weakref.WeakSet = weakref.WeakSet()
atexit.register(lambda: [pool.close() for pool in list(_LIVE)])  # before multiprocessing joins its children


class _Pool:
    """`size` forked workers; a call past `timeout_s` kills its worker, which is replaced when next needed."""

    def __init__(self, functions: list[RewardFn], size: int, timeout_s: float):
        self.functions, self.timeout_s = functions, timeout_s
        self.workers: list = [None] * size  # (process, connection) or None
        self._finalizer = weakref.finalize(self, _kill, self.workers)
        _LIVE.add(self)

    def close(self) -> None:
        self._finalizer()

    def _worker(self, slot: int):
        if self.workers[slot] is None:
            ctx = multiprocessing.get_context("fork")  # inherits the callables: see the module docstring
            conn, child_conn = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child_conn, self.functions, os.getpid()), name="pefrl-reward")
            proc.start()
            child_conn.close()
            self.workers[slot] = (proc, conn)
        return self.workers[slot]

    def run(self, tasks: list[tuple], deadline: float | None) -> list:
        """tasks (index, prompts, completions, columns) -> return values or _Failure, each call cut at timeout_s
        and at `deadline` (time.monotonic()); a task not started by the deadline fails unrun."""
        results: list = [None] * len(tasks)
        pending, busy, idle = deque(range(len(tasks))), {}, list(range(len(self.workers)))
        limit = f"reward.timeout_s={self.timeout_s:g}s"
        while pending or busy:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                while pending:
                    results[pending.popleft()] = _Failure(f"TimeoutError: not run: the retries' deadline ({limit}) passed")
            while pending and idle:
                slot, i = idle.pop(), pending.popleft()
                try:
                    self._worker(slot)[1].send(tasks[i])
                except Exception as e:  # arguments that cannot be pickled, or a worker that died while idle
                    results[i] = _Failure(f"its arguments cannot reach a worker process: {type(e).__name__}: {e}")
                    _kill(self.workers, range(slot, slot + 1))
                    idle.append(slot)
                    continue
                end = now + self.timeout_s if self.timeout_s else math.inf
                busy[slot] = (i, min(end, deadline if deadline is not None else math.inf))
            if not busy:
                continue
            wait_s = min(end for _, end in busy.values()) - now
            ready = multiprocessing.connection.wait([self.workers[s][1] for s in busy],
                                                    timeout=None if wait_s == math.inf else max(wait_s, 0.0))
            now = time.monotonic()
            for slot, (i, end) in list(busy.items()):
                proc, conn = self.workers[slot]
                if conn in ready:
                    try:
                        results[i] = conn.recv()
                    except (EOFError, OSError):
                        proc.join(1.0)
                        results[i] = _Failure(f"RuntimeError: its worker process died (exit code {proc.exitcode})")
                        _kill(self.workers, range(slot, slot + 1))
                elif now >= end:
                    shared = "" if deadline is None else ", which the sample-by-sample retries share"
                    results[i] = _Failure(f"TimeoutError: took longer than {limit}{shared}")
                    _kill(self.workers, range(slot, slot + 1))
                else:
                    continue
                del busy[slot]
                idle.append(slot)
        return results


# --- the scorer ---------------------------------------------------------------------------------------------


@dataclass
class Scorer:
    """Weighted sum of reward functions (and a reward model), with per-sample error isolation."""

    functions: list[tuple[str, RewardFn, float]]
    on_error: str = "raise"
    timeout_s: float = 0.0
    workers: int = 0
    _pool: _Pool | None = field(default=None, init=False, repr=False)
    _warned: set[str] = field(default_factory=set, init=False, repr=False)

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> tuple[torch.Tensor, dict]:
        """-> scores (B,), stats {reward/<name>: mean, reward_failures, reward_batch_retries: counts} of these B
        samples (reduce_stats makes them every rank's)."""
        n, none_ok = len(completions), self.on_error == "skip"
        values = [[None] * n for _ in self.functions]  # per function: a float, or None while unscored
        failures: list[dict[int, _Failure]] = [{} for _ in self.functions]

        # 1. batch calls: each function on the whole batch (on `workers` slices of it with workers > 1)
        calls = [(f, lo, hi) for f in range(len(self.functions)) for lo, hi in self._slices(f, n)]
        retried = []
        for (f, lo, hi), result in zip(calls, self._run(calls, prompts, completions, columns, None)):
            if isinstance(result, _Failure):
                retried.append((f, lo, hi))
            else:
                values[f][lo:hi] = _scores(self.functions[f][0], result, prompts, lo, hi, none_ok)

        # 2. sample by sample where a batch call failed, on every worker at once, all within one timeout_s
        singles = [(f, i, i + 1) for f, lo, hi in retried for i in range(lo, hi)]
        deadline = time.monotonic() + self.timeout_s if self.timeout_s else None
        for (f, i, _), result in zip(singles, self._run(singles, prompts, completions, columns, deadline)):
            if isinstance(result, _Failure):
                failures[f][i] = result
            else:
                values[f][i] = _scores(self.functions[f][0], result, prompts, i, i + 1, none_ok)[0]
        # a failed batch call whose samples all succeed alone: a bug or a limit of the function, at double the cost
        batch_retries = [(f, hi - lo) for f, lo, hi in retried if not any(i in failures[f] for i in range(lo, hi))]
        for f, size in batch_retries:
            self._warn_once(self.functions[f][0], size)

        # 3. failures: raise naming the first sample, or score 0 and count
        if self.on_error == "raise":
            for (name, _, _), failed in zip(self.functions, failures):
                if failed:
                    i = min(failed)
                    raise RewardError(f"reward function {name} failed on sample {i} (prompt {prompts[i]!r}, completion "
                                      f"{completions[i]!r}): {failed[i].text}") from failed[i].exc
        total = torch.zeros(n, dtype=torch.float32)
        stats: dict[str, float] = {"reward_failures": float(sum(v is None for vs in values for v in vs)),
                                   "reward_batch_retries": float(len(batch_retries))}
        for (name, _, weight), vs in zip(self.functions, values):
            scores = torch.tensor([0.0 if v is None else v for v in vs], dtype=torch.float32)
            stats[f"reward/{name}"] = scores.mean().item() if n else 0.0
            total += weight * scores
        return total, stats

    def close(self) -> None:
        """Kill the worker processes (a later call starts new ones)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _pooled(self, f: int) -> bool:
        return bool(self.timeout_s or self.workers) and not isinstance(self.functions[f][1], RewardModel)

    def _slices(self, f: int, n: int) -> list[tuple[int, int]]:
        parts = max(1, min(self.workers, n)) if self._pooled(f) else 1
        bounds = [n * k // parts for k in range(parts + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def _run(self, calls, prompts, completions, columns, deadline) -> list:
        """(function, lo, hi) calls -> return values or _Failure: pooled ones in the workers, the rest here."""
        tasks = [(f, prompts[lo:hi], completions[lo:hi], {k: v[lo:hi] for k, v in columns.items()}) for f, lo, hi in calls]
        pooled = [j for j, (f, _, _) in enumerate(calls) if self._pooled(f)]
        if pooled and self._pool is None:
            self._pool = _Pool([fn for _, fn, _ in self.functions], max(self.workers, 1), self.timeout_s)
        results = self._pool.run([tasks[j] for j in pooled], deadline) if pooled else []
        out = dict(zip(pooled, results))
        for j, (f, p, c, cols) in enumerate(tasks):
            if j not in out:
                try:
                    out[j] = self.functions[f][1](p, c, **cols)
                except Exception as e:
                    out[j] = _failure(e)
        return [out[j] for j in range(len(tasks))]

    def _warn_once(self, name: str, size: int) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"reward function {name} failed on a batch of {size} but succeeded on every sample alone; "
                          f"it is re-run sample by sample each time (counted in reward_batch_retries)", stacklevel=3)


def supply_rewards(cfg: RewardConfig, rewards: Sequence[RewardFn | str]) -> RewardConfig:
    """A copy of cfg where each given reward (a callable or a 'module:fn' / 'file.py:fn' spec) replaces the
    entry of reward.functions with the same name: how a saved run's `<callable>:name` rewards are supplied again.
    A given reward that matches no entry is an error: adding one would change what the run's reward means."""
    functions = list(cfg.functions)
    names = [reward_name(f) if callable(f) else str(f).rpartition(":")[2] for f in functions]
    for given in rewards:
        fn = given if callable(given) else load_function(given)
        name = reward_name(fn)
        if name not in names:
            raise RewardError(f"reward {name} ({given}) matches none of the run's reward functions "
                              f"({', '.join(names) or 'none'}); a given reward replaces the one of the same name. "
                              "To score with other rewards, override reward.functions=[...]")
        functions[names.index(name)] = fn
    return dataclasses.replace(cfg, functions=functions)


def _reward_function(spec: str | RewardFn, given: dict[str, RewardFn]) -> tuple[str, RewardFn]:
    """(name, callable) of one reward.functions entry; a `<callable>:name` one is taken out of `given`."""
    if callable(spec):
        return reward_name(spec), spec
    name = unimportable_name(spec)
    if name is None:
        return spec.rpartition(":")[2], load_function(spec)
    if name not in given:
        raise RewardError(
            f"reward function {name} was a Python callable that cannot be re-imported (defined in __main__, a "
            f"lambda or a closure), so the run recorded only its name ({spec}). Pass it again: on the command line "
            f"`--reward path/to/file.py:{name}` or `--reward package.module:{name}`; in Python "
            f"`pefrl.evaluate(run_dir, rewards=[{name}])` or `pefrl.train(config, rewards=[{name}])`. Defining it "
            "in an importable module records it by import path instead")
    return name, given.pop(name)


def reduce_stats(stats: dict[str, float], n: int, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """One rank's Scorer stats over its n samples -> all ranks': means weighted by each rank's n, counts summed.
    reduce_sum sums a (K,) tensor over ranks (`accelerator.reduce(t, "sum")`): a collective, every rank calls it."""
    keys = list(stats)
    local = torch.tensor([n] + [stats[k] * (1 if k in COUNTS else n) for k in keys], dtype=torch.float32)
    total = reduce_sum(local)  # (K + 1,)
    return {k: total[j + 1].item() / (1 if k in COUNTS else max(total[0].item(), 1)) for j, k in enumerate(keys)}


def build_scorer(cfg: RewardConfig, extra: Sequence[tuple[str, RewardFn]] = ()) -> Scorer:
    """Scorer from config: functions by import path or as callables (weights), the reward model, and any
    (name, callable) passed in `extra`. A `<callable>:name` entry (a saved run's reward that cannot be re-imported,
    pefrl/saved.py) takes the callable of that name from `extra`; the other `extra` callables are added, weight 1."""
    weights = cfg.weights or [1.0] * len(cfg.functions)
    given = dict(extra)
    functions = [(*_reward_function(spec, given), w) for spec, w in zip(cfg.functions, weights)]
    functions += [(name, fn, 1.0) for name, fn in given.items()]
    if cfg.model:
        functions.append(("reward_model", RewardModel(cfg.model), cfg.model_weight))
    if not functions:
        raise ConfigError("no reward: set reward.functions and/or reward.model")
    return Scorer(functions, on_error=cfg.on_error, timeout_s=cfg.timeout_s, workers=cfg.workers)

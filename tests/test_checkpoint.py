"""Checkpoints: atomic, safetensors + JSON only, keep-last-N, exact resume.

The resume tests compare final adapters bit for bit: on CPU with one thread every kernel is deterministic, and a
checkpoint restores every input of the next step (adapters, AdamW moments and step counts, scheduler, KL
controller, prompt-stream position, torch and python RNG), so nothing may differ at all.
The kill tests SIGKILL a subprocess (no cleanup runs, as with the OOM killer or a preempted node), once while it
scores a step and once between writing a checkpoint's files and publishing it, then resume with
train.resume=latest.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pefrl import checkpoint as ck
from pefrl.config_loader import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "algo=ppo", "data.prompts=builtin:arithmetic", "data.eval_prompts=",
    "reward.functions=[pefrl.tasks.arithmetic:exact_match]",
    "rollout.batch_size=4", "rollout.max_new_tokens=4", "rl.minibatch_size=2", "lora.r=2", "train.lr=3e-3",
    "train.save_every=2", "train.keep_last=2", "rl.kl_target=1.0",  # adaptive KL: its state must survive too
]


def _cfg(out: Path, *overrides: str):
    return load_config(None, [*TINY, f"output_dir={out}", *overrides])


def _adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run_dir / "final").rglob("*.safetensors")):
        out |= {f"{f.parent.name}/{f.name}:{k}": v for k, v in load_file(str(f)).items()}
    return out


def _assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 4
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diffs, f"tensors differ: {diffs}"


# --- finding and atomicity ----------------------------------------------------------------------------------


def _fake_checkpoint(path: Path, run_id: str | None = None) -> Path:
    """The files a checkpoint must have to count as an intact pefrl one (no real tensors)."""
    (path / ck.ADAPTERS_DIR).mkdir(parents=True)
    save_file({"state.0.step": torch.zeros(1)}, str(path / ck.OPTIMIZER_FILE))
    (path / ck.STATE_FILE).write_text(json.dumps({"format_version": ck.FORMAT_VERSION, "run_id": run_id}))
    return path


def test_latest_ignores_interrupted_and_incomplete_saves(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-4"):
        _fake_checkpoint(tmp_path / name)
    (tmp_path / ".tmp-checkpoint-12").mkdir()  # a save killed before its rename
    (tmp_path / "checkpoint-11").mkdir()  # no trainer_state.json: not a checkpoint
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    assert ck.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-10"  # numeric, not lexical order
    assert ck.resolve_resume(tmp_path, None) is None
    assert ck.resolve_resume(tmp_path / "empty", "latest") is None  # first launch of a restartable job
    assert ck.resolve_resume(tmp_path, str(tmp_path / "checkpoint-4")) == tmp_path / "checkpoint-4"
    with pytest.raises(ck.CheckpointError, match="checkpoint-11"):
        ck.resolve_resume(tmp_path, str(tmp_path / "checkpoint-11"))


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=0.1, betas=(0.8, 0.95))
    for _ in range(3):
        opt.zero_grad()
        (params[0].sum() ** 2 + params[1].pow(3).sum()).backward()
        opt.step()
    tensors, as_json = ck._split_optimizer(opt.state_dict())
    assert set(tensors) == {f"state.{i}.{n}" for i in (0, 1) for n in ("step", "exp_avg", "exp_avg_sq")}
    json.dumps(as_json)  # plain JSON, no pickle
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.5)
    save_file(tensors, str(tmp_path / ck.OPTIMIZER_FILE))
    fresh.load_state_dict(ck._join_optimizer(tmp_path, as_json, fresh))
    a, b = opt.state_dict(), fresh.state_dict()
    assert b["param_groups"][0]["lr"] == 0.1 and tuple(b["param_groups"][0]["betas"]) == (0.8, 0.95)
    for i in (0, 1):
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][name], b["state"][i][name])


def test_pickle_files_are_refused_unless_allowed(tmp_path, monkeypatch):
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "adapter_model.bin").write_bytes(b"not really a pickle")
    monkeypatch.delenv(ck.ALLOW_PICKLE_ENV, raising=False)
    with pytest.raises(ck.CheckpointError, match=r"adapter_model\.bin.*PEFRL_ALLOW_PICKLE=1"):
        ck.check_no_pickle(tmp_path)
    (tmp_path / ck.STATE_FILE).write_text("{}")
    with pytest.raises(ck.CheckpointError, match=r"adapter_model\.bin"):
        ck.load_checkpoint(None, tmp_path)  # refused before anything is read
    monkeypatch.setenv(ck.ALLOW_PICKLE_ENV, "1")
    ck.check_no_pickle(tmp_path)  # allowed: no error


def test_unjsonable_state_is_an_error_not_a_pickle():
    with pytest.raises(ck.CheckpointError, match="algo_state: object"):
        ck._jsonable({"baseline": object()}, "algo_state")
    assert ck._jsonable({"b": torch.tensor(0.5), "t": (1, 2)}, "x") == {"b": 0.5, "t": [1, 2]}


# --- in-process resume --------------------------------------------------------------------------------------


def test_resume_is_bit_identical_and_keeps_last_n(tmp_path):
    from pefrl.trainer import train

    torch.set_num_threads(1)
    train(_cfg(tmp_path / "full", "train.steps=3", "train.save_every=1"))
    train(_cfg(tmp_path / "split", "train.steps=2", "train.save_every=1"))  # "stops" after checkpoint-2
    summary = train(_cfg(tmp_path / "split", "train.steps=3", "train.save_every=1", "train.resume=latest"))
    assert summary["steps"] == 3
    _assert_bit_identical(_adapter_tensors(tmp_path / "full"), _adapter_tensors(tmp_path / "split"))
    # keep_last=2 of checkpoints 1, 2, 3; the optimizer state at step 3 is identical too
    for run in ("full", "split"):
        assert [p.name for p in ck.list_checkpoints(tmp_path / run)] == ["checkpoint-2", "checkpoint-3"]
    opt_full = load_file(str(tmp_path / "full" / "checkpoint-3" / ck.OPTIMIZER_FILE))
    _assert_bit_identical(opt_full, load_file(str(tmp_path / "split" / "checkpoint-3" / ck.OPTIMIZER_FILE)))
    state = json.loads((tmp_path / "split" / "checkpoint-3" / ck.STATE_FILE).read_text())
    assert state["step"] == 3 and state["stream"] == {"epoch": 0, "offset": 12}  # 3 steps x 4 prompts
    assert state["kl_controller"]["value"] != 0.05  # the adaptive controller moved and was saved
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(3))
    assert not list((tmp_path / "split").rglob("*.bin")) and not list((tmp_path / "split").rglob("*.pt"))


# --- kill -9 (subprocesses) ---------------------------------------------------------------------------------

DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    import pefrl.checkpoint as ck
    from pefrl.config_loader import load_config
    from pefrl.trainer import train

    mode, at = os.environ.get("KILL_MODE", ""), int(os.environ.get("KILL_AT", "0"))
    calls = {"reward": 0, "save": 0}

    def kill_during_scoring(prompts, completions, **_):  # scores 0: does not change the reward
        calls["reward"] += 1
        if mode == "train" and calls["reward"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return [0.0] * len(completions)

    save_adapters = ck.save_adapters
    def kill_mid_save(models, out):  # files written into .tmp-checkpoint-N, not yet renamed
        save_adapters(models, out)
        calls["save"] += 1
        if mode == "save" and calls["save"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    ck.save_adapters = kill_mid_save

    train(load_config(None, sys.argv[1:]), extra_rewards=[("kill", kill_during_scoring)])
""")


def _run_driver(tmp_path: Path, out: Path, *overrides: str, mode: str = "", at: int = 0):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "KILL_MODE": mode, "KILL_AT": str(at)}
    cmd = [sys.executable, str(driver), *TINY, f"output_dir={out}", "train.steps=6", *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_kill9_mid_training_and_mid_save_then_resume_matches_uninterrupted(tmp_path):
    full = _run_driver(tmp_path, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    reference = _adapter_tensors(tmp_path / "full")

    # killed while scoring step index 4 (the 5th reward call): checkpoint-4 is the latest
    killed = _run_driver(tmp_path, tmp_path / "train", mode="train", at=5)
    assert killed.returncode == -9
    assert [p.name for p in ck.list_checkpoints(tmp_path / "train")] == ["checkpoint-2", "checkpoint-4"]
    resumed = _run_driver(tmp_path, tmp_path / "train", "train.resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "checkpoint-4 at step 4" in resumed.stdout
    _assert_bit_identical(reference, _adapter_tensors(tmp_path / "train"))

    # killed inside the second save (checkpoint-4's files written, not yet renamed): checkpoint-2 stays latest
    killed = _run_driver(tmp_path, tmp_path / "save", mode="save", at=2)
    assert killed.returncode == -9
    assert (tmp_path / "save" / ".tmp-checkpoint-4").is_dir() and not (tmp_path / "save" / "checkpoint-4").exists()
    assert ck.resolve_resume(tmp_path / "save", "latest") == tmp_path / "save" / "checkpoint-2"
    resumed = _run_driver(tmp_path, tmp_path / "save", "train.resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint-2 at step 2" in resumed.stdout
    assert not list((tmp_path / "save").glob(".tmp-*"))  # the next save cleared the leftover
    _assert_bit_identical(reference, _adapter_tensors(tmp_path / "save"))


def test_rng_restore_is_exact_and_warns_for_a_rank_the_checkpoint_lacks(tmp_path):
    import random

    torch.manual_seed(123)
    random.seed(7)
    ck._save_rng(tmp_path, rank=0)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(999)
    random.seed(999)
    assert ck.restore_rng(tmp_path, rank=0)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    with pytest.warns(UserWarning, match="no RNG state for rank 1"):
        assert not ck.restore_rng(tmp_path, rank=1)


# --- the run directory (pefrl/rundir.py) --------------------------------------------------------------------


def _foreign_checkpoint(path: Path) -> Path:
    """What transformers.Trainer writes: checkpoint-N/ with its own trainer_state.json and pickles."""
    path.mkdir(parents=True)
    (path / ck.STATE_FILE).write_text(json.dumps({"global_step": 7, "log_history": []}))
    (path / "optimizer.pt").write_bytes(b"another tool's")
    return path


def test_fresh_run_into_a_used_output_dir_is_refused_and_overwrite_deletes_only_pefrl_files(tmp_path):
    from pefrl.config import ConfigError
    from pefrl.rundir import RunDirError, resolve_run, start_run

    out = tmp_path / "run"
    assert resolve_run(_cfg(out, "train.resume=latest")) is None  # nothing there yet: starts fresh
    start_run(_cfg(out), None)
    _fake_checkpoint(out / "checkpoint-4", ck.run_id(out))
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    _foreign_checkpoint(out / "checkpoint-7")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"already holds a pefrl run \(metrics.jsonl, config.yaml, pefrl_run.json, "
                                          r"checkpoint-4\).*train.resume=latest.*train.overwrite=true"):
        resolve_run(_cfg(out))
    with pytest.raises(RunDirError, match=r"train.resume=\S+other/checkpoint-2 is not one of its checkpoints"):
        resolve_run(_cfg(out, f"train.resume={_fake_checkpoint(tmp_path / 'other' / 'checkpoint-2')}"))
    with pytest.raises(ConfigError, match="train.overwrite=true deletes the run that train.resume=latest"):
        _cfg(out, "train.overwrite=true", "train.resume=latest")
    old_id = ck.run_id(out)
    assert resolve_run(_cfg(out, "train.overwrite=true")) is None
    start_run(_cfg(out, "train.overwrite=true"), None)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-7", "config.yaml", "notes.txt", "pefrl_run.json"]
    assert (out / "checkpoint-7" / "optimizer.pt").read_bytes() == b"another tool's"
    assert ck.run_id(out) not in (None, old_id)
    # killed before its first checkpoint: resume=latest starts it again; once finished (final/), it refuses
    assert resolve_run(_cfg(out, "train.resume=latest")) is None
    (out / "final").mkdir()
    with pytest.raises(RunDirError, match=r"found no checkpoint to continue \(the run finished: final/"):
        resolve_run(_cfg(out, "train.resume=latest"))


def test_a_refused_fresh_run_leaves_the_old_run_whole_and_keep_last_spares_other_checkpoints(tmp_path):
    from pefrl.rundir import RunDirError
    from pefrl.trainer import train

    torch.set_num_threads(1)
    _foreign_checkpoint(tmp_path / "clash" / "checkpoint-1")
    with pytest.raises(ck.CheckpointError, match=r"clash/checkpoint-1 exists and was not written by pefrl"):
        train(_cfg(tmp_path / "clash", "train.steps=1", "train.save_every=1"))
    assert (tmp_path / "clash" / "checkpoint-1" / "optimizer.pt").read_bytes() == b"another tool's"

    out = tmp_path / "run"
    _foreign_checkpoint(out / "checkpoint-1")  # another tool's, older than this run's checkpoints
    _foreign_checkpoint(out / "checkpoint-9")  # and newer: `latest` must not pick it
    train(_cfg(out, "train.steps=4", "train.save_every=2", "train.keep_last=1"))
    assert (out / "checkpoint-1" / "optimizer.pt").read_bytes() == b"another tool's"
    assert (out / "checkpoint-9").is_dir() and not (out / "checkpoint-2").exists()  # keep_last removed only ours
    assert [p.name for p in ck.owned_checkpoints(out)] == ["checkpoint-4"]
    assert ck.resolve_resume(out, "latest") == out / "checkpoint-4"
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match="already holds a pefrl run"):
        train(_cfg(out, "train.steps=2"))
    assert (out / "metrics.jsonl").read_text() == before and len(before.splitlines()) == 4
    assert [p.name for p in ck.owned_checkpoints(out)] == ["checkpoint-4"]


def test_resume_with_a_changed_config_names_every_changed_field(tmp_path):
    from pefrl.config_loader import load_config
    from pefrl.rundir import RESUME_SAFE_FIELDS, RunDirError, resume_config_diff
    from pefrl.trainer import setup

    saved = _cfg(tmp_path)
    safe = _cfg(tmp_path / "elsewhere", "train.steps=50", "train.log_every=5", "train.eval_every=2",
                "train.save_every=7", "train.keep_last=9", "train.resume=latest", "train.trackers=[tensorboard]")
    assert resume_config_diff(saved, safe) == [] and "train.lr" not in RESUME_SAFE_FIELDS
    assert resume_config_diff(saved, _cfg(tmp_path, "lora.r=4", "train.lr=1e-2")) == [
        "lora.r: 2 -> 4", "train.lr: 0.003 -> 0.01"]

    from pefrl.trainer import train

    torch.set_num_threads(1)
    train(_cfg(tmp_path, "train.steps=1", "train.save_every=1"))
    with pytest.raises(RunDirError, match=r"differs from the run's \S+config.yaml in algo: 'ppo' -> 'a2c'; "
                                          r"train.lr: 0.003 -> 0.01\. .*may change only .*train.steps"):
        setup(_cfg(tmp_path, "train.resume=latest", "train.lr=1e-2", "algo=a2c"))
    assert load_config(tmp_path / "config.yaml").train.lr == 3e-3  # the run's record is unchanged


def test_damaged_checkpoint_falls_back_to_the_previous_intact_one_naming_the_file(tmp_path):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}")
    opt = tmp_path / "checkpoint-3" / ck.OPTIMIZER_FILE
    opt.write_bytes(opt.read_bytes()[:-5])  # truncated
    with pytest.warns(UserWarning, match=r"checkpoint-3/optimizer.safetensors is damaged.*resuming from \S+checkpoint-2"):
        assert ck.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-2"
    state = tmp_path / "checkpoint-2" / ck.STATE_FILE
    state.write_text(state.read_text()[:10])
    with pytest.warns(UserWarning, match=r"checkpoint-3/optimizer.safetensors.*checkpoint-2/trainer_state.json is not"):
        assert ck.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-1"
    with pytest.raises(ck.CheckpointError, match=r"checkpoint-3/optimizer.safetensors is damaged"):
        ck.resolve_resume(tmp_path, str(tmp_path / "checkpoint-3"))
    (tmp_path / "checkpoint-1" / "rng-rank0.json").write_text('{"python": [3, [')
    with pytest.raises(ck.CheckpointError, match=r"no intact checkpoint.*checkpoint-1/rng-rank0.json is damaged"):
        ck.resolve_resume(tmp_path, "latest")


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_checkpoint_never_deletes_before_the_new_one_is_in_place(tmp_path, monkeypatch, exchange):
    final = _fake_checkpoint(tmp_path / "checkpoint-2", run_id="old")
    tmp = _fake_checkpoint(tmp_path / ".tmp-checkpoint-2", run_id="new")
    if not exchange:  # an OS or filesystem that cannot swap two directories
        monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    seen = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            seen.append((fn.__name__, json.loads((final / ck.STATE_FILE).read_text())["run_id"]
                         if (final / ck.STATE_FILE).is_file() else None))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(ck.shutil, "rmtree", spy(ck.shutil.rmtree))
    monkeypatch.setattr(ck.os, "rename", spy(ck.os.rename))
    ck._publish(tmp, final)
    assert json.loads((final / ck.STATE_FILE).read_text())["run_id"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    # any deletion happens only once checkpoint-2 is the new one; with the swap, checkpoint-2 is never absent
    assert [s for s in seen if s[0] == "rmtree"] == [("rmtree", "new")]
    if exchange:
        assert all(rid is not None for _, rid in seen)


def test_metrics_rewrite_is_atomic_and_drops_a_torn_last_line(tmp_path, monkeypatch):
    from pefrl import metrics

    lines = [json.dumps({"step": s, "reward_mean": 0.5}) for s in range(4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "rew')  # killed mid-append
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped a torn last line"):
        assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [0, 1, 2, 3]
    before = (tmp_path / "metrics.jsonl").read_text()

    def crash(src, dst):  # as if killed between writing the new file and publishing it
        raise KeyboardInterrupt

    monkeypatch.setattr(metrics.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="torn"):
        metrics.MetricsWriter(tmp_path, resume_step=2)
    assert (tmp_path / "metrics.jsonl").read_text() == before  # never truncated in place
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="torn"):
        metrics.MetricsWriter(tmp_path, resume_step=2)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(l + "\n" for l in lines[:2])
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl line 2 is not JSON"):
        metrics.read_metrics(tmp_path)

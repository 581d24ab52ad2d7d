"""Two CPU ranks (gloo) through `accelerate launch`, as users run it, with recipes/accelerate/ddp_cpu_2ranks.yaml.

Global batch semantics (docs/distributed.md): rollout.batch_size and rl.minibatch_size are per process; N ranks
consume N * batch_size prompts per step, each rank a distinct slice, and adapter gradients are averaged over
ranks before every optimizer step.

Comparing 2 ranks with 1 rank: samples are drawn from each rank's own RNG, so the two runs would sample different
completions. The driver below samples per *global* batch instead: every rank generates the whole global batch with
one shared seed and keeps its own rows, exactly the rollout a single rank with the global batch generates. What
then remains different is only floating-point: forwards over b rows instead of 2b, and the gradient mean taken as
a mean of per-rank means. For that to be the same mean the config uses per-sequence loss aggregation and no
batch whitening (whitening and token_mean are per-rank statistics, see the docs).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ACCEL = REPO / "recipes" / "accelerate"

DRIVER = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    import pefrl.evaluation as E
    import pefrl.trainer as T
    from pefrl.config_loader import load_config
    from pefrl.adapters_io import save_adapters
    from pefrl.rollout import Rollout

    mode = os.environ.get("DIST_MODE", "")
    rank = int(os.environ.get("RANK", "0"))
    generate, calls = E.generate, {"generate": 0, "reward": 0}

    def global_generate(models, tokenizer, prompts, cfg, **kw):
        # every rank samples the whole global batch with one shared seed and keeps its own rows
        world = dist.get_world_size() if dist.is_initialized() else 1
        parts = [None] * world
        dist.all_gather_object(parts, prompts) if world > 1 else parts.__setitem__(0, prompts)
        calls["generate"] += 1
        r = generate(models, tokenizer, sum(parts, []), cfg, generator=torch.Generator().manual_seed(calls["generate"]))
        rows = slice(rank * len(prompts), (rank + 1) * len(prompts))
        return Rollout(query_ids=r.query_ids[rows], query_mask=r.query_mask[rows], response_ids=r.response_ids[rows],
                       response_mask=r.response_mask[rows], completions=r.completions[rows])

    def rank1_fails_at_step1(prompts, completions, **_):
        calls["reward"] += 1
        if mode == "fail" and rank == 1 and calls["reward"] >= 2:  # from step 1 on
            raise ValueError("rank 1's reward server is down")
        if mode == "rank1_skips" and rank == 1:  # with reward.on_error=skip: rank 1's samples fail, rank 0's score 1
            raise ValueError("rank 1 cannot score")
        return [float(mode == "rank1_skips")] * len(completions)

    if mode == "global_rows":
        E.generate = global_generate  # what evaluation.play samples with
    run = T.setup(load_config(None, sys.argv[1:]), extra_rewards=[("probe", rank1_fails_at_step1)])
    print(f"rank {run.accelerator.process_index} of {run.accelerator.num_processes}", flush=True)
    T.train(run.cfg, run=run)
    save_adapters(run.models, os.path.join(run.cfg.output_dir, f"rank{rank}"))
""")

BASE = ["data.prompts=builtin:arithmetic", "data.eval_prompts=",
        "reward.functions=[pefrl.tasks.arithmetic:exact_match]", "rollout.max_new_tokens=4", "lora.r=2",
        "train.lr=3e-3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, out: Path, ranks: int, *overrides: str, mode: str = "", timeout: int = 300):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DIST_MODE": mode}
    args = [str(driver), *BASE, f"output_dir={out}", *overrides]
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / "ddp_cpu_2ranks.yaml"),
               "--main_process_port", str(_free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _adapters(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.rglob("*.safetensors")):
        out |= {f"{f.relative_to(directory)}:{k}": v for k, v in load_file(str(f)).items()}
    return out


@pytest.mark.slow  # launches processes (20-60 s on 2 cores)
def test_two_ranks_run_two_processes_and_end_with_identical_adapters(tmp_path):
    res = _launch(tmp_path, tmp_path / "run", 2, "algo=ppo", "rollout.batch_size=4", "rl.minibatch_size=2",
                  "train.steps=2", "reward.on_error=skip", mode="rank1_skips")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 0 of 2" in res.stdout and "rank 1 of 2" in res.stdout  # not silently one process
    r0, r1 = _adapters(tmp_path / "run" / "rank0"), _adapters(tmp_path / "run" / "rank1")
    init = {k: v for k, v in r0.items() if "lora_B" in k}
    assert init and all(v.abs().max() > 0 for v in init.values())  # trained: LoRA B starts at zero
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # bit-identical on every rank
    # one step consumed 2 ranks x 4 prompts: the stream advanced by 8 per step
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    # reward stats are both ranks': rank 1's 4 samples failed (scored 0), rank 0's 4 scored 1
    assert [(r["reward_failures"], r["reward/probe"]) for r in records] == [(4, 0.5), (4, 0.5)]


@pytest.mark.slow  # launches processes (20-60 s on 2 cores)
def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path, monkeypatch):
    # prompt sharing off: it rounds differently with the per-rank batch (pefrl.forward.shared_prompts), and the
    # first step's gradients here are ~0 (equal rewards in a group), which AdamW turns into +-lr steps
    monkeypatch.setenv("PEFRL_SHARE_PROMPTS", "0")
    common = ["algo=rloo", "rollout.num_samples=2", "rl.epochs=1", "rl.whiten_advantages=false",
              "rl.loss_aggregation=sequence_mean", "rl.kl_coef=0.1", "train.steps=3"]
    two = _launch(tmp_path, tmp_path / "two", 2, *common, "rollout.batch_size=2", "rl.minibatch_size=4",
                  mode="global_rows")
    assert two.returncode == 0, two.stderr[-3000:]
    one = _launch(tmp_path, tmp_path / "one", 1, *common, "rollout.batch_size=4", "rl.minibatch_size=8",
                  mode="global_rows")
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _adapters(tmp_path / "two" / "rank0"), _adapters(tmp_path / "one" / "rank0")
    assert a.keys() == b.keys()
    moved = max((b[k]).abs().max().item() for k in b if "lora_B" in k)
    assert moved > 1e-3  # 3 AdamW steps of lr 3e-3 moved the adapters
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"2 ranks vs 1 rank after 3 steps: max |adapter diff| {diff:.3g}, max |lora_B| {moved:.3g}")
    # Tolerance: float32 reductions over b vs 2b rows differ in the last bits (~1e-7 relative); AdamW divides
    # by sqrt(v), which can magnify that for near-zero gradient entries. Measured: 3e-8 against a movement of
    # 6.6e-3 (one 2-core CPU run); allowed: 1e-5.
    assert diff < 1e-5, f"2 ranks vs 1 rank: max |diff| {diff:.3g}, adapters moved {moved:.3g}"
    rewards = lambda d: [json.loads(l)["reward_mean"] for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert rewards(tmp_path / "two") == pytest.approx(rewards(tmp_path / "one"), abs=1e-6)  # same samples


@pytest.mark.slow  # launches processes (20-60 s on 2 cores)
def test_two_rank_resume_restores_every_ranks_rng_and_matches_uninterrupted(tmp_path):
    common = ["algo=ppo", "rollout.batch_size=2", "rl.minibatch_size=2", "train.save_every=1"]
    full = _launch(tmp_path, tmp_path / "full", 2, *common, "train.steps=3")
    assert full.returncode == 0, full.stderr[-3000:]
    first = _launch(tmp_path, tmp_path / "split", 2, *common, "train.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert {p.name for p in (tmp_path / "split" / "checkpoint-2").glob("rng-rank*")} == {
        "rng-rank0.json", "rng-rank0.safetensors", "rng-rank1.json", "rng-rank1.safetensors"}
    second = _launch(tmp_path, tmp_path / "split", 2, *common, "train.steps=3", "train.resume=latest")
    assert second.returncode == 0, second.stderr[-3000:]
    for rank in ("rank0", "rank1"):
        a, b = _adapters(tmp_path / "full" / rank), _adapters(tmp_path / "split" / rank)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rank


@pytest.mark.slow  # launches processes (20-60 s on 2 cores)
def test_error_on_one_rank_stops_all_ranks_naming_it(tmp_path):
    t0 = time.time()
    res = _launch(tmp_path, tmp_path / "run", 2, "algo=ppo", "rollout.batch_size=2", "rl.minibatch_size=2",
                  "train.steps=4", "train.save_every=1", mode="fail", timeout=240)
    elapsed = time.time() - t0
    assert res.returncode != 0
    log = res.stdout + res.stderr
    assert "RankError: rank 1 failed at step 1: RewardError" in log  # the failing rank, with its cause
    assert "RankError: rank 1 failed at step 1 (its error is in its own log); stopping rank 0 too" in log
    assert "rank 1's reward server is down" in log and "failed on sample 0 (prompt '" in log
    assert elapsed < 200  # no hang until the 30-minute process-group timeout
    from pefrl.checkpoint import list_checkpoints

    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1"]  # the last one, intact


@pytest.mark.parametrize("name", sorted(p.name for p in ACCEL.glob("*.yaml")))
def test_accelerate_configs_load_with_accelerates_own_loader(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACCEL / name))
    raw = yaml.safe_load((ACCEL / name).read_text())
    assert cfg.distributed_type.name == raw["distributed_type"] and cfg.num_processes == raw["num_processes"]
    if name.startswith("fsdp"):
        assert cfg.fsdp_config["fsdp_version"] == 2
    if name.endswith("cpu_2ranks.yaml"):
        assert cfg.num_processes == 2 and not cfg.use_cpu  # --cpu would silently run one process


@pytest.mark.parametrize("kind", ["DEEPSPEED", "MEGATRON_LM"])
def test_deepspeed_launch_is_refused_not_run_unsharded(kind):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from pefrl.distributed import check_supported

    with pytest.raises(NotImplementedError, match=f"{kind} is not supported.*fsdp.yaml.*docs/distributed.md"):
        check_supported(SimpleNamespace(distributed_type=getattr(DistributedType, kind)))
    check_supported(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))  # DDP: fine
    check_supported(SimpleNamespace(distributed_type=DistributedType.FSDP))  # sharded by pefrl (tests/test_fsdp.py)
    check_supported(SimpleNamespace(distributed_type=DistributedType.NO))


def test_failed_ranks_reads_the_flags():
    from pefrl.distributed import failed_ranks

    assert failed_ranks(torch.tensor([0.0, 1.0, 0.0, 1.0])) == [1, 3]
    assert failed_ranks(torch.zeros(2)) == []


def test_deepspeed_launch_on_cpu_is_refused_too(monkeypatch):
    """On CPU accelerate reports MULTI_CPU under a DeepSpeed config; the launcher's variable gives it away."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from pefrl.distributed import check_supported

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(NotImplementedError, match="DEEPSPEED is not supported"):
        check_supported(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


ZERO_PROBE = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    import deepspeed
    from pefrl.config import LoraConfig, ModelConfig
    from pefrl.forward import policy_forward
    from pefrl.models import load_models
    from pefrl.tasks.arithmetic import DEFAULT_MODEL_DIR

    stage, out = int(sys.argv[1]), sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    models = load_models(ModelConfig(name_or_path=str(DEFAULT_MODEL_DIR), dtype="bfloat16"), LoraConfig(r=2),
                         uses_critic=False)
    params = models.trainable_parameters()
    conf = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}, "steps_per_print": 1000,
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    engine, _, _, _ = deepspeed.initialize(model=models.model, optimizer=torch.optim.AdamW(params, lr=1e-2),
                                           model_parameters=params, config=conf)
    w = models.model.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight
    log = [f"rank {rank} holds {w.numel()} of {getattr(w, 'ds_numel', w.numel())}"]  # one file per rank: no
    # interleaved lines
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])  # (2, 6)
    for step in range(2):
        logprobs, _, _ = policy_forward(models, ids, torch.ones_like(ids), 3, 1.0)
        loss = -logprobs.float().mean()
        engine.backward(loss)
        engine.step()
        log.append(f"rank {rank} step {step} loss {loss.item():.5f}")
    open(f"{out}/zero{stage}-rank{rank}.log", "w").write("\\n".join(log))
    torch.distributed.destroy_process_group()
""")


@pytest.mark.slow  # two launches of two ranks, ~45 s
def test_deepspeed_zero2_and_zero3_train_pefrl_models_on_two_gloo_ranks(tmp_path):
    """DeepSpeed itself (not pefrl's trainer, which refuses it) runs ZeRO-2/3 here: CPU accelerator, gloo, bf16,
    torch AdamW as the client optimizer (no compiled ops), LoRA on the tiny base, through its own initialize()."""
    pytest.importorskip("deepspeed")
    (tmp_path / "zero.py").write_text(ZERO_PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for stage, held in ((2, 65536), (3, 0)):  # ZeRO-3 partitions the base: rank-local storage is empty
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(tmp_path / "zero.py"), str(stage), str(tmp_path)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        lines = [l for r in (0, 1) for l in (tmp_path / f"zero{stage}-rank{r}.log").read_text().splitlines()]
        assert sorted(l for l in lines if " holds " in l) == [f"rank {r} holds {held} of 65536" for r in (0, 1)]
        losses = {r: [float(l.rsplit(" ", 1)[1]) for l in lines if l.startswith(f"rank {r} step")] for r in (0, 1)}
        assert losses[0] == losses[1] and len(losses[0]) == 2 and losses[0][1] < losses[0][0], (stage, losses)


DEEPSPEED_ZERO3 = textwrap.dedent("""
    compute_environment: LOCAL_MACHINE
    distributed_type: DEEPSPEED
    num_machines: 1
    num_processes: 2
    machine_rank: 0
    mixed_precision: bf16
    use_cpu: false
    rdzv_backend: static
    same_network: true
    deepspeed_config:
      zero_stage: 3
      gradient_accumulation_steps: 1
      gradient_clipping: 1.0
      offload_optimizer_device: none
      offload_param_device: none
      zero3_init_flag: true
""")


@pytest.mark.slow  # launches processes
def test_pefrl_train_under_a_deepspeed_config_stops_with_a_clear_error(tmp_path):
    pytest.importorskip("deepspeed")  # without it accelerate launch itself stops before pefrl runs
    config = tmp_path / "zero3_2ranks.yaml"  # pefrl ships no DeepSpeed config: a user's own
    config.write_text(DEEPSPEED_ZERO3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
           str(_free_port()), "-m", "pefrl", "train", str(REPO / "recipes" / "configs" / "arithmetic_ppo.yaml"),
           f"output_dir={tmp_path / 'run'}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert res.returncode != 0
    assert "DEEPSPEED is not supported by pefrl's trainer yet" in res.stderr

"""FSDP2 (pefrl/fsdp.py): the base sharded over ranks, LoRA adapters and value head replicated and trained.

The slow tests launch two gloo CPU ranks with recipes/accelerate/fsdp_cpu_2ranks.yaml through `accelerate launch`,
as a user would, and compare against DDP (recipes/accelerate/ddp_cpu_2ranks.yaml) with the same seed.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pefrl.config import LoraConfig, ModelConfig
from pefrl.arch import decoder_layers
from pefrl.config import ConfigError
from pefrl.fsdp import check_fsdp, fsdp_requested, sharded_numel, trim_eval_rows

REPO = Path(__file__).resolve().parents[1]
ACCEL = REPO / "recipes" / "accelerate"

# --- fast: the pieces -----------------------------------------------------------------------------------------


def test_fsdp_requested_reads_the_distributed_type_or_the_launchers_variable(monkeypatch):
    from accelerate.utils import DistributedType

    acc = lambda kind, n: SimpleNamespace(distributed_type=getattr(DistributedType, kind), num_processes=n)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert fsdp_requested(acc("FSDP", 8))  # CUDA: accelerate reports FSDP itself
    assert not fsdp_requested(acc("MULTI_CPU", 2))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # `accelerate launch` with an FSDP config, on CPU
    assert fsdp_requested(acc("MULTI_CPU", 2))
    assert not fsdp_requested(acc("NO", 1))  # one process: nothing to shard over


def test_check_fsdp_refuses_quantized_bases_environments_trpo_and_unimplemented_settings(monkeypatch):
    cfg = lambda quant=None, env=None, algo="ppo": SimpleNamespace(model=SimpleNamespace(quantization=quant),
                                                                   env=SimpleNamespace(name=env), algo=algo)
    from pefrl.algorithms import get_algorithm

    fsdp_ok = lambda c: get_algorithm(c.algo).update is None  # what the trainer passes: no own update loop
    check = lambda c: check_fsdp(c, fsdp_ok(c))
    for var in ("FSDP_OFFLOAD_PARAMS", "FSDP_ACTIVATION_CHECKPOINTING", "FSDP_CPU_RAM_EFFICIENT_LOADING"):
        monkeypatch.setenv(var, "false")  # what `accelerate launch` exports for fsdp_cpu_2ranks.yaml
    check(cfg())
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")  # honoured: sharded loading (test_fsdp_load.py)
    check(cfg())
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ValueError, match="fsdp_config.fsdp_offload_params: true is not implemented"):
        check(cfg())
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    with pytest.raises(ConfigError, match="model.quantization=4bit with FSDP.*ddp.yaml"):  # one line in the CLI
        check(cfg(quant="4bit"))
    with pytest.raises(ValueError, match="env.name=pkg:Env with FSDP.*different numbers of turns"):
        check(cfg(env="pkg:Env"))
    with pytest.raises(ValueError, match="algo=trpo with FSDP: its own update loop"):
        check(cfg(algo="trpo"))
    check(cfg(algo="grpo"))


def test_trim_eval_rows_gives_every_rank_the_same_count():
    assert trim_eval_rows(list(range(7)), 2) == list(range(6))  # rank 0 would get 4 rows, rank 1 three
    assert trim_eval_rows(list(range(6)), 3) == list(range(6))
    assert trim_eval_rows([1], 2) == []


@pytest.mark.parametrize("arch,layer", [("llama", "LlamaDecoderLayer"), ("gpt2", "GPT2Block")])
def test_decoder_layers_are_the_no_split_modules(arch, layer):
    from pefrl.tiny import build_model, build_tokenizer

    lm = build_model(arch, build_tokenizer())
    layers = decoder_layers(lm)
    assert [type(m).__name__ for m in layers] == [layer] * lm.config.num_hidden_layers
    with pytest.raises(NotImplementedError, match="names no decoder layer class"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_sharded_numel_of_a_plain_tensor_is_the_whole_tensor():
    assert sharded_numel(torch.zeros(3, 4)) == (12, 12)


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_shard_models_on_one_rank_keeps_outputs_and_replicates_adapters(one_rank_group):
    """World of 1: the shard is the whole tensor, so outputs must equal the unsharded model's exactly."""
    from torch.distributed.tensor import DTensor

    from pefrl.fsdp import adapter_parameters, shard_models
    from pefrl.forward import critic_values, policy_forward
    from pefrl.models import load_models
    from pefrl.tasks.arithmetic import DEFAULT_MODEL_DIR

    torch.manual_seed(0)
    mc = ModelConfig(name_or_path=str(DEFAULT_MODEL_DIR))
    models = load_models(mc, LoraConfig(r=2), uses_critic=True)
    for p in models.trainable_parameters():
        p.data.normal_(0, 0.05)  # LoRA B starts at zero: make the adapters matter
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])  # (1, 6)
    mask, P = torch.ones_like(ids), 3
    before = policy_forward(models, ids, mask, P, 1.0)[0], critic_values(models, ids, mask, P)
    shard_models(models, torch.device("cpu"))
    lm = models.model.get_base_model()
    base = [p for n, p in lm.named_parameters() if "layers." in n and "lora_" not in n]
    assert base and all(isinstance(p, DTensor) for p in base)  # decoder layers: managed by FSDP
    assert not any(isinstance(p, DTensor) for p in adapter_parameters(models))  # adapters and head: replicated
    assert not isinstance(lm.lm_head.weight, DTensor)  # root weights replicated (pefrl calls lm_head directly)
    logprobs, _, _ = policy_forward(models, ids, mask, P, 1.0)  # a direct trunk call first: the root is set
    assert torch.equal(logprobs, before[0]) and torch.equal(critic_values(models, ids, mask, P), before[1])
    lm(input_ids=ids)  # else: "FSDP requires running forward through the root module first"
    logprobs.sum().backward()  # gradients reach the replicated adapters through the sharded layers
    policy = [p for n, p in models.model.named_parameters() if "lora_" in n and ".policy." in n]
    assert policy and all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy)

    # rollout.engine=auto must never pick the lean decoder here: it raises naming the fix, or falls back
    from pefrl.config import RolloutConfig
    from pefrl.rollout import use_pefrl_engine

    assert not use_pefrl_engine(models, RolloutConfig(engine="transformers"))
    assert not use_pefrl_engine(models, RolloutConfig(engine="auto"))  # decode.unsupported_reason names the base
    with pytest.raises(ValueError, match="FSDP-sharded base"):
        use_pefrl_engine(models, RolloutConfig(engine="pefrl"))


# --- slow: two ranks through accelerate launch ----------------------------------------------------------------

DRIVER = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    import pefrl.trainer as T
    from pefrl.config_loader import load_config
    from pefrl.fsdp import sharded_numel
    from pefrl.adapters_io import save_adapters
    from transformers.generation.utils import GenerationMixin

    seen = {"synced": set(), "waited": 0}  # does generate keep a rank whose rows are done stepping with the others?
    unfinished = GenerationMixin._has_unfinished_sequences

    def spy(self, this_peer_finished, synced_gpus, device):
        more = unfinished(self, this_peer_finished, synced_gpus, device)
        seen["synced"].add(synced_gpus)
        seen["waited"] += bool(this_peer_finished and more)  # done here, stepping on for another rank
        return more

    GenerationMixin._has_unfinished_sequences = spy
    run = T.setup(load_config(None, sys.argv[1:]))
    acc, rank, out = run.accelerator, run.accelerator.process_index, run.cfg.output_dir
    print(f"rank {rank} of {acc.num_processes}", flush=True)
    acc.end_training = lambda: None  # keep the process group: the base is gathered after training below
    T.train(run.cfg, run=run)
    save_adapters(run.models, os.path.join(out, f"rank{rank}"))
    lm = run.models.model.get_base_model()
    w = lm.model.layers[0].mlp.down_proj.base_layer.weight
    print(f"rank {rank} holds {sharded_numel(w)[0]} of {sharded_numel(w)[1]} {type(w).__name__}", flush=True)
    print(f"rank {rank} synced_gpus {sorted(seen['synced'])} waited {seen['waited']} steps", flush=True)
    # the whole base (collective: every rank gathers; rank 0 writes)
    base = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in lm.named_parameters() if "lora_" not in n}
    if rank == 0:
        save_file(base, os.path.join(out, "base_gathered.safetensors"))
    if dist.is_initialized():
        dist.destroy_process_group()
""")

BASE = ["data.prompts=builtin:arithmetic", "data.eval_prompts=builtin:arithmetic-eval", "data.eval_size=4",
        "reward.functions=[pefrl.tasks.arithmetic:exact_match]", "rollout.max_new_tokens=6", "lora.r=2",
        "train.lr=3e-3", "algo=ppo", "model.critic=adapter", "rollout.batch_size=4", "rl.minibatch_size=2",
        "rl.grad_accum_steps=2", "train.save_every=1",
        "rollout.engine=transformers",  # the lean decoder (pefrl/decode.py) reads weights directly: not sharded
        "rollout.stop=['5']"]  # rows end at different steps, so a rank can finish generating before the other


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, out: Path, accel: str, *overrides: str) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / accel),
           "--main_process_port", str(_free_port()), str(driver), *BASE, f"output_dir={out}", *overrides]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.rglob("*.safetensors")):
        out |= {f"{f.relative_to(directory)}:{k}": v for k, v in load_file(str(f)).items()}
    return out


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # five two-rank launches, ~100 s on 2 cores
def test_fsdp_two_ranks_shard_the_base_train_adapters_resume_and_match_ddp(tmp_path):
    """PPO with a critic adapter, 3 steps, gradient accumulation 2, evaluation before and after."""
    from pefrl.adapters_io import load_adapters
    from pefrl.models import load_models
    from pefrl.tasks.arithmetic import DEFAULT_MODEL_DIR

    fsdp = _launch(tmp_path, tmp_path / "fsdp", "fsdp_cpu_2ranks.yaml", "train.steps=3")
    assert "rank 0 of 2" in fsdp.stdout and "rank 1 of 2" in fsdp.stdout
    # each rank holds half of a (128, 512) base weight (down_proj of layer 0)
    assert sorted(l for l in fsdp.stdout.splitlines() if " holds " in l) == [
        "rank 0 holds 32768 of 65536 DTensor", "rank 1 holds 32768 of 65536 DTensor"]
    assert _steps(tmp_path / "fsdp") == [0, 1, 2]
    synced = sorted(l for l in fsdp.stdout.splitlines() if " synced_gpus " in l)
    assert len(synced) == 2 and all("synced_gpus [True]" in l for l in synced)  # every generate call kept in step
    # and it mattered: some rank was done while the other still sampled, and stepped on instead of leaving the
    # all-gathers (this seed on CPU: 1 step on each rank; without synced_gpus the other rank would hang)
    assert sum(int(l.split("waited ")[1].split()[0]) for l in synced) > 0, synced

    # the base, gathered from its shards after training, is bit-identical to the checkpoint on disk
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(DEFAULT_MODEL_DIR), dtype=torch.float32).state_dict()
    gathered = load_file(str(tmp_path / "fsdp" / "base_gathered.safetensors"))
    names = {n.replace("base_model.model.", "").replace(".base_layer", ""): n for n in gathered}
    assert set(names) >= {n for n in original if "rotary" not in n}
    assert all(torch.equal(original[n], gathered[names[n]]) for n in original if n in names)

    # adapters trained, identical on both ranks; final/ loads into a fresh single-process model
    r0, r1 = _tensors(tmp_path / "fsdp" / "rank0"), _tensors(tmp_path / "fsdp" / "rank1")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert all(v.abs().max() > 0 for k, v in r0.items() if "lora_B" in k)  # LoRA B starts at zero
    torch.manual_seed(123)  # a different init: loading must overwrite every adapter and head weight
    fresh = load_models(ModelConfig(name_or_path=str(DEFAULT_MODEL_DIR), critic="adapter"), LoraConfig(r=2),
                        uses_critic=True)
    load_adapters(fresh, tmp_path / "fsdp" / "final")
    lora = {n: p for n, p in fresh.model.named_parameters() if "lora_" in n}
    for key, value in r0.items():
        if key.startswith("policy/") or key.startswith("critic/"):
            adapter, name = key.split("/", 1)[0], key.split(":", 1)[1]
            param = name.replace(".weight", f".{adapter}.weight")
            assert torch.equal(lora[param], value), key
    assert torch.equal(fresh.value_head.linear.weight, r0["value_head.safetensors:linear.weight"])

    # checkpoint + resume under FSDP: 2 steps, then resume to 3 = the uninterrupted 3-step run
    _launch(tmp_path, tmp_path / "split", "fsdp_cpu_2ranks.yaml", "train.steps=2")
    resumed = _launch(tmp_path, tmp_path / "split", "fsdp_cpu_2ranks.yaml", "train.steps=3", "train.resume=latest")
    assert "at step 2" in resumed.stdout and _steps(tmp_path / "split") == [0, 1, 2]
    split = _tensors(tmp_path / "split" / "rank0")
    resume_diff = max((split[k] - r0[k]).abs().max().item() for k in r0)

    # DDP with the same seed: the same algorithm, the base replicated instead of sharded
    _launch(tmp_path, tmp_path / "ddp", "ddp_cpu_2ranks.yaml", "train.steps=3")
    ddp = _tensors(tmp_path / "ddp" / "rank0")
    moved = max(v.abs().max().item() for k, v in ddp.items() if "lora_B" in k)
    diff = max((ddp[k] - r0[k]).abs().max().item() for k in r0)
    print(f"FSDP vs DDP after 3 steps: max |adapter diff| {diff:.3g} (lora_B moved {moved:.3g}); "
          f"FSDP resumed vs uninterrupted: {resume_diff:.3g}")
    assert moved > 1e-3
    # Tolerance: the sharded forward runs the same matmuls on the same all-gathered weights, and the adapter
    # gradients take the same all-reduce as under DDP; only float summation order could differ (a kernel chosen
    # for another memory layout). Measured on this 2-core CPU: 0 (bit-identical); allowed: 1e-6.
    assert diff < 1e-6, f"FSDP vs DDP: max |diff| {diff:.3g}"
    assert resume_diff == 0.0, f"FSDP resume vs uninterrupted: max |diff| {resume_diff:.3g}"  # as under DDP

    # checkpoints carry over: DDP's checkpoint-2 resumed under FSDP ends where the FSDP run ended
    _launch(tmp_path, tmp_path / "ddp_to_fsdp", "fsdp_cpu_2ranks.yaml", "train.steps=3",
            f"train.resume={tmp_path / 'ddp' / 'checkpoint-2'}")
    carried = _tensors(tmp_path / "ddp_to_fsdp" / "rank0")
    assert all(torch.equal(carried[k], r0[k]) for k in r0)

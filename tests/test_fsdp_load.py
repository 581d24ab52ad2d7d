"""Sharded loading under FSDP (pefrl/fsdp_load.py): the base built without weights, each rank filling its shard.

One rank in-process (a gloo group of one: the shard is the whole tensor) checks that the result is the plain
load exactly, for a one-file and an index-sharded checkpoint, a Llama and GPT-2 (tied embeddings, Conv1D
projections, 'transformer.' prefix). Two ranks (DRIVER under torch.distributed.run) check
the real split: logits equal the single-process model's, each rank holding only its rows, adapters equal on both
ranks, and a training step.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from pefrl.config import LoraConfig, ModelConfig
from pefrl.fsdp import shard_models
from pefrl.fsdp_load import CLAIMED, VARIABLE, checkpoint_tensors, claim_sharded_loading
from pefrl.models import load_models
from pefrl.models.load import is_stand_in
from pefrl.tiny import save_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _state(models) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the bundle, DTensors gathered (a world of one: the local tensor)."""
    out = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
           for n, p in models.model.named_parameters(remove_duplicate=False)}
    out |= {n: b.clone() for n, b in models.model.named_buffers()}
    return out | {f"value_head.{n}": p.detach().clone() for n, p in models.value_head.named_parameters()}


@pytest.mark.parametrize("arch,shards", [("llama", False), ("llama", True), ("gpt2", False)])
def test_sharded_loading_on_one_rank_is_the_plain_load(one_rank_group, tmp_path, arch, shards):
    save_tiny_model(tmp_path, arch)
    if shards:  # re-save as an index-sharded checkpoint: model-0000k-of-0000n.safetensors + index.json
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(tmp_path).save_pretrained(tmp_path, max_shard_size="20KB")
        (tmp_path / "model.safetensors").unlink()
        assert len(set(checkpoint_tensors(str(tmp_path)).values())) > 2
    mc, lc = ModelConfig(name_or_path=str(tmp_path), critic="adapter"), LoraConfig(r=2)
    torch.manual_seed(0)
    plain = load_models(mc, lc, uses_critic=True)
    torch.manual_seed(0)  # the same seed: the same adapters and value head (peft draws as over a loaded base)
    empty = load_models(mc, lc, uses_critic=True, weights=False)
    lm = empty.model.get_base_model()
    assert any(is_stand_in(p) for p in lm.parameters()) and not any(p.is_meta for p in lm.parameters())
    shard_models(empty, torch.device("cpu"), checkpoint=str(tmp_path))
    got, want = _state(empty), _state(plain)
    assert got.keys() == want.keys()
    for name in want:  # base weights, buffers (rotary inv_freq: computed), adapters, value head: all bit-identical
        assert torch.equal(got[name], want[name]), name
    if arch == "gpt2":  # tied: still one tensor under two names
        assert lm.lm_head.weight is lm.transformer.wte.weight
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])  # (1, 6)
    assert torch.equal(lm(input_ids=ids).logits, plain.model.get_base_model()(input_ids=ids).logits)


def test_a_reference_adapter_loads_onto_the_base_without_weights(one_rank_group, tmp_path):
    """model.reference_adapter (a LoRA-SFT start): peft loads it into the adapters before any base weight exists."""
    from pefrl.adapters_io import save_adapters

    save_tiny_model(tmp_path / "model", "llama")
    sft = load_models(ModelConfig(name_or_path=str(tmp_path / "model")), LoraConfig(r=2), uses_critic=False)
    for n, p in sft.model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)  # else B = 0 would pass whether loaded or not
    save_adapters(sft, tmp_path / "sft")
    mc = ModelConfig(name_or_path=str(tmp_path / "model"), critic="adapter",
                     reference_adapter=str(tmp_path / "sft" / "policy"))
    torch.manual_seed(0)
    plain = load_models(mc, LoraConfig(r=2), uses_critic=True)
    torch.manual_seed(0)
    empty = load_models(mc, LoraConfig(r=2), uses_critic=True, weights=False)
    shard_models(empty, torch.device("cpu"), checkpoint=str(tmp_path / "model"))
    got, want = _state(empty), _state(plain)
    assert got.keys() == want.keys() and any(".reference." in n for n in want)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_a_missing_tensor_is_named_not_left_a_stand_in(one_rank_group, tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny_model(tmp_path, "llama")
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    models = load_models(ModelConfig(name_or_path=str(tmp_path)), LoraConfig(r=2), uses_critic=False,
                         weights=False)
    with pytest.raises(KeyError, match="model.norm.weight is not in the checkpoint.*cpu_ram_efficient_loading"):
        shard_models(models, torch.device("cpu"), checkpoint=str(tmp_path))


def test_pefrl_claims_the_launchers_setting_and_transformers_no_longer_sees_it(one_rank_group, monkeypatch):
    from transformers.distributed.fsdp import is_fsdp_enabled

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for launched, expected in ((None, True), ("false", False), ("True", True)):  # None: accelerate's default, true
        monkeypatch.delenv(CLAIMED, raising=False)
        if launched is None:
            monkeypatch.delenv(VARIABLE, raising=False)
        else:
            monkeypatch.setenv(VARIABLE, launched)
        assert claim_sharded_loading() is expected
        # else from_pretrained would load a reward model empty on ranks > 0, for a broadcast that never comes
        assert not is_fsdp_enabled()
        assert claim_sharded_loading() is expected  # a second setup in the same process reads the same


DRIVER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    torch.set_num_threads(1)
    from pefrl.config import LoraConfig, ModelConfig
    from pefrl.fsdp import shard_models
    from pefrl.forward import policy_forward
    from pefrl.models import load_models
    from tests.tolerances import assert_fp32_close

    dist.init_process_group("gloo")
    rank, model_dir = dist.get_rank(), sys.argv[1]
    mc, lc = ModelConfig(name_or_path=model_dir, critic="adapter"), LoraConfig(r=2)
    torch.manual_seed(0)
    plain = load_models(mc, lc, uses_critic=True)  # the whole base, one process's view
    torch.manual_seed(0)
    models = load_models(mc, lc, uses_critic=True, weights=False)
    shard_models(models, torch.device("cpu"), checkpoint=model_dir)
    want = dict(plain.model.named_parameters())
    split = {}
    for name, p in models.model.named_parameters():
        if isinstance(p, DTensor):  # this rank's rows of the checkpoint, no more: ceil(n / 2) on rank 0
            local, per = p.to_local(), -(-p.shape[0] // 2)
            assert torch.equal(local, want[name][rank * per : rank * per + local.shape[0]]), name
            split[name] = (local.shape[0], p.shape[0])
        else:  # adapters (the plain load's: same seed), embeddings, final norm, lm_head: whole
            assert torch.equal(p, want[name]), name
    assert split and all(rows < n for rows, n in split.values()), split
    uneven = [name for name, (rows, n) in split.items() if n % 2]
    assert uneven and all(split[u][0] == (split[u][1] // 2 + 1 if rank == 0 else split[u][1] // 2) for u in uneven)

    def adapters(m):
        return [p for p in m.trainable_parameters()]

    torch.manual_seed(1)  # LoRA B starts at zero: make the adapters matter, identically in both bundles
    for p, q in zip(adapters(plain), adapters(models), strict=True):
        q.data.copy_(p.data.normal_(0, 0.05))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])  # (2, 6)
    mask, P = torch.ones_like(ids), 3
    lm, plain_lm = models.model.get_base_model(), plain.model.get_base_model()
    logits, plain_logits = lm(input_ids=ids).logits, plain_lm(input_ids=ids).logits  # (2, 6, V)
    assert_fp32_close(logits, plain_logits, k=4 * plain_lm.config.hidden_size)  # same sums, other blocking
    # one training step: the same loss on both ranks, gradients averaged as the trainer's Updater does
    steps = []
    for m in (plain, models):
        opt = torch.optim.AdamW(adapters(m), lr=1e-2)
        logprobs, _, _ = policy_forward(m, ids, mask, P, 1.0)
        logprobs.mean().backward()
        if m is models:
            for p in (p for p in adapters(m) if p.grad is not None):  # the policy's (critic, head: no loss)
                dist.all_reduce(p.grad)
                p.grad /= 2
        opt.step()
        steps.append([p.detach().clone() for p in adapters(m)])
    for a, b in zip(*steps, strict=True):
        assert_fp32_close(b, a, k=4 * plain_lm.config.hidden_size)
    flat = torch.cat([p.flatten() for p in steps[1]])
    both = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    assert torch.equal(both[0], both[1])  # adapters replicated: equal on both ranks after the step
    print(f"rank {rank} ok: {len(split)} sharded weights, e.g. {next(iter(split.items()))}", flush=True)
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # launches two processes (~30 s on 2 cores)
def test_two_ranks_load_their_shards_match_one_process_and_train(tmp_path):
    # GPT-2 with hidden 15: tied embeddings, Conv1D weights stored (in, out), and odd row counts (ln_1, c_attn: 15
    # rows -> 8 on rank 0, 7 on rank 1)
    model = save_tiny_model(tmp_path / "model", "gpt2", hidden_size=15, num_heads=3)
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(tmp_path / "driver.py"), model]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    for rank in (0, 1):
        assert f"rank {rank} ok" in res.stdout, res.stdout

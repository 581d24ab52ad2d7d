"""Quantized bases (bitsandbytes 4-bit / 8-bit, QLoRA style) on tiny models, on CPU.

The frozen-base contract of test_models holds byte for byte on the quantized storage: the packed 4-bit codes and
their quantization constants (absmax, nested absmax, code) or the int8 codes and per-row scales (SCB) are the
same after an optimizer step; only LoRA adapters and the value head move.
"""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from pefrl.config import LoraConfig, ModelConfig
from pefrl.config_loader import load_config
from pefrl.forward import critic_values, policy_forward, reference_logprobs
from pefrl.models import is_quantized, load_models, quantization_config
from pefrl.ops.logprobs import selective_logprobs
from pefrl.tiny import save_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # hidden 64: bitsandbytes' 4-bit blocks are 64 values, so every weight spans whole blocks
    return save_tiny_model(tmp_path_factory.mktemp("llama"), hidden_size=64, num_layers=2)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 10), generator=g)  # (B, P + T), P = 6
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # second row left-padded
    return ids, mask, 6


def _base_storage(model) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor the base is made of, including bitsandbytes' quantization constants."""
    out = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        out[name] = p.detach().clone()
        state = getattr(p, "quant_state", None)  # 4-bit: absmax (+ nested absmax and code when double-quantized)
        if state is not None:
            out |= {f"{name}:{k}": v.clone() for k, v in state.as_dict(packed=True).items() if torch.is_tensor(v)}
        owner = modules[name.rsplit(".", 1)[0]]
        scb = getattr(p, "SCB", None)
        scb = scb if scb is not None else getattr(getattr(owner, "state", None), "SCB", None)  # 8-bit row scales
        if scb is not None:
            out[f"{name}:SCB"] = scb.clone()
    return out


def test_quantization_config_follows_the_model_config():
    assert quantization_config(ModelConfig()) is None
    q4 = quantization_config(ModelConfig(quantization="4bit", bnb_4bit_quant_type="fp4",
                                         bnb_4bit_use_double_quant=False, dtype="bfloat16"))
    assert q4.load_in_4bit and not q4.load_in_8bit
    assert (q4.bnb_4bit_quant_type, q4.bnb_4bit_use_double_quant, q4.bnb_4bit_compute_dtype) == (
        "fp4", False, torch.bfloat16)
    q8 = quantization_config(ModelConfig(quantization="8bit"))
    assert q8.load_in_8bit and not q8.load_in_4bit


@pytest.mark.parametrize("quant,qtype", [("4bit", "nf4"), ("4bit", "fp4"), ("8bit", "nf4")])
def test_quantized_base_stays_byte_identical_and_adapters_train(tiny_dir, quant, qtype):
    cfg = ModelConfig(name_or_path=tiny_dir, quantization=quant, bnb_4bit_quant_type=qtype)
    models = load_models(cfg, LoraConfig(r=4), uses_critic=True)
    assert is_quantized(models.model)
    storage_kind = {"4bit": "Params4bit", "8bit": "Int8Params"}[quant]
    assert any(type(p).__name__ == storage_kind for p in models.model.parameters())
    assert not models.model.get_base_model().is_activation_checkpointing  # model.gradient_checkpointing is off
    ids, mask, P = _batch()

    # the reference is the quantized base itself: a separately loaded copy gives the same logprobs
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=quantization_config(cfg),
                                                 device_map={"": "cpu"}).eval()
    for module in plain.modules():  # same kernel as load_models: on CPUs with AVX512-BF16, bitsandbytes would
        if hasattr(module, "support_avx512bf16_for_cpu"):  # otherwise repack and compute in bf16 (1e-3 apart)
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = plain(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1 : -1]  # (B, T, V)
    ref = reference_logprobs(models, ids, mask, P, 1.0)
    torch.testing.assert_close(ref, selective_logprobs(logits, ids[:, P:]), atol=1e-5, rtol=0)
    # LoRA B starts at zero: the policy starts as the reference
    torch.testing.assert_close(policy_forward(models, ids, mask, P, 1.0)[0], ref, atol=1e-5, rtol=0)

    before = _base_storage(models.model)
    params = models.trainable_parameters()
    lora_b = [p for n, p in models.model.named_parameters() if "lora_B" in n]
    opt = torch.optim.AdamW(params, lr=1e-2)
    logprobs, _, _ = policy_forward(models, ids, mask, P, 1.0)
    values = critic_values(models, ids, mask, P)
    (logprobs.sum() + values.sum()).backward()
    opt.step()

    after = _base_storage(models.model)
    assert before.keys() == after.keys() and len(before) > 20
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"frozen quantized base changed: {changed[:5]}"
    assert all(p.abs().sum() > 0 for p in lora_b)  # every adapter (policy and critic) moved off zero
    assert torch.equal(reference_logprobs(models, ids, mask, P, 1.0), ref)
    assert (policy_forward(models, ids, mask, P, 1.0)[0] - ref).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_compute_with_gradient_checkpointing_matches_without(tiny_dir, dtype):
    """model.gradient_checkpointing switches on our (adapter-aware) checkpointing, not peft's; grads agree."""
    ids, mask, P = _batch()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(name_or_path=tiny_dir, quantization="4bit", dtype=dtype, gradient_checkpointing=ckpt)
        models = load_models(cfg, LoraConfig(r=4), uses_critic=True)
        assert models.model.get_base_model().is_activation_checkpointing == ckpt
        lin = models.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        assert lin.compute_dtype == getattr(torch, dtype)
        with torch.no_grad():  # nonzero B so that lora_A gets gradient too
            for n, p in models.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1)
        logprobs, _, _ = policy_forward(models, ids, mask, P, 1.0)
        values = critic_values(models, ids, mask, P)
        (logprobs.sum() + values.sum()).backward()
        grads.append([p.grad.clone() for p in models.trainable_parameters()])
    for g0, g1 in zip(*grads):
        assert torch.isfinite(g0).all()
        torch.testing.assert_close(g1, g0)


def test_int8_cast_warning_is_logged_once(tiny_dir, caplog):
    models = load_models(ModelConfig(name_or_path=tiny_dir, quantization="8bit"), LoraConfig(r=4), uses_critic=False)
    ids, mask, P = _batch()
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        for _ in range(2):
            policy_forward(models, ids, mask, P, 1.0)
    casts = [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert len(casts) <= 1  # one per process at most, not one per matmul (14 matmuls per forward here)


def test_ppo_run_on_a_4bit_base_finishes(tiny_dir, tmp_path):
    from pefrl.trainer import train

    cfg = load_config(None, [
        f"model.name_or_path={tiny_dir}", "model.quantization=4bit", "model.logits_chunk_size=8",
        "algo=ppo", "data.prompts=builtin:arithmetic", "data.eval_prompts=",
        "reward.functions=[pefrl.tasks.arithmetic:exact_match]", "rollout.batch_size=4", "rollout.max_new_tokens=3",
        "rl.minibatch_size=2", "rl.epochs=1", "lora.r=2", "train.steps=2", f"output_dir={tmp_path}",
    ])
    summary = train(cfg)
    assert summary["steps"] == 2
    assert (tmp_path / "final" / "policy" / "adapter_model.safetensors").is_file()

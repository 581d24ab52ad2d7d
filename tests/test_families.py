"""Every family transformers has among pefrl's list, as a tiny model built from config: LoRA adapts every linear
layer of its decoder blocks (written out per family below, from the architecture), PPO trains only the adapters,
and the merged export reproduces the policy with plain transformers.

The expected names are the architecture's own attention and MLP projections: a default that missed one (Phi-3's
fused qkv_proj / gate_up_proj, Phi's dense / fc1 / fc2) fails here.
"""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from pefrl import export as ex
from pefrl.arch import all_linear_targets, decoder_layers, default_target_modules, is_linear
from pefrl.cli import main
from pefrl.config import LoraConfig, ModelConfig
from pefrl.config_loader import load_config
from pefrl.models import POLICY, load_base, load_models
from pefrl.startline import adapted_modules
from pefrl.tiny import MODEL_TYPES
from test_models import save_tiny_models
from pefrl.trainer import setup, train

torch.set_num_threads(1)

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPECTED = {
    "llama": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "mistral": LLAMA,
    "gemma": LLAMA,
    "gemma2": LLAMA,
    "olmo2": LLAMA,
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],  # attention out is `dense`, MLP fc1 -> fc2
    "phi3": ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"],  # fused q/k/v and gate/up
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D: fused q/k/v, attention out (and MLP out: also c_proj), MLP in
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
"""Attention and MLP projections of each family, in the order its decoder layer holds them."""
PROMPTS = ["1+2=", "33+44=", "the quick brown fox"]


def test_the_list_covers_every_family_tiny_builds():
    assert sorted(EXPECTED) == sorted(MODEL_TYPES)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return save_tiny_models(tmp_path_factory, MODEL_TYPES)


def _lora_modules(model) -> set[str]:
    return {name for name, m in model.named_modules() if POLICY in getattr(m, "lora_A", {})}


@pytest.mark.parametrize("arch", MODEL_TYPES)
def test_lora_adapts_every_linear_layer_of_the_decoder_blocks(model_dirs, arch):
    plain = AutoModelForCausalLM.from_pretrained(model_dirs[arch])
    assert default_target_modules(plain) == EXPECTED[arch]
    in_blocks = {id(m) for layer in decoder_layers(plain) for m in layer.modules()}
    linears = {name for name, m in plain.named_modules() if is_linear(m) and id(m) in in_blocks}
    models = load_models(ModelConfig(name_or_path=str(model_dirs[arch])), LoraConfig(r=2), uses_critic=False)
    adapted = {n.removeprefix("base_model.model.") for n in _lora_modules(models.model)}
    assert adapted == linears  # all of them, in both layers (GPT-2's c_proj twice per layer: attention and MLP)
    assert not any("lm_head" in n or "embed" in n for n in adapted)
    assert adapted_modules(models.model) == f"{len(adapted)} modules = 2 layers x ({', '.join(EXPECTED[arch])})"


@pytest.mark.parametrize("arch", MODEL_TYPES)
def test_the_output_head_gets_a_contiguous_input_in_generate(model_dirs, arch):
    # generate's prefill keeps the last position (hidden[:, -1:, :], strided); on CPU a strided 3-D bf16 input
    # made F.linear copy the head once per row (19 s and +1.6 GiB per prefill for a 1B base): load_base hooks the
    # head so it is always handed a contiguous input, and the logits are those of the contiguous rows
    base = load_base(ModelConfig(name_or_path=str(model_dirs[arch]), dtype="bfloat16"))
    head, seen = base.get_output_embeddings(), []
    head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))  # after load_base's
    head.register_forward_hook(lambda m, args, out: seen.append(torch.equal(out, F.linear(args[0], m.weight, m.bias))))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert seen and all(seen)


def test_same_named_linears_outside_the_blocks_are_excluded(model_dirs):
    from peft import get_peft_model

    from pefrl.models.load import _lora_config

    lm = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    lm.model.vision = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(32, 32), "proj": torch.nn.Linear(32, 32)})
    assert all_linear_targets(lm) == (LLAMA, ["model.vision.q_proj"])  # 'proj' is no target: nothing to exclude
    peft_model = get_peft_model(lm, _lora_config(lm, LoraConfig(r=2)), adapter_name=POLICY)
    adapted = _lora_modules(peft_model)
    assert len(adapted) == 14 and not any("vision" in n for n in adapted)


def test_a_model_naming_no_layer_class_gets_every_linear_but_the_head(model_dirs):
    lm = AutoModelForCausalLM.from_pretrained(model_dirs["phi"])
    lm._no_split_modules = None  # as some remote-code models ship
    with pytest.warns(UserWarning, match="names no decoder layer class"):
        targets, excluded = all_linear_targets(lm)
    assert targets == EXPECTED["phi"] and excluded == []  # lm_head left out


def test_target_order_changes_nothing(model_dirs):
    """peft keeps target_modules as a set and wraps modules in model order: a reordered list gives the same
    adapters, bit for bit (so the old hand-kept order and the model-read one train alike)."""
    weights = []
    for targets in (LLAMA, LLAMA[::-1]):
        torch.manual_seed(0)
        models = load_models(ModelConfig(name_or_path=str(model_dirs["llama"])), LoraConfig(r=2,
                             target_modules=targets), uses_critic=False)
        weights.append({n: p.detach().clone() for n, p in models.model.named_parameters() if "lora_A" in n})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_a_4bit_base_adapts_its_linear4bit_layers(model_dirs):
    pytest.importorskip("bitsandbytes")
    cfg = ModelConfig(name_or_path=str(model_dirs["phi3"]), quantization="4bit")
    base = load_base(cfg)
    kinds = {type(m).__name__ for layer in decoder_layers(base) for m in layer.modules() if is_linear(m)}
    assert kinds == {"Linear4bit"}
    assert default_target_modules(base) == EXPECTED["phi3"]
    models = load_models(cfg, LoraConfig(r=2), uses_critic=False)
    assert {n.rsplit(".", 1)[-1] for n in _lora_modules(models.model)} == set(EXPECTED["phi3"])
    assert all(type(m.base_layer).__name__ == "Linear4bit" for m in models.model.modules()
               if POLICY in getattr(m, "lora_A", {}))


@torch.no_grad()
def _logits(model, tok) -> list[torch.Tensor]:
    return [model(input_ids=tok(p, return_tensors="pt").input_ids).logits.float() for p in PROMPTS]  # (1, L, V)


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("arch", MODEL_TYPES)  # tiny: 2 steps of 4 rollouts, hidden 32
def test_ppo_trains_only_the_adapters_and_the_merged_export_reproduces_them(model_dirs, tmp_path, arch, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "merged"
    cfg = load_config(None, [
        "algo=ppo", f"model.name_or_path={model_dirs[arch]}", f"output_dir={run_dir}", "data.eval_prompts=",
        "reward.functions=[pefrl.tasks.arithmetic:exact_match]", "train.steps=2", "rollout.batch_size=4",
        "rollout.max_new_tokens=4", "rl.minibatch_size=4", "lora.r=4", "train.lr=0.02", "model.critic=adapter"])
    run = setup(cfg)
    model = run.models.model
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    train(cfg, run=run)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)
    changed = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters()
               if n in lora_before and f".{POLICY}." in n and not torch.equal(p, lora_before[n])}
    assert changed == set(EXPECTED[arch])  # every kind of projection learned something
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["kl"]) < 1e-5  # adapters start at B = 0: sampler, policy and reference passes agree
    names = re.escape(", ".join(EXPECTED[arch]))
    assert re.search(rf"lora r=4 on \d+ modules = 2 layers x \({names}\) \+ critic", capsys.readouterr().out)

    assert main(["export", str(run_dir), "--out", str(out), "--merge"]) == 0  # verifies logits itself
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert report["merged"] and report["max_abs_diff"] < 1e-4 < report["adapter_effect"]
    tok = AutoTokenizer.from_pretrained(out)
    merged = _logits(AutoModelForCausalLM.from_pretrained(out).eval(), tok)  # plain transformers, no peft
    policy = ex.trained_policy(cfg, run_dir / "final")
    with policy.disable_adapter():
        base = _logits(policy, tok)
    diff = _max_diff(merged, _logits(policy, tok))
    print(f"{arch}: export max |logit diff| {diff:.2e}, adapter effect {_max_diff(base, merged):.2e}")
    assert diff < 1e-4 < _max_diff(base, merged)


import pytest
import torch
from transformers import AutoModelForCausalLM

from pefrl.config import LoraConfig, ModelConfig
from pefrl.adapters_io import load_adapters, save_adapters
from pefrl.arch import default_target_modules
from pefrl.forward import critic_values, policy_forward, reference_logprobs
from pefrl.models import CRITIC, POLICY, load_models, load_tokenizer, resolve_model_path, use_adapter
from pefrl.ops.logprobs import selective_logprobs
from pefrl.tiny import ARCHS, build_model, build_tokenizer
from tests.tolerances import assert_fp32_close

torch.set_num_threads(1)


def save_tiny_models(tmp_path_factory, archs) -> dict[str, str]:
    """{arch: directory} of tiny models (hidden 32, 2 layers) sharing one BPE tokenizer, saved under tmp dirs."""
    tok = build_tokenizer()
    dirs = {}
    for arch in archs:
        d = tmp_path_factory.mktemp(arch)
        build_model(arch, tok, hidden_size=32, num_layers=2).save_pretrained(d)
        tok.save_pretrained(d)
        dirs[arch] = str(d)
    return dirs


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return save_tiny_models(tmp_path_factory, ARCHS)


def _batch(model_dir):
    """Two left-padded prompts of different lengths followed by 3 response tokens (the second one padded)."""
    tok = load_tokenizer(ModelConfig(name_or_path=model_dir))
    enc = tok(["1+2=", "33+44+5="], return_tensors="pt", padding=True)
    assert enc.attention_mask[0, 0] == 0  # really left-padded
    resp = torch.tensor([[10, 11, 12], [13, 14, tok.pad_token_id]])
    resp_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ids = torch.cat([enc.input_ids, resp], 1)  # (2, P + 3)
    mask = torch.cat([enc.attention_mask, resp_mask], 1)
    return ids, mask, enc.input_ids.shape[1]


def _plain_base_logprobs(model_dir, ids, mask, P):
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1 : -1]  # (B, T, V)
    return selective_logprobs(logits, ids[:, P:])


def _load(model_dir, critic="adapter", uses_critic=True, **lora):
    return load_models(ModelConfig(name_or_path=model_dir, critic=critic), LoraConfig(r=4, **lora), uses_critic)


@pytest.mark.parametrize("arch", ARCHS)
def test_only_adapters_and_head_train_and_base_stays_bit_identical(model_dirs, arch):
    models = _load(model_dirs[arch])
    trainable = {id(p) for p in models.trainable_parameters()}
    grad_names = [n for n, p in models.model.named_parameters() if p.requires_grad]
    assert grad_names and all("lora_" in n and (".policy." in n or ".critic." in n) for n in grad_names)
    assert {id(p) for p in models.model.parameters() if p.requires_grad} | {
        id(p) for p in models.value_head.parameters()
    } == trainable
    base_before = {n: p.detach().clone() for n, p in models.model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in models.model.named_parameters() if "lora_B" in n}
    head_before = models.value_head.linear.weight.detach().clone()

    ids, mask, P = _batch(model_dirs[arch])
    ref_before = reference_logprobs(models, ids, mask, P, 1.0)
    assert torch.equal(ref_before, _plain_base_logprobs(model_dirs[arch], ids, mask, P))
    # LoRA B starts at zero: the policy starts as the base
    assert torch.allclose(policy_forward(models, ids, mask, P, 1.0)[0], ref_before, atol=1e-6)

    opt = torch.optim.AdamW(models.trainable_parameters(), lr=1e-2)
    logprobs, entropy, _ = policy_forward(models, ids, mask, P, 1.0)
    values = critic_values(models, ids, mask, P)
    (-(logprobs.mean()) + (values - 1).pow(2).mean() - 0.01 * entropy.mean()).backward()
    opt.step()

    for n, p in models.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    changed = {n for n, p in models.model.named_parameters() if "lora_B" in n and not torch.equal(p, lora_before[n])}
    assert any(".policy." in n for n in changed) and any(".critic." in n for n in changed)
    assert not torch.equal(models.value_head.linear.weight, head_before)
    # after the step the policy moved, the reference is still exactly the base
    assert not torch.allclose(policy_forward(models, ids, mask, P, 1.0)[0], ref_before, atol=1e-4)
    assert torch.equal(reference_logprobs(models, ids, mask, P, 1.0), ref_before)


def test_use_adapter_keeps_flags_and_restores_on_exception(model_dirs):
    models = _load(model_dirs["llama"])
    flags = {n: p.requires_grad for n, p in models.model.named_parameters()}
    for name in (CRITIC, None):
        with pytest.raises(RuntimeError, match="boom"):
            with use_adapter(models, name):
                assert {n: p.requires_grad for n, p in models.model.named_parameters()} == flags
                raise RuntimeError("boom")
        assert models.model.active_adapter == POLICY
        assert {n: p.requires_grad for n, p in models.model.named_parameters()} == flags
        assert models.model.get_model_status().enabled is True  # adapters re-enabled after use_adapter(None)
    with pytest.raises(KeyError, match="nope"):
        with use_adapter(models, "nope"):
            pass
    assert models.model.active_adapter == POLICY


def test_policy_forward_chunked_matches_dense_and_shared_values(model_dirs):
    models = _load(model_dirs["qwen2"], critic="shared")
    assert models.critic == "shared" and CRITIC not in models.model.peft_config
    ids, mask, P = _batch(model_dirs["qwen2"])
    gen = torch.Generator().manual_seed(0)  # not the global RNG: what ran before must not change the draw
    with torch.no_grad():  # move the policy away from the base so the check is not trivial
        for n, p in models.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    lp, ent, v = policy_forward(models, ids, mask, P, 0.7, with_values=True)
    lp_c, ent_c, v_c = policy_forward(models, ids, mask, P, 0.7, with_values=True, chunk_size=2)
    # chunking only reorders the vocabulary softmax's sums (V ~ 100) after the trunk's (hidden 32, MLP ~64);
    # the gradients add the batch's tokens (2 x ~10): K as below (see tests/tolerances.py)
    assert_fp32_close(lp_c, lp, k=32 * 64 * 128)
    assert_fp32_close(ent_c, ent, k=32 * 64 * 128)
    assert_fp32_close(critic_values(models, ids, mask, P), v, k=32 * 64)
    params = models.trainable_parameters()
    g = torch.autograd.grad((lp * ent).sum() + v.sum(), params)
    g_c = torch.autograd.grad((lp_c * ent_c).sum() + v_c.sum(), params)
    for a, b in zip(g_c, g):
        assert_fp32_close(a, b, k=32 * 64 * 128 * 20)
    with pytest.raises(ValueError, match="critic_values"):
        policy_forward(_load(model_dirs["qwen2"]), ids, mask, P, 1.0, with_values=True)


def test_default_and_wrong_target_modules(model_dirs):
    llama = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    assert default_target_modules(llama) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]
    gpt2 = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"])
    assert default_target_modules(gpt2) == ["c_attn", "c_proj", "c_fc"]
    with pytest.raises(ValueError, match=r"\['qproj'\].*'q_proj'"):
        _load(model_dirs["llama"], target_modules=["qproj", "v_proj"])
    models = _load(model_dirs["llama"], uses_critic=False, target_modules=["v_proj"])
    assert models.critic == "none" and models.value_head is None
    assert {n.split(".")[-4] for n, _ in models.model.named_parameters() if "lora_A" in n} == {"v_proj"}


def test_a_family_without_a_file_gets_the_generic_facts():
    from pefrl import arch

    assert arch.family("qwen2").lean_projections == arch.family("llama").lean_projections != ()
    assert arch.family("gpt2") is arch.family("falcon") is arch.GENERIC and arch.GENERIC.lean_projections == ()


def test_tokenizer_pad_fallbacks(tmp_path):
    tok = build_tokenizer()
    tok.padding_side = "right"
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    with pytest.warns(UserWarning, match="no pad token"):
        loaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nopad")))
    assert loaded.pad_token == "</s>" and loaded.padding_side == "left"
    tok.eos_token = None
    tok.save_pretrained(tmp_path / "neither")
    with pytest.raises(ValueError, match="neither a pad nor an EOS"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "neither")))


def test_resolve_model_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "nowhere")))
    import pefrl.hub

    monkeypatch.setattr(pefrl.hub, "hub_reachable", lambda: True)
    assert resolve_model_path(ModelConfig(name_or_path="org/model")) == "org/model"  # a hub id passes through
    import pefrl.tiny as tiny

    monkeypatch.setattr(tiny, "DEFAULT_MODEL_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="pefrl.tasks.arithmetic_model"):  # missing: says how to build it
        resolve_model_path(ModelConfig())
    (tmp_path / "config.json").write_text("{}")  # "already built": nothing to build
    assert resolve_model_path(ModelConfig()) == str(tmp_path)


def test_save_load_roundtrip_and_reference_adapter(model_dirs, tmp_path):
    d = model_dirs["gpt2"]
    models = _load(d)
    with torch.no_grad():
        for n, p in models.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    ids, mask, P = _batch(d)
    lp = policy_forward(models, ids, mask, P, 1.0)[0]
    values = critic_values(models, ids, mask, P)
    save_adapters(models, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "policy" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ckpt" / "value_head.safetensors").is_file()

    fresh = _load(d)
    load_adapters(fresh, tmp_path / "ckpt")
    assert torch.equal(policy_forward(fresh, ids, mask, P, 1.0)[0], lp)
    assert torch.equal(critic_values(fresh, ids, mask, P), values)
    with pytest.raises(ValueError, match="critic"):
        load_adapters(_load(d, critic="shared"), tmp_path / "ckpt")

    # the saved policy as a LoRA-SFT start: reference = that adapter (frozen), policy initialized from it
    sft = load_models(ModelConfig(name_or_path=d, critic="adapter", reference_adapter=str(tmp_path / "ckpt" / "policy")),
                      LoraConfig(r=4), uses_critic=True)
    assert sft.reference == "reference" and set(sft.model.peft_config) == {"policy", "reference", "critic"}
    assert all(".reference." not in n for n, p in sft.model.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for n, p in sft.model.named_parameters() if ".reference." in n)
    assert all(p.requires_grad for n, p in sft.model.named_parameters() if "lora_" in n and ".policy." in n)
    ref = reference_logprobs(sft, ids, mask, P, 1.0)
    assert torch.allclose(ref, lp, atol=1e-6)
    assert torch.allclose(policy_forward(sft, ids, mask, P, 1.0)[0], lp, atol=1e-6)
    assert not torch.allclose(ref, _plain_base_logprobs(d, ids, mask, P), atol=1e-4)


@pytest.mark.parametrize("arch", ["gemma2", "cohere", "granite"])
def test_logits_post_processing_matches_the_model(arch, tmp_path):
    # Gemma 2 soft-caps logits, Cohere scales them, Granite divides them: chunked logprobs must do the same.
    from transformers import AutoConfig

    tok = build_tokenizer()
    extra = {"gemma2": dict(final_logit_softcapping=2.0, head_dim=8), "cohere": dict(logit_scale=0.5),
             "granite": dict(logits_scaling=4.0)}[arch]
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    models = _load(str(tmp_path), uses_critic=False)
    ids, mask, P = _batch(str(tmp_path))
    expected = _plain_base_logprobs(str(tmp_path), ids, mask, P)
    assert torch.allclose(reference_logprobs(models, ids, mask, P, 1.0, chunk_size=3), expected, atol=1e-5)


def test_bfloat16_base_with_gradient_checkpointing(model_dirs):
    d = model_dirs["llama"]
    ids, mask, P = _batch(d)
    plain = load_models(ModelConfig(name_or_path=d, dtype="bfloat16"), LoraConfig(r=4), uses_critic=True)
    ckpt = load_models(ModelConfig(name_or_path=d, dtype="bfloat16", gradient_checkpointing=True), LoraConfig(r=4),
                       uses_critic=True)
    ckpt.model.load_state_dict(plain.model.state_dict())
    ckpt.value_head.load_state_dict(plain.value_head.state_dict())
    ckpt.model.train()
    plain.model.train()
    grads = []
    for models in (plain, ckpt):
        assert next(models.model.get_base_model().parameters()).dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in models.trainable_parameters())  # adapters train in fp32
        logprobs, entropy, _ = policy_forward(models, ids, mask, P, 1.0, chunk_size=4)
        values = critic_values(models, ids, mask, P)
        assert logprobs.dtype == torch.float32 and values.dtype == torch.float32
        grads.append(torch.autograd.grad(logprobs.sum() + values.sum(), models.trainable_parameters()))
    diffs = [((a - b).abs().max() / b.abs().max().clamp(min=1e-8)).item() for a, b in zip(*grads)]
    assert max(diffs) < 1e-3, diffs  # the critic is recomputed under the critic adapter, not the active policy
    assert any(g.abs().sum() > 0 for g in grads[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_critic_layers_adapt_only_the_top_layers(model_dirs, arch):
    models = _load(model_dirs[arch], critic="adapter")
    models_top = load_models(ModelConfig(name_or_path=model_dirs[arch], critic="adapter", critic_layers=1), LoraConfig(r=4), True)
    every = [n for n, _ in models.model.named_parameters() if ".critic." in n]
    top = [n for n, _ in models_top.model.named_parameters() if ".critic." in n]
    assert models.critic_from is None and models_top.critic_from == 1  # tiny models have 2 layers
    assert top and sorted(top) == sorted(n for n in every if ".h.1." in n or ".layers.1." in n)


def test_critic_layers_beyond_the_model_are_named(model_dirs):
    cfg = ModelConfig(name_or_path=model_dirs["llama"], critic="adapter", critic_layers=3)
    with pytest.raises(ValueError, match="model.critic_layers is 3, but this llama has 2 layers"):
        load_models(cfg, LoraConfig(r=4), uses_critic=True)

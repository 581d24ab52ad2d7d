"""pefrl's lean decoder (pefrl/decode.py) against the HF forward it replaces."""

import pytest
import torch

from pefrl import decode
from pefrl.config import LoraConfig, ModelConfig, RolloutConfig
from tests.tolerances import assert_fp32_close
from pefrl.forward import critic_values, policy_forward, reference_logprobs
from pefrl.models import CRITIC, load_models, load_tokenizer
from pefrl.rollout import generate

from test_models import model_dirs  # noqa: F401  (module-scoped fixture: tiny models saved to tmp dirs)

torch.set_num_threads(1)
PROMPTS = ["1+2=", "33+44+5=", "the answer is", "7"]  # different lengths: left padding differs per row


def _setup(model_dir, uses_critic=False, critic="adapter", critic_layers=None, dtype="float32"):
    cfg = ModelConfig(name_or_path=model_dir, critic=critic, critic_layers=critic_layers, dtype=dtype)
    models = load_models(cfg, LoraConfig(r=4), uses_critic=uses_critic)
    with torch.no_grad():  # adapters that differ from the base and from each other
        for i, (n, p) in enumerate(models.model.named_parameters()):
            if "lora_B" in n:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(i))
    return models, load_tokenizer(cfg)


def _sample(models, tok, cfg, with_reference=True):
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    s = decode.sample(models, enc.input_ids, enc.attention_mask, cfg, eos_ids=[], pad_id=tok.pad_token_id,
                      with_reference=with_reference)
    ids = torch.cat([enc.input_ids, s.tokens], 1)  # (B, P + T): no EOS, so every token is real
    mask = torch.cat([enc.attention_mask, torch.ones_like(s.tokens)], 1)
    return s, ids, mask, enc.input_ids.shape[1]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logprobs_entropy_and_reference_equal_the_hf_forward(model_dirs, arch):
    models, tok = _setup(model_dirs[arch])
    assert decode.unsupported_reason(models) is None
    s, ids, mask, P = _sample(models, tok, RolloutConfig(max_new_tokens=8, temperature=0.7))
    assert s.tokens.shape == (len(PROMPTS), 8)
    with torch.no_grad():
        logprobs, entropy, _ = policy_forward(models, ids, mask, P, 0.7)
        ref = reference_logprobs(models, ids, mask, P, 0.7)
    torch.testing.assert_close(s.logprobs, logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(s.entropy, entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(s.ref_logprobs, ref, rtol=0, atol=1e-5)
    assert (logprobs - ref).abs().max() > 0.05  # the two row groups really ran different weights


def test_a_reference_adapter_is_scored_with_that_adapter(model_dirs):
    models, tok = _setup(model_dirs["llama"], uses_critic=True)
    models.reference = CRITIC  # any frozen adapter stands in for an SFT reference here
    s, ids, mask, P = _sample(models, tok, RolloutConfig(max_new_tokens=6))
    with torch.no_grad():
        ref = reference_logprobs(models, ids, mask, P, 1.0)
        models.reference = None
        base = reference_logprobs(models, ids, mask, P, 1.0)
    torch.testing.assert_close(s.ref_logprobs, ref, rtol=0, atol=1e-5)
    assert (ref - base).abs().max() > 0.05


def test_greedy_tokens_equal_transformers_generate(model_dirs):
    models, tok = _setup(model_dirs["qwen2"])
    cfg = RolloutConfig(max_new_tokens=10, top_k=1)
    lean = generate(models, tok, PROMPTS, RolloutConfig(**{**cfg.__dict__, "engine": "pefrl"}))
    hf = generate(models, tok, PROMPTS, RolloutConfig(**{**cfg.__dict__, "engine": "transformers"}))
    assert torch.equal(lean.response_ids, hf.response_ids) and lean.completions == hf.completions
    assert lean.ref_logprobs is None  # not asked for


def test_top_k_and_top_p_only_sample_allowed_tokens(model_dirs):
    models, tok = _setup(model_dirs["llama"])
    for cfg in (RolloutConfig(max_new_tokens=8, top_k=3), RolloutConfig(max_new_tokens=8, top_p=0.5)):
        s, ids, mask, P = _sample(models, tok, cfg, with_reference=False)
        with torch.no_grad():
            logprobs, _, _ = policy_forward(models, ids, mask, P, 1.0)
            full = models.model(input_ids=ids, attention_mask=mask,
                                position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, P - 1 : -1]  # (B, T, V)
        probs = torch.softmax(full, -1)
        rank = (probs > logprobs.exp()[..., None] + 1e-6).sum(-1)  # tokens strictly more likely than the sample
        if cfg.top_k:
            assert (rank < 3).all()
        else:  # the mass strictly above the sampled token must be below top_p, else it was cut
            above = (probs * (probs > logprobs.exp()[..., None] + 1e-6)).sum(-1)
            assert (above < 0.5).all()
        assert rank.max() > 0  # not greedy


def test_families_without_the_lean_layer_take_the_generic_stepper(model_dirs):
    models, tok = _setup(model_dirs["gpt2"])
    assert "gpt2" in decode.unsupported_reason(models)
    for engine in ("pefrl", "auto"):  # both: the generic stepper, which scores the reference too
        out = generate(models, tok, PROMPTS, RolloutConfig(max_new_tokens=4, engine=engine), with_reference=True)
        assert out.ref_logprobs is not None and out.logprobs is not None


def test_shared_critic_values_scored_while_sampling_equal_the_critic_forward(model_dirs):
    models, tok = _setup(model_dirs["llama"], uses_critic=True, critic="shared")
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    s = decode.sample(models, enc.input_ids, enc.attention_mask, RolloutConfig(max_new_tokens=6), eos_ids=[],
                      pad_id=tok.pad_token_id, with_reference=True, with_values=True)
    ids = torch.cat([enc.input_ids, s.tokens], 1)
    mask = torch.cat([enc.attention_mask, torch.ones_like(s.tokens)], 1)
    P = enc.input_ids.shape[1]
    with torch.no_grad():
        values = critic_values(models, ids, mask, P)
        logprobs, _, _ = policy_forward(models, ids, mask, P, 1.0)
    torch.testing.assert_close(s.values, values, rtol=0, atol=1e-5)
    torch.testing.assert_close(s.logprobs, logprobs, rtol=0, atol=1e-5)  # critic rows did not disturb the policy
    assert s.values.std() > 0
    models.critic = "adapter"
    with pytest.raises(ValueError, match="need the shared critic"):
        decode.sample(models, enc.input_ids, enc.attention_mask, RolloutConfig(max_new_tokens=2), [],
                      tok.pad_token_id, with_values=True)


def test_sampling_stores_projection_weights_input_major_in_place(model_dirs):
    """The sampler re-lays each projection weight out as (in, out)-major in its own storage: same parameter,
    shape and values, no new memory; the HF forward gives the same logprobs; a second call changes nothing."""
    models, tok = _setup(model_dirs["llama"])
    lm = models.model.get_base_model()
    q = lm.model.layers[0].self_attn.q_proj.base_layer.weight
    before, ptr, n_params = q.detach().clone(), q.data_ptr(), len(list(models.model.parameters()))
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc.input_ids, enc.attention_mask
    with torch.no_grad():
        logprobs_before = policy_forward(models, ids, mask, 2, 1.0)[0]
    _sample(models, tok, RolloutConfig(max_new_tokens=2))
    assert q.stride() == (1, q.shape[0]) and q.data_ptr() == ptr and torch.equal(q, before)
    assert q is lm.model.layers[0].self_attn.q_proj.base_layer.weight and len(list(models.model.parameters())) == n_params
    with torch.no_grad():
        torch.testing.assert_close(policy_forward(models, ids, mask, 2, 1.0)[0], logprobs_before, rtol=0, atol=1e-5)
    decode._store_input_major(lm)
    assert q.stride() == (1, q.shape[0]) and torch.equal(q, before)


def test_bf16_projection_weights_keep_their_layout(model_dirs):
    """bf16 weights stay (out, in)-major: the transposed layout made bf16 decoding slower (decode._store_input_major)."""
    models, tok = _setup(model_dirs["llama"], dtype="bfloat16")
    q = models.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert q.dtype == torch.bfloat16
    _sample(models, tok, RolloutConfig(max_new_tokens=2))
    assert q.stride() == (q.shape[1], 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_top_layers_critic_starts_from_the_reference_rows_hidden_states(model_dirs, arch):
    """model.critic_layers=1: the critic adapter adapts only the top layer; the sampler keeps the reference
    rows' hidden states entering it, and the critic's forward from there equals its whole forward, in values and
    in the gradients of the critic adapter and head, with left padding and rows that end early (masked)."""
    models, tok = _setup(model_dirs[arch], uses_critic=True, critic_layers=1)
    assert models.critic_from == 1  # tiny models have 2 layers
    critic_params = [(n, p) for n, p in models.model.named_parameters() if ".critic." in n]
    assert critic_params and all(".layers.1." in n for n, _ in critic_params)
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    s = decode.sample(models, enc.input_ids, enc.attention_mask, RolloutConfig(max_new_tokens=6), eos_ids=[],
                      pad_id=tok.pad_token_id, with_reference=True, with_critic_inputs=True)
    P = enc.input_ids.shape[1]
    ids = torch.cat([enc.input_ids, s.tokens], 1)  # (B, P + 6)
    mask = torch.cat([enc.attention_mask, torch.ones_like(s.tokens)], 1)
    mask[0, -2:] = 0  # row 0 ended two tokens early
    assert s.critic_inputs.shape == (len(PROMPTS), P + 5, models.model.config.hidden_size)

    def values_and_grads(critic_inputs):
        params = [p for _, p in critic_params] + list(models.value_head.parameters())
        values = critic_values(models, ids, mask, P, critic_inputs)
        (values * mask[:, P:]).sum().backward()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return values * mask[:, P:], grads

    whole, whole_grads = values_and_grads(None)
    top, top_grads = values_and_grads(s.critic_inputs)
    # values: reductions over the hidden size (32) and the MLP width (~64) of one layer and the head: K ~ 32 * 64;
    # gradients also sum over every token of the batch (B x T ~ 4 x 12): K ~ 32 * 64 * 48 (see tests/tolerances.py)
    assert_fp32_close(top, whole, k=32 * 64)
    for a, b in zip(top_grads, whole_grads):
        assert_fp32_close(a, b, k=32 * 64 * 48)
    assert whole.std() > 0 and any(g.abs().sum() > 0 for g in whole_grads)


def test_critic_inputs_only_where_the_reference_rows_run_the_base(model_dirs):
    models, tok = _setup(model_dirs["llama"], uses_critic=True, critic_layers=1)
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    args = (enc.input_ids, enc.attention_mask, RolloutConfig(max_new_tokens=2), [], tok.pad_token_id)
    assert decode.sample(models, *args, with_reference=False, with_critic_inputs=True).critic_inputs is None
    assert decode.sample(models, *args, with_reference=True).critic_inputs is None  # not asked
    models.reference = CRITIC  # a reference adapter: its rows are not the base below the critic's layers
    assert decode.sample(models, *args, with_reference=True, with_critic_inputs=True).critic_inputs is None


GROUPED = [p for p in PROMPTS[:3] for _ in range(3)]  # a group method's batch: each prompt num_samples times


def _grouped_sample(models, tok, monkeypatch, share: bool, **kw):
    if not share:
        monkeypatch.setattr(decode, "shared_prompts", lambda ids, mask: None)
    enc = tok(GROUPED, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    s = decode.sample(models, enc.input_ids, enc.attention_mask, RolloutConfig(max_new_tokens=6, top_k=1),
                      eos_ids=[], pad_id=tok.pad_token_id, **kw)
    monkeypatch.undo()
    return s


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_repeated_prompts_are_prefilled_once_and_sample_as_if_each_row_ran(model_dirs, arch, monkeypatch):
    """A group's rows share their prompt: the sampler prefills each distinct prompt once (per row group) and
    expands the cache. Greedy tokens, logprobs, reference logprobs and the top-layers critic's inputs equal the
    prefill of every row, with left padding that differs between prompts."""
    models, tok = _setup(model_dirs[arch], uses_critic=True, critic_layers=1)
    enc = tok(GROUPED, return_tensors="pt", padding=True, padding_side="left")
    first, inverse = decode.shared_prompts(enc.input_ids, enc.attention_mask)
    assert len(first) == 3 and inverse.tolist() == [inverse[0]] * 3 + [inverse[3]] * 3 + [inverse[6]] * 3
    kw = dict(with_reference=True, with_critic_inputs=True)
    shared, every = (_grouped_sample(models, tok, monkeypatch, share, **kw) for share in (True, False))
    assert torch.equal(shared.tokens, every.tokens)
    # one forward each, the matmuls over 3 rows instead of 9: rounding of hidden-size (32) and MLP (~64) sums
    # through 2 layers, then a softmax over the vocabulary
    for a, b in ((shared.logprobs, every.logprobs), (shared.ref_logprobs, every.ref_logprobs),
                 (shared.critic_inputs, every.critic_inputs)):
        assert_fp32_close(a, b, k=32 * 64 * 4 * 512)
    assert (shared.logprobs - shared.ref_logprobs).abs().max() > 0.05  # policy and reference rows differ


def test_repeated_prompts_in_the_update_forward_give_the_whole_forward_and_its_gradients(model_dirs):
    """policy_forward runs each distinct prompt once and every row's response on the expanded cache; logprobs,
    entropy and the adapter's gradients equal the forward of every whole row (left padding, a response that
    ends early)."""
    from pefrl import forward

    models, tok = _setup(model_dirs["llama"])
    enc = tok(GROUPED, return_tensors="pt", padding=True, padding_side="left")
    responses = torch.randint(5, 100, (len(GROUPED), 5), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([enc.input_ids, responses], 1)
    mask = torch.cat([enc.attention_mask, torch.ones_like(responses)], 1)
    mask[1, -2:] = 0
    P = enc.input_ids.shape[1]
    params = [p for n, p in models.model.named_parameters() if p.requires_grad and ".policy." in n]

    def run():
        logprobs, entropy, _ = policy_forward(models, ids, mask, P, 0.7)
        grads = torch.autograd.grad((logprobs * mask[:, P:]).sum(), params)
        return logprobs * mask[:, P:], entropy * mask[:, P:], grads

    shared = run()
    with monkeypatch_context() as m:
        m.setattr(forward, "shared_prompts", lambda ids, mask: None)
        every = run()
    assert_fp32_close(shared[0], every[0], k=32 * 64 * 4 * 512)
    assert_fp32_close(shared[1], every[1], k=32 * 64 * 4 * 512)
    for a, b in zip(shared[2], every[2]):  # gradients also sum over the batch's tokens (9 x 5)
        assert_fp32_close(a, b, k=32 * 64 * 4 * 512 * 45)
    assert any(g.abs().sum() > 0 for g in shared[2])


def monkeypatch_context():
    return pytest.MonkeyPatch.context()


def test_sharing_is_off_with_pefrl_share_prompts_0(monkeypatch):
    from pefrl.forward import shared_prompts

    ids, mask = torch.tensor([[5, 6], [5, 6], [7, 8]]), torch.ones(3, 2, dtype=torch.long)
    first, inverse = shared_prompts(ids, mask)
    assert first.tolist() == [0, 2] and inverse.tolist() == [0, 0, 1]
    monkeypatch.setenv("PEFRL_SHARE_PROMPTS", "0")
    assert shared_prompts(ids, mask) is None

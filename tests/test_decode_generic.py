"""pefrl's sampler on every family and on 4-bit bases: what it records equals the plain forward.

The lean layer (Llama, Qwen2) and the generic stepper (any family, through the model's own forward with peft's
mixed-adapter rows, pefrl/decode_generic.py) must give the tokens, logprobs, entropies, reference logprobs and
shared-critic values that policy_forward / reference_logprobs / critic_values compute on the whole sequence.
"""

import logging

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from pefrl import decode
from pefrl.config import LoraConfig, ModelConfig, RolloutConfig
from pefrl.forward import critic_values, policy_forward, reference_logprobs
from pefrl.models import POLICY, Models, load_models, load_tokenizer, use_adapter
from pefrl.rollout import choose_engine, generate
from pefrl.tiny import build_tokenizer
from tests.tolerances import assert_fp32_close

torch.set_num_threads(1)
PROMPTS = ["1+2=", "33+44+5=", "the answer is", "7"]  # different lengths: left padding differs per row
HIDDEN, WIDTH, HEADS = 64, 128, 4  # 64: bitsandbytes' 4-bit blocks are 64 values, every weight spans whole blocks
FAMILIES = {  # model_type -> config fields beyond the common ones (head_dim where the default is not H / heads)
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": HIDDEN // HEADS},
    "gemma2": {"head_dim": HIDDEN // HEADS, "query_pre_attn_scalar": HIDDEN // HEADS, "sliding_window": 4},
    "phi3": {},
    "gpt2": {"n_embd": HIDDEN, "n_layer": 2, "n_head": HEADS, "n_positions": 128},
}
LEAN = {"llama", "qwen2"}  # families with lean projections (pefrl/arch/llama.py)
# logprobs and values: reductions over the hidden size, the MLP width and (logsumexp) the vocabulary of 384,
# done in another order by a cached step than by the whole-sequence forward (tests/tolerances.py). The 4-bit
# kernel dequantizes to the fp32 compute dtype, so the same bound holds there.
K = HIDDEN * WIDTH * 384


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    tok = build_tokenizer()
    dirs = {}
    for family, extra in FAMILIES.items():
        ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
        common = dict(hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS // 2, max_position_embeddings=128)
        cfg = AutoConfig.for_model(family, **ids, **({} if family == "gpt2" else common), **extra)
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(family)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        tok.save_pretrained(d)
        dirs[family] = str(d)
    return dirs


def _setup(model_dir, quantization=None):
    cfg = ModelConfig(name_or_path=model_dir, critic="shared", quantization=quantization)
    models = load_models(cfg, LoraConfig(r=4), uses_critic=True)
    with torch.no_grad():  # a policy that differs from the base
        for i, (n, p) in enumerate(models.model.named_parameters()):
            if "lora_B" in n:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(i))
    models.model.eval()  # as rollout.generate sets it: peft mixes adapters in a batch only in eval mode
    return models, load_tokenizer(cfg)


def _sample(models, tok, cfg, engine, prompts=PROMPTS):
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    with use_adapter(models, POLICY):
        s = decode.sample(models, enc.input_ids, enc.attention_mask, cfg, eos_ids=[], pad_id=tok.pad_token_id,
                          with_reference=True, with_values=True, engine=engine)
    ids = torch.cat([enc.input_ids, s.tokens], 1)  # (B, P + T): no EOS, so every token is real
    mask = torch.cat([enc.attention_mask, torch.ones_like(s.tokens)], 1)
    return s, ids, mask, enc.input_ids.shape[1]


CASES = [(f, q, e) for f in FAMILIES for q in (None, "4bit") for e in (["lean", "generic"] if f in LEAN else
                                                                        ["generic"])]


@pytest.mark.parametrize("family, quantization, engine", CASES)
def test_recorded_logprobs_reference_and_values_equal_the_plain_forward(family_dirs, family, quantization, engine):
    models, tok = _setup(family_dirs[family], quantization)
    assert choose_engine(models, RolloutConfig()) == ("lean" if family in LEAN else "generic")
    s, ids, mask, P = _sample(models, tok, RolloutConfig(max_new_tokens=6, temperature=0.7), engine)
    assert s.tokens.shape == (len(PROMPTS), 6)
    with torch.no_grad():
        logprobs, entropy, _ = policy_forward(models, ids, mask, P, 0.7)
        ref = reference_logprobs(models, ids, mask, P, 0.7)
        values = critic_values(models, ids, mask, P)
    for got, expected in ((s.logprobs, logprobs), (s.entropy, entropy), (s.ref_logprobs, ref), (s.values, values)):
        assert_fp32_close(got, expected, k=K)
    assert (logprobs - ref).abs().max() > 0.05  # the two row groups really ran different weights
    assert values.std() > 0


GROUPED = [p for p in PROMPTS[:3] for _ in range(2)]  # a group method's batch: each prompt twice


@pytest.mark.parametrize("family, quantization, engine", CASES)
def test_repeated_prompts_run_once_in_the_sampler_and_the_update_forward(family_dirs, family, quantization, engine,
                                                                          monkeypatch):
    """Rows sharing a prompt: the sampler prefills it once per row group and the update's forward runs it once
    (pefrl.forward.shared_prompts); both equal the plain forward of every whole row, in every family."""
    from pefrl import forward

    models, tok = _setup(family_dirs[family], quantization)
    s, ids, mask, P = _sample(models, tok, RolloutConfig(max_new_tokens=6, temperature=0.7), engine, GROUPED)
    assert forward.shared_prompts(ids[:, :P], mask[:, :P]) is not None
    with torch.no_grad():
        shared = policy_forward(models, ids, mask, P, 0.7)
        monkeypatch.setattr(forward, "shared_prompts", lambda ids, mask: None)
        logprobs, entropy, _ = policy_forward(models, ids, mask, P, 0.7)
        ref = reference_logprobs(models, ids, mask, P, 0.7)
        values = critic_values(models, ids, mask, P)
    for got, expected in ((s.logprobs, logprobs), (s.entropy, entropy), (s.ref_logprobs, ref), (s.values, values),
                          (shared[0], logprobs), (shared[1], entropy)):
        assert_fp32_close(got, expected, k=K)
    assert (logprobs - ref).abs().max() > 0.05


@pytest.mark.parametrize("family, quantization", [(f, q) for f in FAMILIES for q in (None, "4bit")])
def test_greedy_tokens_equal_transformers_generate(family_dirs, family, quantization):
    models, tok = _setup(family_dirs[family], quantization)
    greedy = dict(max_new_tokens=8, top_k=1)
    ours = generate(models, tok, PROMPTS, RolloutConfig(**greedy, engine="pefrl"), with_reference=True)
    hf = generate(models, tok, PROMPTS, RolloutConfig(**greedy, engine="transformers"))
    assert torch.equal(ours.response_ids, hf.response_ids) and ours.completions == hf.completions
    assert ours.ref_logprobs is not None and hf.ref_logprobs is None
    if family in LEAN:  # the generic stepper samples the same tokens as the lean layer
        enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
        with use_adapter(models, POLICY):
            generic = decode.sample(models, enc.input_ids, enc.attention_mask, RolloutConfig(**greedy), [],
                                    tok.pad_token_id, with_reference=True, engine="generic")
        assert torch.equal(generic.tokens, ours.response_ids)


def test_auto_logs_the_engine_once_and_falls_back_where_no_sampler_of_ours_runs(family_dirs, caplog):
    models, tok = _setup(family_dirs["gpt2"])
    with caplog.at_level(logging.INFO, logger="pefrl.rollout"):
        for _ in range(2):
            generate(models, tok, PROMPTS, RolloutConfig(max_new_tokens=2))
    logged = [r.getMessage() for r in caplog.records if r.name == "pefrl.rollout"]
    assert len(logged) == 1  # once per model, not per rollout
    assert logged[0].startswith("rollout engine: generic (not the lean decoder: model_type 'gpt2'")
    # DoRA: neither the lean layer nor peft's mixed-adapter batches run it
    base = AutoModelForCausalLM.from_pretrained(family_dirs["gpt2"])
    dora = get_peft_model(base, PeftLoraConfig(r=4, target_modules=["c_attn"], use_dora=True,
                                               fan_in_fan_out=True), adapter_name=POLICY)
    models = Models(model=dora, value_head=None, critic="none", reference=None)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pefrl.rollout"):
        assert choose_engine(models, RolloutConfig()) == "transformers"
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # auto lost the fast path: said where it is seen
    assert "transformers" in caplog.text and "DoRA" in caplog.text
    with pytest.raises(ValueError, match="'pefrl' cannot sample from this model: .*DoRA"):
        choose_engine(models, RolloutConfig(engine="pefrl"))

import dataclasses
import math

import pytest
import torch

from pefrl.config import LoraConfig, ModelConfig, RolloutConfig
from pefrl.forward import policy_forward
from pefrl.models import POLICY, load_models, load_tokenizer, use_adapter
from pefrl.rollout import _response_length, generate
from pefrl.tiny import ARCHS, build_tokenizer

from test_models import model_dirs  # noqa: F401  (module-scoped fixture: tiny models saved to tmp dirs)

torch.set_num_threads(1)
PROMPTS = ["1+2=", "33+44+5=", "the answer is"]  # different lengths: left padding differs per row
ENGINES = ["pefrl", "transformers"]  # rollout.engine: pefrl's lean decoder (Llama/Qwen2) and HF generate


def _setup(model_dir):
    cfg = ModelConfig(name_or_path=model_dir)
    models = load_models(cfg, LoraConfig(r=4), uses_critic=False)
    with torch.no_grad():  # a policy that differs from the base, so the adapter must really be active
        for n, p in models.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(1))
    return models, load_tokenizer(cfg)


@pytest.mark.parametrize("arch", ARCHS)
def test_policy_logprobs_match_the_scores_generate_sampled_from(model_dirs, arch, monkeypatch):
    models, tok = _setup(model_dirs[arch])
    captured = {}
    original = models.model.generate

    def generate_with_logits(**kwargs):
        kwargs["generation_config"].output_logits = True  # raw logits, before temperature / top-k
        captured["out"] = original(**kwargs)
        return captured["out"]

    monkeypatch.setattr(models.model, "generate", generate_with_logits)
    cfg = RolloutConfig(max_new_tokens=6, temperature=0.7, top_k=20, engine="transformers")
    rollout = generate(models, tok, PROMPTS, cfg, torch.Generator().manual_seed(0))
    P, T = rollout.query_ids.shape[1], rollout.response_ids.shape[1]
    assert rollout.query_mask[0, 0] == 0 and rollout.input_ids.shape == (3, P + T)
    logits = torch.stack(captured["out"].logits, dim=1)[:, :T]  # (B, T, V)
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    logprobs, _, _ = policy_forward(models, rollout.input_ids, rollout.attention_mask, P, 0.7)
    m = rollout.response_mask.bool()
    assert m.sum() >= 6
    assert torch.allclose(logprobs[m], expected[m], atol=1e-4)
    assert rollout.behaviour_logprobs is None


@pytest.mark.parametrize("engine", ENGINES)
def test_seeded_generation_repeats_and_restores_state(model_dirs, engine):
    models, tok = _setup(model_dirs["llama"])
    models.model.train()
    cfg = RolloutConfig(max_new_tokens=8, engine=engine)
    a = generate(models, tok, PROMPTS, cfg, torch.Generator().manual_seed(3))
    b = generate(models, tok, PROMPTS, cfg, torch.Generator().manual_seed(3))
    c = generate(models, tok, PROMPTS, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a.response_ids, b.response_ids) and a.completions == b.completions
    assert not torch.equal(a.response_ids, c.response_ids)
    ids = [tok.encode(p) for p in PROMPTS]
    d = generate(models, tok, PROMPTS, cfg, torch.Generator().manual_seed(3), prompt_ids=ids)
    assert torch.equal(d.query_ids, a.query_ids) and torch.equal(d.response_ids, a.response_ids)
    assert models.model.training and models.model.active_adapter == POLICY


def test_response_length_eos_and_stop_strings():
    tok = build_tokenizer()
    ids = tok.encode("12+3=15", add_special_tokens=False)
    assert len(ids) == 7  # digits are single tokens, '+' and '=' too
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert _response_length(tok, ids, [eos], []) == (7, "12+3=15")  # ran to max_new_tokens
    assert _response_length(tok, ids + [eos, pad], [eos], []) == (8, "12+3=15")  # EOS is a real token
    assert _response_length(tok, ids + [pad], [eos], ["="]) == (5, "12+3")  # '=' is token 5: kept, text cut
    assert _response_length(tok, ids, [eos], ["+3", "5"]) == (4, "12")  # 2-token stop string, earliest wins
    assert _response_length(tok, ids[:2] + [eos] + ids[2:], [eos], ["="]) == (3, "12")  # EOS came first


@pytest.mark.parametrize("engine", ENGINES)
def test_generate_masks_after_eos_and_stop_string(model_dirs, engine):
    models, tok = _setup(model_dirs["qwen2"])
    greedy = RolloutConfig(max_new_tokens=8, top_k=1, engine=engine)  # top-k 1: deterministic
    free = generate(models, tok, PROMPTS, greedy)
    row = free.response_ids[0].tolist()
    # Make the token at index k of row 0 the EOS (then a stop string): the same greedy run must stop there.
    k = next(i for i in range(1, len(row))
             if tok.decode(row[i]).strip() and tok.decode(row[i]) not in tok.decode(row[:i]))
    tok.eos_token = tok.convert_ids_to_tokens(row[k])
    stopped = generate(models, tok, PROMPTS, greedy)
    assert stopped.response_mask[0, : k + 1].all() and stopped.response_mask[0].sum() == k + 1
    assert (stopped.response_ids[0, k + 1 :] == tok.pad_token_id).all()
    assert stopped.completions[0] == tok.decode(row[:k], skip_special_tokens=True)
    T = stopped.response_ids.shape[1]
    assert T == int(stopped.response_mask.sum(1).max())  # trimmed to the longest real response

    tok = load_tokenizer(ModelConfig(name_or_path=model_dirs["qwen2"]))
    text = free.completions[0]
    stop = tok.decode(row[k])
    cut = generate(models, tok, PROMPTS, dataclasses.replace(greedy, stop=[stop]))
    assert cut.completions[0] == text[: text.index(stop)]
    assert cut.response_mask[0].sum() == k + 1


@pytest.mark.parametrize("arch, engine", [("gpt2", "transformers"), ("llama", "pefrl")])
def test_epsilon_greedy_behaviour_logprobs(model_dirs, arch, engine):
    models, tok = _setup(model_dirs[arch])
    eps, k = 0.5, 5
    cfg = RolloutConfig(max_new_tokens=6, temperature=0.8, top_k=k, epsilon=eps, engine=engine)
    rollout = generate(models, tok, PROMPTS, cfg, torch.Generator().manual_seed(0))
    m = rollout.response_mask.bool()
    behaviour = rollout.behaviour_logprobs
    assert behaviour.shape == rollout.response_ids.shape and (behaviour[~m] == 0).all()
    assert (behaviour[m] >= math.log(eps / k) - 1e-6).all()
    # by hand: mixture = (1 - eps) * top-k renormalized softmax + eps / k on the top-k tokens
    P = rollout.query_ids.shape[1]
    ids, mask = rollout.input_ids, rollout.attention_mask
    with use_adapter(models, POLICY), torch.no_grad():
        logits = models.model(input_ids=ids, attention_mask=mask,
                              position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, P - 1 : -1]  # (B, T, V)
    top = (logits / 0.8).topk(k, dim=-1)
    p_top = torch.softmax(top.values, -1)  # (B, T, k)
    in_top = top.indices == rollout.response_ids[..., None]  # (B, T, k)
    assert in_top.any(-1)[m].all()  # every sampled token is in the allowed set
    expected = torch.log(((1 - eps) * p_top + eps / k).mul(in_top).sum(-1))  # (B, T)
    assert torch.allclose(behaviour[m], expected[m], atol=1e-4)
    # without filtering the uniform part covers the whole vocabulary
    wide = generate(models, tok, PROMPTS, dataclasses.replace(cfg, top_k=0), torch.Generator().manual_seed(0))
    assert (wide.behaviour_logprobs[wide.response_mask.bool()] >= math.log(eps / len(tok))).all()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("epsilon, temperature", [(0.0, 1.0), (0.0, 0.7), (0.2, 0.8)])
def test_recorded_logprobs_and_entropy_equal_a_full_forward(model_dirs, epsilon, temperature, engine):
    """The trainer skips the old-logprob forward and uses these: they must be what policy_forward computes."""
    model_cfg = ModelConfig(name_or_path=model_dirs["llama"])
    tok, models = load_tokenizer(model_cfg), load_models(model_cfg, LoraConfig(), False)
    with torch.no_grad():
        for n, p in models.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # a policy that differs from the base
    cfg = RolloutConfig(max_new_tokens=6, temperature=temperature, epsilon=epsilon, top_k=20 if epsilon else 0,
                        engine=engine)
    r = generate(models, tok, ["12+34=", "7+8=", "the quick"] * 2, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp, ent, _ = policy_forward(models, r.input_ids, r.attention_mask, r.query_ids.shape[1], temperature)
    m = r.response_mask
    torch.testing.assert_close(r.logprobs, lp * m, rtol=0, atol=1e-4)
    torch.testing.assert_close(r.entropy, ent * m, rtol=0, atol=1e-4)
    assert (r.behaviour_logprobs is not None) == (epsilon > 0)

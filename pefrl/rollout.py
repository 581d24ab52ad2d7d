"""Rollout: sample completions from the policy adapter (left padding, KV cache).

Two samplers (rollout.engine, see `choose_engine`): pefrl's (pefrl/decode.py), which scores the reference (and a
shared critic) in the same pass, through the lean layer for Llama/Mistral/Qwen2 or through the model's own
forward for any other causal LM; and HF `generate`, which scores nothing. Both sample the same distribution and
record the same old logprobs and entropies; `auto` takes pefrl's where it runs.

A completion ends at the first EOS (kept, and in the response_mask: the policy chose to stop) or at the first
stop string (the token that completes it is kept; the text is cut before the string). Positions after the end
hold the pad token with response_mask 0, and T is trimmed to the longest real response.

Sampling follows rollout config only: temperature, top_p, top_k and epsilon. The model's own generation_config
(e.g. a chat checkpoint's repetition_penalty) is overridden, since logprobs are later recomputed from
softmax(logits / temperature) and must describe the distribution that sampled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    TemperatureLogitsWarper,
)

from pefrl import decode, decode_generic
from pefrl.config import RolloutConfig
from pefrl.models import POLICY, Models, use_adapter
from pefrl.ops.logprobs import epsilon_mixture, step_policy

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One batch of prompts and sampled completions. All tensors on the model's device."""

    query_ids: torch.Tensor
    """(B, P) prompt tokens, left-padded."""
    query_mask: torch.Tensor
    """(B, P) 1 on prompt tokens, 0 on padding."""
    response_ids: torch.Tensor
    """(B, T) sampled tokens, right-padded with the pad token after the end."""
    response_mask: torch.Tensor
    """(B, T) float: 1 on real response tokens (EOS and the stop-completing token included)."""
    completions: list[str]
    """Decoded completions, cut before a stop string, without EOS/special tokens."""
    behaviour_logprobs: torch.Tensor | None = None
    """(B, T) logprobs of the sampled tokens under the distribution that actually sampled them (epsilon-greedy
    mixture); 0 where response_mask is 0. None when sampling was from the policy itself (epsilon = 0)."""
    logprobs: torch.Tensor | None = None
    """(B, T) logprobs of the sampled tokens under the tempered, untruncated policy, recorded while sampling
    (the old logprobs, without a second forward; TRL's PPO does the same); 0 where response_mask is 0."""
    entropy: torch.Tensor | None = None
    """(B, T) entropy of the tempered policy at each response position, recorded while sampling."""
    ref_logprobs: torch.Tensor | None = None
    """(B, T) reference logprobs of the sampled tokens, scored while sampling (pefrl's sampler with
    with_reference=True); 0 where response_mask is 0. None: the trainer runs the reference forward."""
    values: torch.Tensor | None = None
    """(B, T) critic values of the states before each response token, scored while sampling (engine 'pefrl'
    with with_values=True); 0 where response_mask is 0. None: the trainer runs the critic forward."""
    critic_inputs: torch.Tensor | None = None
    """(B, P + T - 1, H) the base's hidden states entering the first layer of a critic adapter on the top
    layers (model.critic_layers), at every position but the last, kept from the sampler's reference rows
    (with_critic_inputs=True). The critic's forward starts there (forward.critic_values); None: from the start."""

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)  # (B, P + T)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask.to(self.query_mask.dtype)], dim=1)  # (B, P + T)


class RecordPolicy(LogitsProcessor):
    """Records, for every sampled token, its logprob and the entropy under the tempered policy
    log_softmax(logits / temperature), and leaves the scores unchanged.

    transformers runs user processors before its own temperature/top-k/top-p warpers, so the scores seen here
    are the raw logits: the recorded logprobs are exactly what `forward.policy_forward` computes (up to the float
    noise between a KV-cached and a full forward), which saves the trainer the old-logprob forward. The token
    sampled at step t is only seen at step t + 1 (in input_ids), so one (B, V) step is kept, never all T.
    """

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature
        self.logprobs: list[torch.Tensor] = []  # one (B,) per sampled token
        self.entropy: list[torch.Tensor] = []  # one (B,) per step
        self._last: torch.Tensor | None = None  # (B, V) log-probabilities of the previous step

    def record(self, sampled: torch.Tensor) -> None:
        """Logprob of the tokens `sampled` (B,) at the previous step."""
        if self._last is not None:
            self.logprobs.append(self._last.gather(-1, sampled[:, None]).squeeze(-1))  # (B,)
            self._last = None

    def _policy(self, scores: torch.Tensor) -> torch.Tensor:
        logprobs, entropy = step_policy(scores, self.temperature)  # (B, V), (B,)
        self.entropy.append(entropy)
        return logprobs

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.record(input_ids[:, -1])
        self._last = self._policy(scores)
        return scores

    def stacked(self, sampled: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logprobs, entropy), each (B, T), zero outside response_mask; `sampled` (B, T0) is the output."""
        self.record(sampled[:, -1])  # the last step's token is only in the output
        T = response_mask.shape[1]
        zero = lambda x: torch.where(response_mask > 0, x, torch.zeros_like(x))  # noqa: E731
        entropy = zero(torch.stack(self.entropy, 1)[:, :T]) if self.entropy else None  # the mixture keeps none
        return zero(torch.stack(self.logprobs, 1)[:, :T]), entropy


class EpsilonGreedy(RecordPolicy):
    """Replace the sampling distribution p (tempered and top-k/top-p filtered) by
    (1 - eps) * p + eps * uniform(allowed), allowed = tokens with a finite score, and record the logprob of
    each sampled token under that mixture (and, through RecordPolicy, under the tempered policy).

    Why record: the PPO ratio pi_new / pi_old is an importance weight from the behaviour distribution; with
    exploration mixed in, that distribution is the mixture, not the policy (Sutton & Barto, off-policy
    learning).

    transformers runs user processors *before* its own temperature/top-k/top-p warpers, so this processor
    applies them itself and generate() switches transformers' off (temperature 1, top_k 0, top_p 1).
    """

    def __init__(self, epsilon: float, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        super().__init__(temperature)
        self.epsilon = epsilon
        warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        warpers += decode.truncation_warpers(top_k, top_p)
        self.warpers = LogitsProcessorList(warpers)
        self.policy = RecordPolicy(temperature)  # the policy's own logprobs, beside the mixture's

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.policy(input_ids, scores)
        self.record(input_ids[:, -1])
        scores = self.warpers(input_ids, scores.float())  # (B, V), filtered tokens at -inf
        self._last = torch.log(epsilon_mixture(scores, self.epsilon))  # log 0 = -inf: filtered stay unsampleable
        return self._last


class StopOnStrings(StoppingCriteria):
    """Row i is done once its decoded response contains one of `stop` (checked on a window of recent tokens:
    a string of n characters spans at most 4n byte-level tokens)."""

    def __init__(self, tokenizer, stop: list[str], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, stop, prompt_len
        self.window = 4 * max(len(s) for s in stop) + 4

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        tail = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window) :]  # (B, <= window)
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def _generation_config(cfg: RolloutConfig, tokenizer, eos_ids: list[int]) -> GenerationConfig:
    # Everything that shapes the distribution is set explicitly, so that the checkpoint's generation_config
    # cannot fill it in (transformers fills only unset fields from it). With epsilon, EpsilonGreedy applies
    # temperature, top-k and top-p itself (transformers' warpers would run after it).
    plain = cfg.epsilon == 0
    return GenerationConfig(
        do_sample=True,
        temperature=cfg.temperature if plain else 1.0,
        top_p=cfg.top_p if plain else 1.0,
        top_k=cfg.top_k if plain else 0,  # 0: off
        min_p=None,  # None, not 0.0: transformers adds a (no-op) min-p warper for any non-None value, ~20 ms
        # per decode step at a 49k vocabulary (docs/benchmarks.md)
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        num_beams=1,
        num_return_sequences=1,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        return_dict_in_generate=True,
    )


def _eos_ids(models: Models, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    model_eos = models.model.get_base_model().generation_config.eos_token_id
    ids |= set(model_eos if isinstance(model_eos, list) else [model_eos] if model_eos is not None else [])
    return sorted(ids)


def _seed_from(generator: torch.Generator | None) -> int | None:
    # HF generate samples with the global RNG; a seed drawn from `generator` makes same generator -> same samples
    if generator is None:
        return None
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded ids (B, P) and mask (B, P), P the longest: generation appends on the right."""
    P = max(len(ids) for ids in seqs)
    padded = torch.full((len(seqs), P), pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for b, ids in enumerate(seqs):
        padded[b, P - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[b, P - len(ids) :] = 1
    return padded, mask


def _encode(tokenizer, prompts: list[str], prompt_ids: list[list[int]] | None):
    """Left-padded (B, P) ids and mask: the prompts encoded, or `prompt_ids` as given."""
    if prompt_ids is None:
        # chat templates already start with BOS; adding special tokens again would double it
        add_special = not (tokenizer.bos_token and all(p.startswith(tokenizer.bos_token) for p in prompts))
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=add_special)
        return enc.input_ids, enc.attention_mask
    if len(prompt_ids) != len(prompts) or not all(prompt_ids):
        raise ValueError(f"prompt_ids: need {len(prompts)} non-empty id lists, got {[len(p) for p in prompt_ids]}")
    return left_pad(prompt_ids, tokenizer.pad_token_id)


def _response_length(tokenizer, tokens: list[int], eos_ids: list[int], stop: list[str]) -> tuple[int, str]:
    """(number of real tokens, completion text) of one sampled response."""
    n = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), len(tokens))  # EOS included
    body = tokens[: n - 1] if n and tokens[n - 1] in eos_ids else tokens[:n]
    text = tokenizer.decode(body, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop if s in text]
    if not cuts:
        return n, text

    def has_stop(k: int) -> bool:
        prefix = tokenizer.decode(body[:k], skip_special_tokens=True)
        return any(s in prefix for s in stop)

    lo, hi = 1, len(body)  # smallest k whose prefix contains a stop string: the completing token is k - 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if has_stop(mid) else (mid + 1, hi)
    return lo, text[: min(cuts)]


def choose_engine(models: Models, rollout_cfg: RolloutConfig) -> str:
    """The sampler rollout.engine runs on these models: 'lean' (pefrl's functional layer), 'generic' (pefrl's
    loop through the model's own forward with mixed-adapter rows) or 'transformers' (HF generate).

    'pefrl': lean where it runs, else generic, else ValueError naming why; 'auto': the same, else transformers.
    Which one ran, and why not a faster one, is logged once per model (at setup where the trainer asks early)."""
    if rollout_cfg.engine == "transformers":
        return _log_engine(models, "transformers", "rollout.engine=transformers")
    lean = decode.unsupported_reason(models)
    if lean is None:
        return _log_engine(models, "lean", None)
    generic = decode_generic.unsupported_reason(models)
    if generic is None:
        return _log_engine(models, "generic", f"not the lean decoder: {lean}")
    if rollout_cfg.engine == "pefrl":
        raise ValueError(f"rollout.engine: 'pefrl' cannot sample from this model: {lean}; {generic}; use 'auto' "
                         "or 'transformers'")
    return _log_engine(models, "transformers", f"{lean}; {generic}", logging.WARNING)  # the slow path, unasked


def _log_engine(models: Models, engine: str, why: str | None, level: int = logging.INFO) -> str:
    if getattr(models.model, "_pefrl_engine_logged", None) != engine:
        models.model._pefrl_engine_logged = engine
        logger.log(level, "rollout engine: %s%s", engine, f" ({why})" if why else "")
    return engine


def use_pefrl_engine(models: Models, rollout_cfg: RolloutConfig) -> bool:
    """Whether rollout.engine picks one of pefrl's samplers for these models (raises if 'pefrl' cannot run)."""
    return choose_engine(models, rollout_cfg) != "transformers"


def _hf_generate(models: Models, query_ids, query_mask, cfg: RolloutConfig, tokenizer, eos_ids, stopping):
    """transformers' generate with the recording processors -> (sampled (B, T0), recorder, explore)."""
    explore = EpsilonGreedy(cfg.epsilon, cfg.temperature, cfg.top_k, cfg.top_p) if cfg.epsilon > 0 else None
    recorder = explore.policy if explore else RecordPolicy(cfg.temperature)
    out = models.model.generate(
        input_ids=query_ids,
        attention_mask=query_mask,
        generation_config=_generation_config(cfg, tokenizer, eos_ids),
        logits_processor=LogitsProcessorList([explore or recorder]),
        stopping_criteria=[stopping] if stopping else None,
    )
    return out.sequences[:, query_ids.shape[1] :], recorder, explore


@torch.no_grad()
def generate(
    models: Models,
    tokenizer,
    prompts: list[str],
    rollout_cfg: RolloutConfig,
    generator: torch.Generator | None = None,
    prompt_ids: list[list[int]] | None = None,
    with_reference: bool = False,
    with_values: bool = False,
    with_critic_inputs: bool = False,
) -> Rollout:
    """Sample one completion per prompt with the policy adapter (repeat prompts for several samples each).

    prompt_ids: the prompts' exact token ids (e.g. a multi-turn context that must not be re-encoded); then
    `prompts` is not encoded. `generator` seeds the sampling: the same seed gives the same samples.
    with_reference: also score the sampled tokens under the reference (Rollout.ref_logprobs) where the pefrl
    engine runs; elsewhere it is left None. with_values: likewise the shared critic's values (Rollout.values),
    with_critic_inputs the inputs of a critic adapter on the top layers (Rollout.critic_inputs, see
    decode.sample for when the sampler can keep them).
    """
    model = models.model
    device = next(model.parameters()).device
    query_ids, query_mask = _encode(tokenizer, prompts, prompt_ids)
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
    P = query_ids.shape[1]
    eos_ids = _eos_ids(models, tokenizer)
    stopping = StopOnStrings(tokenizer, rollout_cfg.stop, P) if rollout_cfg.stop else None
    engine = choose_engine(models, rollout_cfg)
    ours = engine != "transformers"  # one of pefrl's samplers (pefrl/decode.py)
    seed = _seed_from(generator)
    was_training = model.training
    model.eval()
    try:
        with use_adapter(models, POLICY), torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                                                 enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            if ours:
                out = decode.sample(models, query_ids, query_mask, rollout_cfg, eos_ids, tokenizer.pad_token_id,
                                    stopping, with_reference, with_values, with_critic_inputs, engine)
                sampled = out.tokens
            else:
                sampled, recorder, explore = _hf_generate(models, query_ids, query_mask, rollout_cfg, tokenizer,
                                                          eos_ids, stopping)
    finally:
        model.train(was_training)
    # 2. cut each response at its end: first EOS (kept) or the token completing a stop string (kept)
    lengths, completions = [], []
    for row in sampled.tolist():
        n, text = _response_length(tokenizer, row, eos_ids, rollout_cfg.stop)
        lengths.append(n)
        completions.append(text)
    T = max(lengths)
    positions = torch.arange(T, device=device)
    response_mask = (positions[None, :] < torch.tensor(lengths, device=device)[:, None]).float()  # (B, T)
    response_ids = sampled[:, :T].masked_fill(response_mask == 0, tokenizer.pad_token_id)  # (B, T)
    if ours:
        # (B, T), 0 past the end (where, not *: a filtered pad token's mixture logprob is -inf)
        zero = lambda x: None if x is None else torch.where(response_mask > 0, x[:, :T], 0.0)  # noqa: E731
        critic_inputs = None if out.critic_inputs is None else out.critic_inputs[:, : P + T - 1]  # (B, P+T-1, H)
        return Rollout(query_ids, query_mask, response_ids, response_mask, completions,
                       zero(out.behaviour_logprobs), zero(out.logprobs), zero(out.entropy), zero(out.ref_logprobs),
                       zero(out.values), critic_inputs)
    logprobs, entropy = recorder.stacked(sampled, response_mask)  # (B, T) each
    behaviour = explore.stacked(sampled, response_mask)[0] if explore is not None else None
    return Rollout(query_ids, query_mask, response_ids, response_mask, completions, behaviour, logprobs, entropy)

"""pefrl's KV-cache sampler for LoRA adapters on one frozen base, scoring the reference in the same pass.

Why not transformers' `generate`: on the small batches of RL rollouts a decode step is bound by Python overhead
per module call and by reading the weights, not by FLOPs. `generate` runs every token through peft's wrappers,
the HF module tree and generic cache and mask machinery; the lean stepper here runs one plain function per
decoder layer (the lean functional layer of pefrl/arch/llama.py) over the same tensors (base weight, LoRA A and
B, scaling: nothing copied or merged, so it always samples from the adapters as they are now) into a
preallocated KV cache.

Why the reference rides along: the KL penalty needs log pi_ref of every sampled token, which costs a full
forward of the base after generation. Here each decode step runs 2B rows instead: rows 0..B-1 with the policy
adapter, rows B..2B-1 with adapters off (or the frozen reference adapter), fed the tokens the policy rows
sampled. Weight reads are shared by all rows, so on a decode-bound step the reference costs a fraction of a
separate forward (docs/benchmarks.md has the measurement).

Why a repeated prompt is prefilled once: a group method (GRPO, RLOO, DAPO...) samples every prompt num_samples
times, and with chat-formatted prompts the prefill of all those rows is most of a short rollout. Both steppers
run each distinct prompt once per row group and expand the KV cache (`shared_prompts`; the update's forward does
the same, pefrl/forward.py).

Two steppers under one sampling loop (`sample`): the lean one (`LeanStepper`) for the families of pefrl.arch
with lean projections (llama, mistral and qwen2: the same layer up to q/k/v biases), unquantized or
bitsandbytes 4-bit / 8-bit (those layers run their own forward), LoRA (no DoRA) on the attention and MLP
projections; `unsupported_reason` says why anything else is not. Everything else transformers can run with a
cache takes the generic stepper (pefrl/decode_generic.py: the model's own forward, each row group's adapter
routed into the LoRA layers). Every result is checked against the HF forward in tests/test_decode.py and
tests/test_decode_generic.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from pefrl import arch
from pefrl.arch import LogitsHead, positions_from_mask
from pefrl.arch.llama import Groups, forward_cached, layers, new_cache
from pefrl.config import RolloutConfig
from pefrl.decode_generic import GenericStepper, shared_rows
from pefrl.forward import shared_prompts
from pefrl.models import POLICY, Models
from pefrl.ops.logprobs import epsilon_mixture, step_policy, tempered


QUANTIZED_LINEARS = ("Linear4bit", "Linear8bitLt")
"""bitsandbytes' linear layers: the lean layer runs their own forward (pefrl.arch.llama.lora_linear)."""


def unsupported_reason(models: Models) -> str | None:
    """Why the lean sampler cannot run these models (None: it can)."""
    lm = models.lm
    cfg = lm.config
    projections = arch.family(cfg.model_type).lean_projections
    if not projections:
        supported = [name for name, fam in arch.FAMILIES.items() if fam.lean_projections]
        return f"model_type {cfg.model_type!r} (supported: {', '.join(supported)})"
    if arch.is_fsdp_sharded(lm):
        return "FSDP-sharded base (the sampler reads weights directly; FSDP gathers them only inside forward)"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "sliding_window", None):
        # sequences here are far shorter than any real window, but the HF mask would differ past it
        return "sliding-window attention"
    for layer in layers(lm):
        for path in projections:
            module = layer.get_submodule(path)
            base = getattr(module, "base_layer", module)
            if type(base) is not nn.Linear and type(base).__name__ not in QUANTIZED_LINEARS:
                return f"{path} is {type(base).__name__}, not a plain nn.Linear or a bitsandbytes one"
            if any(getattr(module, "use_dora", {}).values()) or getattr(module, "merged_adapters", []):
                return f"{path}: DoRA or merged adapters"
    wrapped = {name for name, m in lm.named_modules() if hasattr(m, "lora_A")}
    expected = {f"model.layers.{i}.{p}" for i in range(len(layers(lm))) for p in projections}
    if wrapped - expected:
        return f"LoRA on modules the sampler does not route: {sorted(wrapped - expected)[:3]}"
    return None


def _store_input_major(lm: nn.Module) -> None:
    """Keep each projection's base weight W (out, in) in memory as its transpose (in, out), seen through .t():
    same parameter, shape and values, so every other reader (HF forward, peft, saving) sees the same W.

    Why: on the few rows of a decode step x @ W.T is bound by reading W, and MKL streams an (in, out)-major W
    faster. Measured on this project's CPU (1 thread, the 30 x 7 projection shapes of SmolLM2-135M, random
    weights too large for the caches, ms for all of them): 16 rows 76 -> 65, 32 rows 97 -> 80; at the 464 rows
    of an update 754 vs 765 forward and 739 vs 738 backward, i.e. no change where the batch is large. A whole
    SmolLM2 rollout with reference rows (16 x 24 tokens): 4.52 -> 3.87 CPU s. CUDA weights are left as they
    are (not measured there). Idempotent: a weight already stored this way is skipped.

    fp32 weights only. On an AVX512-BF16/AMX Xeon, sampling 8 x 16 tokens with reference rows, CPU s: bf16
    Qwen2.5-1.5B shape 9.69 with this layout, 7.35 without (and generate + the reference forward, which read the
    same weights, 11.6 vs 8.4); bf16 SmolLM2 2.01 vs 1.95 (16 rows); fp32 SmolLM2 2.97 vs 3.11, fp32
    Qwen2.5-1.5B shape 22.4 vs 20.0 (left on: the earlier CPU measured +15-17% for it on SmolLM2).

    The transpose is written back into the weight's own storage (one layer's weight of scratch at a time), so no
    memory is added: a fresh copy would leave the old pages resident, e.g. the copy-on-write mapping of the
    safetensors file transformers loads from, +425 MiB peak RSS on SmolLM2."""
    projections = arch.family(lm.config.model_type).lean_projections
    for layer in layers(lm):
        for path in projections:
            module = layer.get_submodule(path)
            base = getattr(module, "base_layer", module)
            weight = base.weight
            if (type(base) is not nn.Linear or weight.device.type != "cpu" or weight.dtype != torch.float32
                    or not weight.is_contiguous() or min(weight.shape) == 1):
                continue
            out_features, in_features = weight.shape
            flat = weight.data.view(-1)  # the storage, row-major (out, in)
            flat.copy_(weight.data.t().contiguous().view(-1))  # now row-major (in, out)
            weight.data = flat.view(in_features, out_features).t()  # (out, in) again, strides (1, out)


@dataclass
class Sampled:
    """What one call of `sample` returns: every tensor (B, T0), T0 <= max_new_tokens steps."""

    tokens: torch.Tensor
    """Sampled tokens; the pad token once a row has finished."""
    logprobs: torch.Tensor
    """log softmax(logits / temperature) of each token under the policy (untruncated)."""
    entropy: torch.Tensor
    """Entropy of that tempered policy at each step."""
    behaviour_logprobs: torch.Tensor | None
    """Logprob under the epsilon-greedy mixture that sampled (None without epsilon)."""
    ref_logprobs: torch.Tensor | None
    """Logprob of each token under the reference (None unless asked)."""
    values: torch.Tensor | None
    """Critic value of the state before each token (None unless asked)."""
    critic_inputs: torch.Tensor | None = None
    """(B, P + T0 - 1, H): the reference rows' hidden states entering the critic adapter's first layer at every
    position fed to the model (None unless asked and the reference rows run the base)."""


def truncation_warpers(top_k: int, top_p: float) -> list:
    """transformers' top-k and top-p warpers for rollout.top_k / top_p (0 and 1.0: off), in the order generate
    applies them: both sampling engines filter tokens the same way."""
    warpers = [TopKLogitsWarper(top_k)] if top_k > 0 else []
    return warpers + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])


def _choose(z: torch.Tensor, cfg: RolloutConfig, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample from softmax(z) (z: tempered logits (B, V)) filtered by top-k/top-p, with epsilon exploration.
    -> (tokens (B,), logprobs of them under the epsilon mixture or None). Same semantics as transformers'
    warpers (they are reused) and as rollout.EpsilonGreedy."""
    warpers = truncation_warpers(cfg.top_k, cfg.top_p)
    scores = LogitsProcessorList(warpers)(ids, z) if warpers else z  # (B, V), filtered tokens at -inf
    if cfg.top_k == 1 and cfg.epsilon == 0:
        return scores.argmax(-1), None  # greedy: sampling a one-hot distribution, without drawing
    if cfg.epsilon == 0:
        return _draw(torch.softmax(scores, dim=-1)), None
    mixture = epsilon_mixture(scores, cfg.epsilon)  # (B, V)
    tokens = _draw(mixture)
    return tokens, mixture.gather(-1, tokens[:, None]).squeeze(-1).log()


def _draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of probs (B, V) by inverse-CDF sampling: the first token whose cumulative probability
    exceeds u ~ U[0, total). Exact like torch.multinomial, and ~4x cheaper on CPU at one draw per row."""
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(len(probs), 1, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]  # (B, 1)
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # first index with cdf > u
    return tokens.clamp(max=probs.shape[-1] - 1)


def _row_groups(models: Models, B: int, with_reference: bool) -> Groups:
    """Row groups of the decode batch: the policy's B rows, then B reference rows.

    A critic adapter gets no rows of its own: measured on SmolLM2-135M (CPU, scripts/bench_decode.py), B more
    decode rows cost 1.37 s per rollout against 1.19 s for the separate critic forward they would replace, while
    the reference rows cost 1.16 s against 1.63 s. On GPUs, where decode is bound by weight reads, extra rows
    should cost less still; not measured here."""
    groups: Groups = [(slice(0, B), POLICY)]
    if with_reference:
        groups.append((slice(B, 2 * B), models.reference))
    return groups


class LeanStepper:
    """The decode batch through the lean functional layer (pefrl/arch/llama.py) and a preallocated cache.
    `prefill` and `step` return (last-position logits (R, V), hidden states (R, H), captured critic inputs)."""

    def __init__(self, models: Models, groups: Groups, size: int, capture: tuple[int, slice] | None):
        self.lm, self.groups, self.capture = models.lm, groups, capture
        _store_input_major(self.lm)
        self.head = LogitsHead(self.lm)
        R = groups[-1][0].stop
        self.cache = new_cache(self.lm, R, size, self.lm.model.embed_tokens.weight)
        self.t, self.next_pos = 0, None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor):
        hidden, captured = forward_cached(self.lm, ids, positions, self.cache, self.t, self.groups,
                                          self.capture)  # (R, H), (B, L, H) or None
        self.t += ids.shape[1]
        self.next_pos = positions[:, -1:] + 1  # (R, 1)
        return self.head(hidden), hidden, captured

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The prompts ids (R, P), left-padded (mask (R, P)): positions from the mask, as generate gives them.
        shared (first (U,), inverse (B,)), pefrl.forward.shared_prompts of one row group's prompts: each group
        repeats them; the U distinct prompts run once per group and the cache is filled by expanding them."""
        self.cache.key_mask[:, : ids.shape[1]] = mask.bool()
        if shared is None:
            return self._forward(ids, positions_from_mask(mask))
        return self._prefill_shared(ids, mask, *shared)

    def _prefill_shared(self, ids: torch.Tensor, mask: torch.Tensor, first: torch.Tensor, inverse: torch.Tensor):
        """Why: a group method samples each prompt num_samples times, and the prefill of R = copies x B rows of
        long chat prompts is most of a short rollout's work; it costs U / B of that here."""
        U, P = len(first), ids.shape[1]
        run, back, groups = shared_rows(self.groups, first, inverse)  # the policy's and the reference's groups
        capture = None if self.capture is None else (self.capture[0], slice(U, 2 * U))  # the reference rows
        small = new_cache(self.lm, len(run), P, self.lm.model.embed_tokens.weight)
        small.key_mask[:] = mask[run].bool()
        positions = positions_from_mask(mask)  # (R, P)
        hidden, captured = forward_cached(self.lm, ids[run], positions[run], small, 0, groups, capture)
        for full, part in zip(self.cache.keys + self.cache.values, small.keys + small.values):
            full[:, :, :P] = part[back]  # (R, kv_heads, P, D)
        self.t, self.next_pos = P, positions[:, -1:] + 1
        return self.head(hidden)[back], hidden[back], None if captured is None else captured[inverse]

    def step(self, tokens: torch.Tensor):
        """The next token of every row, tokens (R,): attended to from now on, as generate does, even a pad."""
        self.cache.key_mask[:, self.t] = True
        return self._forward(tokens[:, None], self.next_pos)


def _stepper(models: Models, engine: str, B: int, size: int, with_reference: bool, with_values: bool,
             with_critic_inputs: bool):
    """The stepper of `engine` ('lean' or 'generic') for B policy rows (+ B reference rows), and whether it keeps
    critic inputs."""
    groups = _row_groups(models, B, with_reference)
    if engine == "generic":  # critic inputs feed the lean layer's upper_layers: not kept here
        return GenericStepper(models, groups, with_values), False
    if engine != "lean":
        raise ValueError(f"engine must be 'lean' or 'generic', got {engine!r}")
    capture = None
    if with_critic_inputs and with_reference and models.reference is None and models.critic_from is not None:
        capture = (models.critic_from, slice(B, 2 * B))  # the reference rows
    return LeanStepper(models, groups, size, capture), capture is not None


@torch.no_grad()
def sample(models: Models, query_ids: torch.Tensor, query_mask: torch.Tensor, cfg: RolloutConfig,
           eos_ids: list[int], pad_id: int, stopping=None, with_reference: bool = False,
           with_values: bool = False, with_critic_inputs: bool = False, engine: str = "lean") -> Sampled:
    """Sample up to cfg.max_new_tokens tokens per row of the left-padded prompts query_ids (B, P).

    with_reference: also score every sampled token under the reference (B more rows). with_values: the value of
    the state before each token from the shared critic head on the policy rows' own hidden states (free); only
    for model.critic == 'shared'. with_critic_inputs (lean engine): for a critic adapter on the top layers
    (model.critic_layers), keep the hidden states entering its first layer from the reference rows, where those
    run the base (with with_reference and no reference adapter): below that layer the critic is the base too.
    engine: 'lean' (the functional layer, families with lean projections) or 'generic' (the model's own forward
    with each row group's adapter routed in, pefrl/decode_generic.py). The policy adapter must be active.
    A row ends at EOS or when `stopping(ids, None)` flags it (transformers' StoppingCriteria interface); the
    loop ends when every row has. Sampling draws from the global torch RNG, as `generate` does.
    """
    B, P = query_ids.shape
    if with_values and models.critic != "shared":
        raise ValueError(f"values while sampling need the shared critic; critic is {models.critic!r}")
    copies = 2 if with_reference else 1
    N = cfg.max_new_tokens
    stepper, capturing = _stepper(models, engine, B, P + N, with_reference, with_values, with_critic_inputs)
    shared = shared_prompts(query_ids, query_mask)  # a group's samples: their prompt is prefilled once
    logits, hidden, captured = stepper.prefill(query_ids.repeat(copies, 1), query_mask.repeat(copies, 1), shared)
    critic_inputs = [captured]
    eos = torch.tensor(eos_ids, device=query_ids.device)
    finished = torch.zeros(B, dtype=torch.bool, device=query_ids.device)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("tokens", "logprobs", "entropy", "behaviour", "ref",
                                                           "values")}
    generated = query_ids
    for t in range(N):
        if with_values:
            out["values"].append(models.value_head(hidden[:B]))  # (B,): the policy's own hidden states
        tokens = _record(out, logits, B, cfg, generated, with_reference, finished, pad_id)  # (B,)
        generated = torch.cat([generated, tokens[:, None]], dim=1)  # (B, P + t + 1)
        finished |= torch.isin(tokens, eos)
        if stopping is not None:
            finished |= stopping(generated, None)
        if bool(finished.all()) or t == N - 1:
            break
        logits, hidden, captured = stepper.step(tokens.repeat(copies))  # the reference rows follow the policy
        critic_inputs.append(captured)
    stack = lambda k: torch.stack(out[k], dim=1) if out[k] else None  # noqa: E731  (B, T0)
    return Sampled(stack("tokens"), stack("logprobs"), stack("entropy"), stack("behaviour"), stack("ref"),
                   stack("values"), torch.cat(critic_inputs, dim=1) if capturing else None)


def _record(out: dict[str, list[torch.Tensor]], logits: torch.Tensor, B: int, cfg: RolloutConfig,
            generated: torch.Tensor, with_reference: bool, finished: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Sample the policy rows' next tokens (B,) from logits (R, V) and append what is recorded of them to `out`:
    tokens, their logprobs and the entropy under the tempered policy, under the epsilon mixture, under the
    reference (rows B..2B-1)."""
    z = tempered(logits[:B], cfg.temperature)  # (B, V)
    logprobs, entropy = step_policy(z, 1.0)  # z is already tempered
    tokens, behaviour = _choose(z, cfg, generated)
    tokens = tokens.masked_fill(finished, pad_id)  # finished rows keep emitting pad, as generate does
    out["tokens"].append(tokens)
    out["logprobs"].append(logprobs.gather(-1, tokens[:, None]).squeeze(-1))
    out["entropy"].append(entropy)
    if behaviour is not None:
        out["behaviour"].append(behaviour)
    if with_reference:
        ref = torch.log_softmax(tempered(logits[B:], cfg.temperature), dim=-1)  # (B, V)
        out["ref"].append(ref.gather(-1, tokens[:, None]).squeeze(-1))
    return tokens

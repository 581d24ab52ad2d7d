"""A lean KV-cache sampler for Llama-family bases with LoRA adapters, scoring the reference in the same pass.

Why not transformers' `generate`: on the small batches of RL rollouts a decode step is bound by Python overhead
per module call and by reading the weights, not by FLOPs. `generate` runs every token through peft's wrappers,
the HF module tree and generic cache and mask machinery; here one plain function per decoder layer reads the
same tensors directly (base weight, LoRA A and B, scaling: nothing copied or merged, so it always samples from
the adapters as they are now) into a preallocated KV cache.

Why the reference rides along: the KL penalty needs log pi_ref of every sampled token, which costs a full
forward of the base after generation. Here each decode step runs 2B rows instead: rows 0..B-1 with the policy
adapter, rows B..2B-1 with adapters off (or the frozen reference adapter), fed the tokens the policy rows
sampled. Weight reads are shared by all rows, so on a decode-bound step the reference costs a fraction of a
separate forward (docs/benchmarks.md has the measurement).

Supported: model_type llama, mistral and qwen2 (the same layer up to q/k/v biases), unquantized weights, LoRA
(no DoRA) on the attention and MLP projections. `unsupported_reason` says why anything else is not; the
rollout then uses transformers' generate. Every result is checked against the HF forward in
tests/test_decode.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from pefrl.config import RolloutConfig
from pefrl.models import POLICY, LogitsHead, Models
from pefrl.ops.logprobs import epsilon_mixture, step_policy, tempered

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

Groups = list[tuple[slice, str | None]]
"""Rows of the batch and the adapter each runs with (None: adapters off, i.e. the base)."""


def unsupported_reason(models: Models) -> str | None:
    """Why the lean sampler cannot run these models (None: it can)."""
    lm = models.model.get_base_model()
    cfg = lm.config
    if cfg.model_type not in SUPPORTED_TYPES:
        return f"model_type {cfg.model_type!r} (supported: {', '.join(SUPPORTED_TYPES)})"
    if getattr(lm, "is_loaded_in_4bit", False) or getattr(lm, "is_loaded_in_8bit", False):
        return "quantized base"
    if any(isinstance(p, DTensor) for p in lm.parameters()):
        return "FSDP-sharded base (the sampler reads weights directly; FSDP gathers them only inside forward)"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "sliding_window", None):
        # sequences here are far shorter than any real window, but the HF mask would differ past it
        return "sliding-window attention"
    for layer in lm.model.layers:
        for path in _PROJECTIONS:
            module = layer.get_submodule(path)
            base = getattr(module, "base_layer", module)
            if type(base) is not nn.Linear:
                return f"{path} is {type(base).__name__}, not a plain nn.Linear"
            if any(getattr(module, "use_dora", {}).values()) or getattr(module, "merged_adapters", []):
                return f"{path}: DoRA or merged adapters"
    wrapped = {name for name, m in lm.named_modules() if hasattr(m, "lora_A")}
    expected = {f"model.layers.{i}.{p}" for i in range(len(lm.model.layers)) for p in _PROJECTIONS}
    if wrapped - expected:
        return f"LoRA on modules the sampler does not route: {sorted(wrapped - expected)[:3]}"
    return None


def _linear(module: nn.Module, x: torch.Tensor, groups: Groups) -> torch.Tensor:
    """y = x W^T + b, plus scaling * (x A^T) B^T on each group's rows with that group's adapter."""
    base = getattr(module, "base_layer", module)
    y = F.linear(x, base.weight, base.bias)
    for rows, name in groups:
        if name is not None and name in getattr(module, "lora_A", {}):
            A, B = module.lora_A[name].weight, module.lora_B[name].weight  # (r, in), (out, r)
            # adapters are fp32 over a bf16/fp16 base: compute in theirs, add in the base's (as peft's forward)
            y[rows].add_(F.linear(F.linear(x[rows].to(A.dtype), A), B).to(y.dtype), alpha=module.scaling[name])
    return y


def _store_input_major(lm: nn.Module) -> None:
    """Keep each projection's base weight W (out, in) in memory as its transpose (in, out), seen through .t():
    same parameter, shape and values, so every other reader (HF forward, peft, saving) sees the same W.

    Why: on the few rows of a decode step x @ W.T is bound by reading W, and MKL streams an (in, out)-major W
    faster. Measured on this project's CPU (1 thread, the 30 x 7 projection shapes of SmolLM2-135M, random
    weights too large for the caches, ms for all of them): 16 rows 76 -> 65, 32 rows 97 -> 80; at the 464 rows
    of an update 754 vs 765 forward and 739 vs 738 backward, i.e. no change where the batch is large. A whole
    SmolLM2 rollout with reference rows (16 x 24 tokens): 4.52 -> 3.87 CPU s. CUDA weights are left as they
    are (not measured there). Idempotent: a weight already stored this way is skipped.

    The transpose is written back into the weight's own storage (one layer's weight of scratch at a time), so no
    memory is added: a fresh copy would leave the old pages resident, e.g. the copy-on-write mapping of the
    safetensors file transformers loads from, +425 MiB peak RSS on SmolLM2."""
    for layer in lm.model.layers:
        for path in _PROJECTIONS:
            module = layer.get_submodule(path)
            weight = getattr(module, "base_layer", module).weight
            if weight.device.type != "cpu" or not weight.is_contiguous() or min(weight.shape) == 1:
                continue
            out_features, in_features = weight.shape
            flat = weight.data.view(-1)  # the storage, row-major (out, in)
            flat.copy_(weight.data.t().contiguous().view(-1))  # now row-major (in, out)
            weight.data = flat.view(in_features, out_features).t()  # (out, in) again, strides (1, out)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (Su et al. 2021), in the rotate-half layout HF Llama checkpoints use."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class _Cache:
    keys: list[torch.Tensor]
    """Per layer (R, n_kv_heads, S, D), S = prompt + max_new_tokens positions."""
    values: list[torch.Tensor]
    key_mask: torch.Tensor
    """(R, S) bool: positions a query may attend to (prompt tokens, then every generated position)."""


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
               scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v with grouped kv heads. q (R, heads, L, D), keys/values (R, kv, S, D),
    mask (R, 1, L, S) bool. One query (a decode step) is plain matmuls: for these shapes 1.2-2x faster on CPU
    than SDPA's flash kernel, whose setup dominates a single row."""
    R, heads, L, D = q.shape
    kv = keys.shape[1]
    if L > 1:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=heads != kv)
    grouped = q.view(R, kv, heads // kv, D)  # query heads that share a kv head, side by side
    scores = torch.matmul(grouped, keys.transpose(-1, -2)) * scale  # (R, kv, heads/kv, S)
    scores = scores.masked_fill(~mask[:, :, 0, None, :].view(R, 1, 1, -1), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values).view(R, heads, 1, D)


def _layer(layer: nn.Module, h: torch.Tensor, cos, sin, mask: torch.Tensor, groups: Groups,
           cache: _Cache | None = None, i: int = 0, start: int = 0) -> torch.Tensor:
    """One decoder layer on h (R, L, H) at positions start..start+L-1. With a cache it writes its keys/values
    there and attends to everything cached before; without one, h is the whole sequence (start 0)."""
    attn, mlp = layer.self_attn, layer.mlp
    R, L, _ = h.shape
    D = attn.head_dim
    x = layer.input_layernorm(h)
    q = _linear(attn.q_proj, x, groups).view(R, L, -1, D).transpose(1, 2)  # (R, heads, L, D)
    k = _linear(attn.k_proj, x, groups).view(R, L, -1, D).transpose(1, 2)  # (R, kv_heads, L, D)
    v = _linear(attn.v_proj, x, groups).view(R, L, -1, D).transpose(1, 2)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if cache is not None:
        cache.keys[i][:, :, start : start + L] = k
        cache.values[i][:, :, start : start + L] = v
        k, v = cache.keys[i][:, :, : start + L], cache.values[i][:, :, : start + L]  # (R, kv_heads, S', D)
    out = _attention(q, k, v, mask, attn.scaling)  # (R, heads, L, D)
    h = h + _linear(attn.o_proj, out.transpose(1, 2).reshape(R, L, -1), groups)
    x = layer.post_attention_layernorm(h)
    gate = mlp.act_fn(_linear(mlp.gate_proj, x, groups))
    return h + _linear(mlp.down_proj, gate * _linear(mlp.up_proj, x, groups), groups)


def _rotary(lm: nn.Module, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rotary cos and sin at positions (R, L), shaped (R, 1, L, D) to broadcast over heads."""
    cos, sin = lm.model.rotary_emb(h, positions)  # (R, L, D) each
    return cos[:, None], sin[:, None]


def _mask(key_mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """(R, 1, L, end) bool attention mask of queries at positions start..end-1 over keys 0..end-1: causal and
    only to real keys (key_mask (R, >= end) bool)."""
    query_pos = torch.arange(start, end, device=key_mask.device)  # (L,)
    key_pos = torch.arange(end, device=key_mask.device)  # (S',)
    causal = key_pos[None, :] <= query_pos[:, None]  # (L, S')
    mask = key_mask[:, None, None, :end] & causal  # (R, 1, L, S')
    # a left-padding query sees no valid key; letting it see itself keeps softmax finite (its output is unused)
    return mask | (key_pos[None, :] == query_pos[:, None])


def _forward(lm: nn.Module, ids: torch.Tensor, positions: torch.Tensor, cache: _Cache, start: int,
             groups: Groups, capture: tuple[int, slice] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Last hidden state (R, H), after the final norm, of the L new tokens ids (R, L) placed at buffer positions
    start..start+L-1: what the lm_head (logits) and the value head (values) read. capture (layer i, rows):
    also return those rows' hidden states entering layer i, (rows, L, H); else None."""
    h = lm.model.embed_tokens(ids)  # (R, L, H)
    cos, sin = _rotary(lm, h, positions)
    mask = _mask(cache.key_mask, start, start + ids.shape[1])  # (R, 1, L, S')
    captured = None
    for i, layer in enumerate(lm.model.layers):
        if capture is not None and i == capture[0]:
            captured = h[capture[1]]
        h = _layer(layer, h, cos, sin, mask, groups, cache, i, start)
    return lm.model.norm(h[:, -1]), captured  # (R, H)


def upper_layers(lm: nn.Module, h: torch.Tensor, attention_mask: torch.Tensor, first: int,
                 adapter: str | None) -> torch.Tensor:
    """Decoder layers first.. and the final norm over whole sequences, under `adapter`, with autograd: the last
    hidden states (R, L, H) of a model whose layers below `first` ran elsewhere. h (R, L, H): the hidden states
    entering layer `first`; attention_mask (R, L), left padding as in generate (positions from the mask)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (R, L)
    cos, sin = _rotary(lm, h, positions)
    mask = _mask(attention_mask.bool(), 0, h.shape[1])  # (R, 1, L, L)
    groups = [(slice(0, len(h)), adapter)]
    for layer in lm.model.layers[first:]:
        h = _layer(layer, h, cos, sin, mask, groups)
    return lm.model.norm(h)


def _new_cache(lm: nn.Module, rows: int, size: int, like: torch.Tensor) -> _Cache:
    attn = lm.model.layers[0].self_attn
    kv_width = getattr(attn.k_proj, "base_layer", attn.k_proj).out_features  # kv_heads * head_dim
    shape = (rows, kv_width // attn.head_dim, size, attn.head_dim)
    n = len(lm.model.layers)
    return _Cache([like.new_zeros(shape) for _ in range(n)], [like.new_zeros(shape) for _ in range(n)],
                  torch.zeros(rows, size, dtype=torch.bool, device=like.device))


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


def _choose(z: torch.Tensor, cfg: RolloutConfig, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample from softmax(z) (z: tempered logits (B, V)) filtered by top-k/top-p, with epsilon exploration.
    -> (tokens (B,), logprobs of them under the epsilon mixture or None). Same semantics as transformers'
    warpers (they are reused) and as rollout.EpsilonGreedy."""
    warpers = [TopKLogitsWarper(cfg.top_k)] if cfg.top_k > 0 else []
    warpers += [TopPLogitsWarper(cfg.top_p)] if cfg.top_p < 1.0 else []
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


@torch.no_grad()
def sample(models: Models, query_ids: torch.Tensor, query_mask: torch.Tensor, cfg: RolloutConfig,
           eos_ids: list[int], pad_id: int, stopping=None, with_reference: bool = False,
           with_values: bool = False, with_critic_inputs: bool = False) -> Sampled:
    """Sample up to cfg.max_new_tokens tokens per row of the left-padded prompts query_ids (B, P).

    with_reference: also score every sampled token under the reference (B more rows). with_values: the value of
    the state before each token from the shared critic head on the policy rows' own hidden states (free); only
    for model.critic == 'shared'. with_critic_inputs: for a critic adapter on the top layers (model.critic_layers),
    keep the hidden states entering its first layer from the reference rows, where those run the base (with
    with_reference and no reference adapter): below that layer the critic is the base too.
    A row ends at EOS or when `stopping(ids, None)` flags it (transformers' StoppingCriteria interface); the
    loop ends when every row has. Sampling draws from the global torch RNG, as `generate` does.
    """
    lm = models.model.get_base_model()
    _store_input_major(lm)
    head = LogitsHead(lm)
    B, P = query_ids.shape
    if with_values and models.critic != "shared":
        raise ValueError(f"values while sampling need the shared critic; critic is {models.critic!r}")
    groups = _row_groups(models, B, with_reference)
    copies = len(groups)
    capture = None
    if with_critic_inputs and with_reference and models.reference is None and models.critic_from is not None:
        capture = (models.critic_from, slice(B, 2 * B))  # the reference rows
    critic_inputs = []
    ids, mask = query_ids.repeat(copies, 1), query_mask.repeat(copies, 1)  # (copies * B, P)
    R, N = len(ids), cfg.max_new_tokens
    cache = _new_cache(lm, R, P + N, lm.model.embed_tokens.weight)
    cache.key_mask[:, :P] = mask.bool()
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (R, P): left padding does not shift positions
    hidden, captured = _forward(lm, ids, positions, cache, 0, groups, capture)  # (R, H), (B, P, H)
    critic_inputs.append(captured)
    next_pos = positions[:, -1:] + 1  # (R, 1)
    eos = torch.tensor(eos_ids, device=ids.device)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("tokens", "logprobs", "entropy", "behaviour", "ref",
                                                           "values")}
    generated = query_ids
    for t in range(N):
        logits = head(hidden)  # (R, V)
        if with_values:
            out["values"].append(models.value_head(hidden[:B]))  # (B,): the policy's own hidden states
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
        generated = torch.cat([generated, tokens[:, None]], dim=1)  # (B, P + t + 1)
        finished |= torch.isin(tokens, eos)
        if stopping is not None:
            finished |= stopping(generated, None)
        if bool(finished.all()) or t == N - 1:
            break
        cache.key_mask[:, P + t] = True
        hidden, captured = _forward(lm, tokens.repeat(copies)[:, None], next_pos, cache, P + t, groups,
                                    capture)  # (R, H), (B, 1, H)
        critic_inputs.append(captured)
        next_pos = next_pos + 1
    stack = lambda k: torch.stack(out[k], dim=1) if out[k] else None  # noqa: E731  (B, T0)
    return Sampled(stack("tokens"), stack("logprobs"), stack("entropy"), stack("behaviour"), stack("ref"),
                   stack("values"), torch.cat(critic_inputs, dim=1) if capture is not None else None)

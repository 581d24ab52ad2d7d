"""Llama (and the families sharing its layer: Qwen2, Mistral): the facts and pefrl's lean functional layer.

The lean layer reads the HF module tree's tensors directly (base weight, LoRA A and B, scaling: nothing copied
or merged) with one plain function per decoder layer: what pefrl.decode's KV-cache sampler runs per step, and
what `upper_layers` runs for a critic adapter on the top layers (pefrl.forward.critic_values). Layout:
lm.model.{embed_tokens, layers, norm, rotary_emb}; each layer input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj. Checked against the HF forward in tests/test_decode.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pefrl.arch.base import Family, positions_from_mask

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
"""Paths of the projections inside one decoder layer: where the lean layer applies LoRA."""

FAMILY = Family("llama", lean_projections=PROJECTIONS)

Groups = list[tuple[slice, str | None]]
"""Rows of the batch and the adapter each runs with (None: adapters off, i.e. the base)."""


def layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-layout causal LM."""
    return lm.model.layers


def lora_linear(module: nn.Module, x: torch.Tensor, groups: Groups) -> torch.Tensor:
    """y = x W^T + b, plus scaling * (x A^T) B^T on each group's rows with that group's adapter. A base layer that
    is not a plain nn.Linear (bitsandbytes' Linear4bit / Linear8bitLt) runs its own forward: its kernel
    dequantizes the weight it stores."""
    base = getattr(module, "base_layer", module)
    y = F.linear(x, base.weight, base.bias) if type(base) is nn.Linear else base(x)
    for rows, name in groups:
        if name is not None and name in getattr(module, "lora_A", {}):
            A, B = module.lora_A[name].weight, module.lora_B[name].weight  # (r, in), (out, r)
            # adapters are fp32 over a bf16/fp16 base: compute in theirs, add in the base's (as peft's forward)
            y[rows].add_(F.linear(F.linear(x[rows].to(A.dtype), A), B).to(y.dtype), alpha=module.scaling[name])
    return y


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (Su et al. 2021), in the rotate-half layout HF Llama checkpoints use."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class KVCache:
    keys: list[torch.Tensor]
    """Per layer (R, n_kv_heads, S, D), S = prompt + max_new_tokens positions."""
    values: list[torch.Tensor]
    key_mask: torch.Tensor
    """(R, S) bool: positions a query may attend to (prompt tokens, then every generated position)."""


def new_cache(lm: nn.Module, rows: int, size: int, like: torch.Tensor) -> KVCache:
    """An empty cache of `size` positions for `rows` rows, in the dtype and device of `like`."""
    attn = lm.model.layers[0].self_attn
    kv_width = getattr(attn.k_proj, "base_layer", attn.k_proj).out_features  # kv_heads * head_dim
    shape = (rows, kv_width // attn.head_dim, size, attn.head_dim)
    n = len(lm.model.layers)
    return KVCache([like.new_zeros(shape) for _ in range(n)], [like.new_zeros(shape) for _ in range(n)],
                   torch.zeros(rows, size, dtype=torch.bool, device=like.device))


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


def decoder_layer(layer: nn.Module, h: torch.Tensor, cos, sin, mask: torch.Tensor, groups: Groups,
                  cache: KVCache | None = None, i: int = 0, start: int = 0) -> torch.Tensor:
    """One decoder layer on h (R, L, H) at positions start..start+L-1. With a cache it writes its keys/values
    there and attends to everything cached before; without one, h is the whole sequence (start 0)."""
    attn, mlp = layer.self_attn, layer.mlp
    R, L, _ = h.shape
    D = attn.head_dim
    x = layer.input_layernorm(h)
    q = lora_linear(attn.q_proj, x, groups).view(R, L, -1, D).transpose(1, 2)  # (R, heads, L, D)
    k = lora_linear(attn.k_proj, x, groups).view(R, L, -1, D).transpose(1, 2)  # (R, kv_heads, L, D)
    v = lora_linear(attn.v_proj, x, groups).view(R, L, -1, D).transpose(1, 2)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if cache is not None:
        cache.keys[i][:, :, start : start + L] = k
        cache.values[i][:, :, start : start + L] = v
        k, v = cache.keys[i][:, :, : start + L], cache.values[i][:, :, : start + L]  # (R, kv_heads, S', D)
    out = _attention(q, k, v, mask, attn.scaling)  # (R, heads, L, D)
    h = h + lora_linear(attn.o_proj, out.transpose(1, 2).reshape(R, L, -1), groups)
    x = layer.post_attention_layernorm(h)
    gate = mlp.act_fn(lora_linear(mlp.gate_proj, x, groups))
    return h + lora_linear(mlp.down_proj, gate * lora_linear(mlp.up_proj, x, groups), groups)


def rotary(lm: nn.Module, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rotary cos and sin at positions (R, L), shaped (R, 1, L, D) to broadcast over heads."""
    cos, sin = lm.model.rotary_emb(h, positions)  # (R, L, D) each
    return cos[:, None], sin[:, None]


def causal_mask(key_mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """(R, 1, L, end) bool attention mask of queries at positions start..end-1 over keys 0..end-1: causal and
    only to real keys (key_mask (R, >= end) bool)."""
    query_pos = torch.arange(start, end, device=key_mask.device)  # (L,)
    key_pos = torch.arange(end, device=key_mask.device)  # (S',)
    causal = key_pos[None, :] <= query_pos[:, None]  # (L, S')
    mask = key_mask[:, None, None, :end] & causal  # (R, 1, L, S')
    # a left-padding query sees no valid key; letting it see itself keeps softmax finite (its output is unused)
    return mask | (key_pos[None, :] == query_pos[:, None])


def forward_cached(lm: nn.Module, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int,
                   groups: Groups, capture: tuple[int, slice] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Last hidden state (R, H), after the final norm, of the L new tokens ids (R, L) placed at buffer positions
    start..start+L-1: what the lm_head (logits) and the value head (values) read. capture (layer i, rows):
    also return those rows' hidden states entering layer i, (rows, L, H); else None."""
    h = lm.model.embed_tokens(ids)  # (R, L, H)
    cos, sin = rotary(lm, h, positions)
    mask = causal_mask(cache.key_mask, start, start + ids.shape[1])  # (R, 1, L, S')
    captured = None
    for i, layer in enumerate(lm.model.layers):
        if capture is not None and i == capture[0]:
            captured = h[capture[1]]
        h = decoder_layer(layer, h, cos, sin, mask, groups, cache, i, start)
    return lm.model.norm(h[:, -1]), captured  # (R, H)


def upper_layers(lm: nn.Module, h: torch.Tensor, attention_mask: torch.Tensor, first: int,
                 adapter: str | None) -> torch.Tensor:
    """Decoder layers first.. and the final norm over whole sequences, under `adapter`, with autograd: the last
    hidden states (R, L, H) of a model whose layers below `first` ran elsewhere. h (R, L, H): the hidden states
    entering layer `first`; attention_mask (R, L), left padding as in generate (positions from the mask)."""
    positions = positions_from_mask(attention_mask)  # (R, L)
    cos, sin = rotary(lm, h, positions)
    mask = causal_mask(attention_mask.bool(), 0, h.shape[1])  # (R, 1, L, L)
    groups = [(slice(0, len(h)), adapter)]
    for layer in lm.model.layers[first:]:
        h = decoder_layer(layer, h, cos, sin, mask, groups)
    return lm.model.norm(h)

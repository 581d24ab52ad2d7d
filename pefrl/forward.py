"""Forward passes over the one-base bundle: policy logprobs (and entropy, shared-head values), critic values,
reference logprobs.

Sequences are `input_ids = cat(query_ids (B, P) left-padded, response_ids (B, T) right-padded)`; every
function returns per-response-token tensors (B, T). Token t of the response is predicted at position P + t - 1,
and its value is read there too (the state before the action, as in lm-human-preference-details).
"""

from __future__ import annotations

import os

import torch

from pefrl.arch import LogitsHead, is_fsdp_sharded, positions_from_mask
from pefrl.arch.llama import upper_layers
from pefrl.models import CRITIC, POLICY, Models, use_adapter
from pefrl.ops.logprobs import chunked_logprobs, entropy_from_logits, linear_logprobs, selective_logprobs


def _response_hidden(models: Models, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int):
    """Last hidden states at the positions that predict the response tokens: (B, T, H), T = L - P.

    Runs the trunk only (no lm_head), so no logits are computed for the prompt. Positions come from the mask
    as in `generate`, so a left-padded prompt sees the same positions in both. Rows that share a prompt (a
    group's samples) run it once: see `_shared_prompt_hidden`.
    """
    if not 0 < prompt_len < input_ids.shape[1]:
        raise ValueError(f"prompt_len must be in [1, {input_ids.shape[1] - 1}], got {prompt_len}")
    lm = models.lm
    trunk = getattr(lm, lm.base_model_prefix, None)  # LlamaModel under .model, GPT2Model under .transformer
    if trunk is None:
        raise NotImplementedError(f"{type(lm).__name__} has no trunk at .{lm.base_model_prefix}")
    position_ids = positions_from_mask(attention_mask)  # (B, L)
    shared = shared_prompts(input_ids[:, :prompt_len], attention_mask[:, :prompt_len]) if _can_share(lm) else None
    if shared is not None:
        return _shared_prompt_hidden(trunk, input_ids, attention_mask, position_ids, prompt_len, *shared)
    out = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    # contiguous: F.linear on the strided slice runs as a batched matmul against an expanded weight, which on CPU
    # took 2x the time of the plain matmul for the lm_head forward and backward (SmolLM2, 384 x 49152 logits)
    return out[0][:, prompt_len - 1 : -1].contiguous()  # (B, T, H)


def shared_prompts(query_ids: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows with the same (left-padded) prompt: (first (U,) the first row of each distinct prompt, inverse (B,)
    the index into `first` of each row's prompt), or None when no two rows share one, or when the environment
    sets PEFRL_SHARE_PROMPTS=0: sharing runs matmuls over fewer rows, whose sums round differently with the
    per-rank batch, so N ranks reproduce one rank only to rounding (which AdamW can magnify where a gradient
    is ~0); 0 keeps the bit-for-bit match (docs/distributed.md)."""
    if os.environ.get("PEFRL_SHARE_PROMPTS", "1") == "0":
        return None
    rows = torch.cat([query_ids, query_mask.to(query_ids.dtype)], dim=1)  # (B, 2P): ids and padding alike
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)  # (U, 2P), (B,)
    if len(distinct) == len(rows):
        return None
    order = torch.arange(len(rows), device=rows.device)
    first = torch.full((len(distinct),), len(rows), device=rows.device).scatter_reduce(0, inverse, order, "amin")
    return first, inverse


def _can_share(lm) -> bool:
    """The trunk can run a prompt once and its rows' responses on an expanded cache: not under activation
    checkpointing (transformers drops the cache there) nor FSDP (its sharded forward is left as it is)."""
    if getattr(lm, "is_activation_checkpointing", False):
        return False
    return not is_fsdp_sharded(lm)


def _shared_prompt_hidden(trunk, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                          prompt_len: int, first: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """_response_hidden's (B, T, H) when rows repeat prompts (a group's samples): the U distinct prompts run once,
    their KV cache is expanded to the B rows, then the responses run on it. The prompt's tokens cost U/B of the
    full forward; autograd carries every row's gradient back through the shared prompt. Same math as the full
    forward (tests/test_forward.py); the matmuls differ in shape, so the results agree to rounding."""
    P = prompt_len
    head = trunk(input_ids=input_ids[first, :P], attention_mask=attention_mask[first, :P],
                 position_ids=position_ids[first, :P], use_cache=True)
    last = head[0][inverse, -1:]  # (B, 1, H): the prompt's last position predicts response token 0
    if input_ids.shape[1] - 1 == P:  # one response token
        return last
    cache = head.cache
    cache.batch_select_indices(inverse)  # (U, ...) -> (B, ...) rows, a differentiable gather
    tail = trunk(input_ids=input_ids[:, P:-1], attention_mask=attention_mask[:, :-1],
                 position_ids=position_ids[:, P:-1], cache=cache, use_cache=True)
    return torch.cat([last, tail[0]], dim=1).contiguous()  # (B, T, H)


def _logprobs(models: Models, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float,
              chunk_size: int | None, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    lm_head = LogitsHead(models.lm)
    if chunk_size is not None:
        return chunked_logprobs(hidden, lm_head, tokens, temperature, chunk_size, with_entropy)
    if not with_entropy and lm_head.is_plain_linear():
        B, T, H = hidden.shape
        logprobs = linear_logprobs(hidden.reshape(B * T, H), lm_head.lm_head.weight, tokens.reshape(B * T),
                                   temperature)  # (B * T,)
        return logprobs.reshape(B, T), None
    logits = lm_head(hidden)  # (B, T, V)
    entropy = entropy_from_logits(logits, temperature) if with_entropy else None
    return selective_logprobs(logits, tokens, temperature), entropy


def policy_forward(
    models: Models,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    temperature: float,
    with_values: bool = False,
    chunk_size: int | None = None,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Policy logprobs and entropy of the response tokens, (B, T) each, and values (B, T) from the shared head.

    input_ids/attention_mask: (B, L) = cat(query (B, P) left-padded, response (B, T) right-padded).
    chunk_size: compute logits this many positions at a time (see chunked_logprobs); None: all at once.
    with_values needs model.critic='shared' (the adapter critic runs its own forward: critic_values).
    with_entropy=False: no entropy (None), and none of the (B, T, V) softmax passes it costs.
    """
    if with_values and models.critic != "shared":
        raise ValueError(f"with_values needs the shared critic; critic is {models.critic!r}: use critic_values")
    tokens = input_ids[:, prompt_len:]  # (B, T)
    with use_adapter(models, POLICY):
        hidden = _response_hidden(models, input_ids, attention_mask, prompt_len)  # (B, T, H)
        logprobs, entropy = _logprobs(models, hidden, tokens, temperature, chunk_size, with_entropy)
        values = models.value_head(hidden) if with_values else None
    return logprobs, entropy, values


def critic_values(models: Models, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                  critic_inputs: torch.Tensor | None = None):
    """Values (B, T) of the states before each response token: critic adapter + head, or the shared head.

    critic_inputs: (B, L - 1, H), the base's hidden states entering layer `models.critic_from` at positions 0..L-2 of
    input_ids (B, L) (Rollout.critic_inputs, from the sampler's reference rows). Below that layer the critic is
    the base, so the forward starts there: only the critic's own layers run (pefrl.arch.llama.upper_layers)."""
    if models.value_head is None:
        raise ValueError("these models have no critic (load_models(..., uses_critic=False))")
    if critic_inputs is not None:
        if models.critic_from is None:
            raise ValueError("critic_inputs need a critic on the top layers (model.critic_layers)")
        mask = attention_mask[:, :-1]  # (B, L - 1): the last position predicts nothing a value is read for
        hidden = upper_layers(models.lm, critic_inputs, mask, models.critic_from, CRITIC)  # (B, L - 1, H)
        return models.value_head(hidden[:, prompt_len - 1 :])  # (B, T)
    with use_adapter(models, CRITIC if models.critic == "adapter" else POLICY):
        hidden = _response_hidden(models, input_ids, attention_mask, prompt_len)  # (B, T, H)
        return models.value_head(hidden)


@torch.no_grad()
def reference_logprobs(models: Models, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                       temperature: float, chunk_size: int | None = None) -> torch.Tensor:
    """Reference logprobs (B, T): adapters disabled (the base), or the frozen reference adapter."""
    tokens = input_ids[:, prompt_len:]  # (B, T)
    with use_adapter(models, models.reference):
        hidden = _response_hidden(models, input_ids, attention_mask, prompt_len)  # (B, T, H)
        return _logprobs(models, hidden, tokens, temperature, chunk_size, with_entropy=False)[0]



"""Which sampled completions to train on, and length shaping of their rewards (DAPO, Yu et al. 2025).

Pure functions over per-sequence tensors: B completions, rows [i*k, (i+1)*k) sharing prompt i (k = num_samples),
as `group_advantages` reads them. `lengths` (B,) counts each completion's response tokens (`response_mask.sum(-1)`,
the final EOS included); `finished` (B,) bool says it ended on EOS or a stop string rather than at the length cap.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pefrl.ops.advantages import group_view


def informative_groups(scores: Tensor, num_samples: int, tol: float = 0.0) -> Tensor:
    """(B/k,) bool: True for the prompts whose k scores are not all equal (max - min > tol).

    DAPO's dynamic sampling (section 3.2): a group of identical rewards has zero group-relative advantage on every
    token, so it contributes no gradient and only shrinks the effective batch; DAPO keeps sampling until the batch
    is filled with groups satisfying 0 < #correct < G. Row mask for the batch: `.repeat_interleave(num_samples)`.
    """
    groups = group_view(scores, num_samples)  # (B/k, k)
    return (groups.amax(-1) - groups.amin(-1)) > tol


def frac_reward_zero_std(scores: Tensor, num_samples: int, tol: float = 0.0) -> Tensor:
    """Share of prompts whose k scores are all equal (zero spread: no learning signal); a scalar tensor.
    The same quantity TRL logs as frac_reward_zero_std; dynamic sampling drives it to 0."""
    return 1.0 - informative_groups(scores, num_samples, tol).float().mean()


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int, penalty_factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment R_length (eq. 13), (B,) floats to add to the task reward:

        0                                    if |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
        -1                                   if |y| > L_max

    times penalty_factor. The penalty grows linearly over the last cache_len tokens before max_len, so a long
    answer is told "too long" gradually instead of being scored as wrong. max_len is L_max, the generation cap
    (rollout.max_new_tokens); DAPO uses L_max = 20480 and L_cache = 4096 (an expected length of 16384).
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    excess = (max_len - cache_len - lengths.to(torch.float32)) / cache_len  # (B,); > 0 inside the safe length
    return penalty_factor * excess.clamp(min=-1.0, max=0.0)


def mask_truncated(response_mask: Tensor, finished: Tensor) -> Tensor:
    """(B, T) response_mask with the rows of truncated completions (finished False) zeroed.

    DAPO's overlong filtering (section 3.4): a completion cut off at the length cap gets a reward that says
    nothing about its reasoning, so its tokens are masked out of the loss instead of being punished.
    """
    return response_mask * finished.to(response_mask.dtype).unsqueeze(-1)  # (B, 1) broadcast over T

"""Policy and value losses over (B, T) response tokens, and how per-token terms are averaged into a scalar.

Every loss takes `response_mask` (B, T) and ignores masked positions entirely (also NaN/inf there). Stats are
detached tensors for logging.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pefrl.ops.advantages import masked_mean

AGGREGATIONS = ("token_mean", "sequence_mean", "fixed_length")


def aggregate(per_token: Tensor, response_mask: Tensor, mode: str, max_len: int) -> Tensor:
    """Reduce a (B, T) per-token term to a scalar.

    'token_mean':    sum / number of valid tokens; every token weighs alike (long answers weigh more).
    'sequence_mean': mean over each row's valid tokens, then over rows that have any (GRPO as in Shao et al.
                     2024); every sequence weighs alike, so tokens of short answers weigh more.
    'fixed_length':  sum / (B * max_len), a constant normaliser with no length bias (Dr. GRPO, Liu et al. 2025).
                     `max_len` is rollout.max_new_tokens, not T (the longest response in this batch).
    """
    x = torch.where(response_mask > 0, per_token, 0.0) * response_mask  # (B, T)
    if mode == "token_mean":
        return x.sum() / response_mask.sum().clamp(min=1.0)
    if mode == "sequence_mean":
        lengths = response_mask.sum(-1)  # (B,)
        per_row = x.sum(-1) / lengths.clamp(min=1.0)  # (B,)
        return per_row.sum() / (lengths > 0).sum().clamp(min=1)
    if mode == "fixed_length":
        return x.sum() / (per_token.shape[0] * max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}; valid: {list(AGGREGATIONS)}")


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_range: float,
    aggregation: str,
    max_len: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token: max(-A r, -A clip(r, 1-c, 1+c)).

    r = exp(logprobs - old_logprobs), where old_logprobs are the behaviour logprobs recorded at generation
    (importance-sampling correction when sampling was not from the policy, e.g. epsilon-greedy).
    Stats: clipfrac (share of tokens where the clipped term is the active one: ratio outside [1-c, 1+c] on the
    side the advantage pushes toward), approx_kl (k3 estimate of KL(old || new): (r - 1) - log r, Schulman 2020,
    as in CleanRL's ppo.py), ratio_mean.
    """
    log_ratio = (logprobs - old_logprobs) * response_mask  # (B, T); masked first so exp never sees padding
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = aggregate(torch.maximum(unclipped, clipped), response_mask, aggregation, max_len)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), response_mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, response_mask),
            "ratio_mean": masked_mean(ratio, response_mask),
        }
    return loss, stats


def policy_gradient_loss(
    logprobs: Tensor, advantages: Tensor, response_mask: Tensor, aggregation: str, max_len: int,
    behaviour_logprobs: Tensor | None = None,
) -> Tensor:
    """Vanilla policy gradient -A * log pi (Williams 1992; A2C, REINFORCE): no ratio in the loss, no clipping.

    behaviour_logprobs (sampling from mu != pi, e.g. epsilon-greedy): each token's term is weighted by the
    detached importance ratio pi / mu, since E_mu[(pi / mu) A grad log pi] = E_pi[A grad log pi] (per-token
    ratios, as PPO's). On-policy the weight is exp(0) = 1 and the gradient is unchanged."""
    weight = 1.0
    if behaviour_logprobs is not None:
        weight = torch.exp((logprobs.detach() - behaviour_logprobs) * response_mask)  # (B, T)
    return aggregate(-weight * advantages.detach() * logprobs, response_mask, aggregation, max_len)


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2), mean over valid tokens.

    Value clipping as in the PPO baselines and lm-human-preferences. clip_range = 0 means no clipping: plain
    0.5 * MSE. Stats: vf_clipfrac (share of tokens where the clipped error is the larger one).
    """
    returns = returns.detach()
    unclipped = (values - returns).square()  # (B, T)
    if clip_range <= 0:
        zero = torch.zeros((), device=values.device)
        return 0.5 * masked_mean(unclipped, response_mask), {"vf_clipfrac": zero}
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    clipped = (v_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), response_mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((clipped > unclipped).float(), response_mask)
    return loss, {"vf_clipfrac": vf_clipfrac}


def entropy_bonus(entropy: Tensor, response_mask: Tensor, aggregation: str, max_len: int) -> Tensor:
    """Aggregated per-token policy entropy (B, T) from the caller; losses subtract entropy_coef times this."""
    return aggregate(entropy, response_mask, aggregation, max_len)

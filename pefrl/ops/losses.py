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


def _clipped_surrogate(
    ratio: Tensor, advantages: Tensor, response_mask: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) (B, T), and the shares of valid tokens where
    the clipped term is the active one: clipfrac_high (A > 0, r > 1 + clip_high), clipfrac_low (A < 0,
    r < 1 - clip_low), clipfrac (both). A token with its clipped term active has zero gradient."""
    advantages = advantages.detach()
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    with torch.no_grad():
        active = clipped > unclipped  # (B, T)
        stats = {
            "clipfrac": masked_mean(active.float(), response_mask),
            "clipfrac_low": masked_mean((active & (ratio < 1.0)).float(), response_mask),
            "clipfrac_high": masked_mean((active & (ratio > 1.0)).float(), response_mask),
        }
    return torch.maximum(unclipped, clipped), stats


def _ratio_stats(ratio: Tensor, log_ratio: Tensor, response_mask: Tensor) -> dict[str, Tensor]:
    """approx_kl: k3 estimate of KL(old || new), (r - 1) - log r (Schulman 2020, as in CleanRL's ppo.py);
    ratio_mean. Both over valid tokens, detached."""
    with torch.no_grad():
        return {
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, response_mask),
            "ratio_mean": masked_mean(ratio, response_mask),
        }


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_range: float,
    aggregation: str,
    max_len: int,
    *,
    clip_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token: max(-A r, -A clip(r, 1-c, 1+c)).

    All tensors (B, T). r = exp(logprobs - old_logprobs), where old_logprobs are the behaviour logprobs recorded at
    generation (importance-sampling correction when sampling was not from the policy, e.g. epsilon-greedy).
    clip_high (DAPO's clip-higher, Yu et al. 2025, section 3.1): the upper bound becomes 1 + clip_high while the lower
    stays 1 - clip_range, so a token with A > 0 can gain more probability before its gradient stops; DAPO uses
    clip_range 0.2, clip_high 0.28. None: symmetric, 1 + clip_range.
    Stats: clipfrac (share of tokens where the clipped term is the active one: ratio outside the range on the
    side the advantage pushes toward), clipfrac_low / clipfrac_high (that share split by side), approx_kl (k3 of
    KL(old || new)), ratio_mean.
    """
    log_ratio = (logprobs - old_logprobs) * response_mask  # (B, T); masked first so exp never sees padding
    ratio = torch.exp(log_ratio)
    high = clip_range if clip_high is None else clip_high
    per_token, stats = _clipped_surrogate(ratio, advantages, response_mask, clip_range, high)
    loss = aggregate(per_token, response_mask, aggregation, max_len)
    return loss, {**stats, **_ratio_stats(ratio, log_ratio, response_mask)}


def gspo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    aggregation: str,
    max_len: int,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): the clipped surrogate on one importance
    ratio per sequence, s_i = exp(mean_t (logprobs - old_logprobs)) (eq. 7: the length-normalised sequence
    likelihood ratio, a geometric mean of the token ratios). All tensors (B, T).

    Written as GSPO-token (eq. 13-14): s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)], whose value is s_i on every
    token and whose gradient is s_i * grad log pi(y_t). With one advantage per sequence (GRPO's, broadcast to the
    tokens) and aggregation 'sequence_mean' (the paper's 1/G sum_i) it equals GSPO's eq. 5 in value and gradient:
    d s_i / d logprob_t = s_i / |y_i|. Per-token advantages give GSPO-token. Clipping is per sequence: when s_i
    leaves [1 - clip_low, 1 + clip_high] on the advantage's side, every token of the sequence loses its gradient.
    The ranges are tiny because s_i is a per-token geometric mean: the paper's experiments use 3e-4 / 4e-4.
    Stats: clipfrac / clipfrac_low / clipfrac_high (share of valid tokens, as the paper reports them), approx_kl
    (k3 over the token ratios), ratio_mean (mean over sequences of s_i).
    """
    token_log_ratio = (logprobs - old_logprobs) * response_mask  # (B, T)
    seq_log_ratio = masked_mean(token_log_ratio, response_mask, dim=-1)  # (B,): log s_i
    log_ratio = seq_log_ratio.detach().unsqueeze(-1) + logprobs - logprobs.detach()  # (B, T), value log s_i
    ratio = torch.exp(log_ratio * response_mask)
    per_token, stats = _clipped_surrogate(ratio, advantages, response_mask, clip_low, clip_high)
    loss = aggregate(per_token, response_mask, aggregation, max_len)
    with torch.no_grad():
        has_tokens = (response_mask.sum(-1) > 0).float()  # (B,)
        stats["ratio_mean"] = masked_mean(torch.exp(seq_log_ratio), has_tokens)
        stats["approx_kl"] = _ratio_stats(torch.exp(token_log_ratio), token_log_ratio, response_mask)["approx_kl"]
    return loss, stats


def cispo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_high: float,
    aggregation: str,
    max_len: int,
    *,
    clip_low: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, 2025, eq. 4-5), per token: -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * logprobs.

    All tensors (B, T); r = exp(logprobs - old_logprobs). The importance weight is clipped and detached instead
    of the update: the gradient of every token is w * A * grad log pi with w <= 1 + clip_high, never zero, so
    rare high-ratio tokens (the paper's "However", "Recheck") keep contributing; PPO's clip drops them after
    the first update. clip_low None: no lower bound (the paper sets eps_low "to a large value" and tunes only
    eps_high). The paper aggregates as 'token_mean' (1 / sum_i |o_i|).
    Stats: clipfrac (share of valid tokens whose weight was clipped, either side), approx_kl, ratio_mean.
    """
    log_ratio = (logprobs.detach() - old_logprobs) * response_mask  # (B, T)
    ratio = torch.exp(log_ratio)
    low = 0.0 if clip_low is None else 1.0 - clip_low
    weight = torch.clamp(ratio, low, 1.0 + clip_high)  # (B, T), no grad: logprobs was detached above
    loss = aggregate(-weight * advantages.detach() * logprobs, response_mask, aggregation, max_len)
    stats = _ratio_stats(ratio, log_ratio, response_mask)
    stats["clipfrac"] = masked_mean((weight != ratio).float(), response_mask)
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

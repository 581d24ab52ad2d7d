"""Masked statistics, per-token rewards, GAE, reward-to-go and group baselines.

Conventions: B sequences, T response tokens, right-padded; `response_mask` (B, T) is 1.0 on real response tokens
(the final EOS included) and 0.0 after. Every function returns 0 at masked positions so padding never leaks into
a loss or a statistic. Whitening is always a separate call (never hidden inside `gae`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over positions where mask is 1 (over `dim`, or over everything). An empty mask gives 0."""
    x = torch.where(mask > 0, x, 0.0)  # a NaN/inf at a padded position must not poison the sum
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all masked-in positions (scalar). Unbiased (n - 1) by default; 0 for n <= 1."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)  # Bessel's correction
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked-in positions of the whole batch; 0 outside the mask.

    shift_mean=False only rescales (the mean is added back), as lm-human-preferences does for rewards.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask > 0, out, 0.0)


def last_token_index(response_mask: Tensor) -> Tensor:
    """(B,) index of each row's last valid token; 0 for a row with none (check `response_mask.sum(-1)`)."""
    T = response_mask.shape[-1]
    positions = torch.arange(T, device=response_mask.device)  # (T,)
    return ((response_mask > 0) * positions).amax(-1)  # (B,); works for any mask, not only right-padded


def token_rewards(scores: Tensor, kl: Tensor, kl_coef: float, response_mask: Tensor) -> Tensor:
    """Per-token rewards (B, T): -kl_coef * kl on every valid token, plus the sequence score on its last one.

    Ziegler et al. 2019: R(x, y) = r(x, y) - beta * KL, with the KL spread over tokens and the score arriving at
    the end of the episode. `kl` is a per-token estimate (see ops.kl.kl_estimate). A row with no valid token gets
    all-zero rewards: its score is dropped (there is no action to credit it to).
    """
    rewards = -kl_coef * torch.where(response_mask > 0, kl, 0.0)  # (B, T)
    last = last_token_index(response_mask)  # (B,)
    has_tokens = (response_mask.sum(-1) > 0).to(rewards.dtype)  # (B,)
    bonus = (scores.to(rewards.dtype) * has_tokens).unsqueeze(-1)  # (B, 1)
    return rewards.scatter_add(-1, last.unsqueeze(-1), bonus)


def gae(rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016). Returns (advantages, returns), both (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}, run backwards as in
    lm-human-preferences (train_policy.py). The step after a row's last valid token is terminal: V = 0, A = 0,
    so padding never bootstraps. returns = advantages + values (the value target). Masked positions are 0.
    A masked position between valid tokens (an environment's observation in a multi-turn episode, pefrl/envs.py)
    is skipped, not terminal: the turn before it bootstraps from the next valid token, so the final reward
    reaches every turn.
    """
    mask = response_mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask  # (B, T)
    B, T = rewards.shape
    next_adv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # (B,)
    next_value = torch.zeros_like(next_adv)
    reversed_adv = []
    for t in reversed(range(T)):
        valid = mask[:, t] > 0  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        # a masked step carries the next valid step's advantage and value through, unchanged; after the last
        # valid token both are still their initial 0: terminal
        next_adv = torch.where(valid, adv, next_adv)
        next_value = torch.where(valid, values[:, t], next_value)
        reversed_adv.append(adv * mask[:, t])
    advantages = torch.stack(reversed_adv[::-1], dim=1)  # (B, T)
    return advantages, (advantages + values) * mask


def discounted_returns(rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go G_t = sum_{s >= t} gamma^(s - t) r_s over the valid tokens; (B, T), 0 when masked.
    s counts valid tokens only: masked positions between them (observations) are skipped, not terminal."""
    mask = response_mask.to(rewards.dtype)
    rewards = rewards * mask
    B, T = rewards.shape
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # (B,)
    reversed_returns = []
    for t in reversed(range(T)):
        running = torch.where(mask[:, t] > 0, rewards[:, t] + gamma * running, running)
        reversed_returns.append(running * mask[:, t])
    return torch.stack(reversed_returns[::-1], dim=1)  # (B, T)


def group_view(scores: Tensor, num_samples: int) -> Tensor:
    """(B,) per-sequence values -> (B/k, k), row i holding prompt i's k = num_samples samples (rows [i*k, (i+1)*k)
    of the batch). Raises unless k >= 2 and k divides B: a group of one has no baseline and no spread."""
    B, k = scores.shape[0], num_samples
    if k < 2:
        raise ValueError(f"group baselines need num_samples >= 2, got {k}")
    if B % k:
        raise ValueError(f"batch of {B} sequences is not a whole number of groups of num_samples={k}")
    return scores.reshape(B // k, k)  # (B/k, k)


def group_advantages(
    scores: Tensor, num_samples: int, mode: str, scale_by_std: bool = True, eps: float = 1e-4
) -> Tensor:
    """Sequence advantages (B,) from a per-prompt group baseline; rows [i*k, (i+1)*k) share prompt i.

    'rloo': A_i = r_i - mean_{j != i} r_j, the leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024).
    'grpo': A_i = (r_i - mean_g) / (std_g + eps) (Shao et al. 2024, DeepSeekMath). std_g is the UNBIASED group
        std (n - 1), as torch.std and TRL's GRPOTrainer compute it. scale_by_std=False skips the division
        (Dr. GRPO, Liu et al. 2025: the std favours prompts that are too easy or too hard).
    A group of identical scores gives advantage 0 in both modes.
    """
    B, k = scores.shape[0], num_samples
    groups = group_view(scores, num_samples)  # (B/k, k)
    if mode == "rloo":
        baseline = (groups.sum(-1, keepdim=True) - groups) / (k - 1)  # (B/k, k): mean of the other k-1
        return (groups - baseline).reshape(B)
    if mode == "grpo":
        centred = groups - groups.mean(-1, keepdim=True)  # (B/k, k)
        if scale_by_std:
            centred = centred / (groups.std(-1, keepdim=True) + eps)
        return centred.reshape(B)
    raise ValueError(f"unknown group advantage mode {mode!r}; valid: ['rloo', 'grpo']")

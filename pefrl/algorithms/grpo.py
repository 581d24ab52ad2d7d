"""GRPO (Shao et al. 2024): group-normalised scores as advantages, k3 KL to the reference as a loss term."""

from __future__ import annotations

import torch

from pefrl.algorithms.base import Algorithm, clip_bounds, RolloutBatch, Targets, broadcast, common_stats, target_stats
from pefrl.config import RLConfig
from pefrl.ops.advantages import group_advantages, token_rewards
from pefrl.ops.kl import kl_estimate
from pefrl.ops.losses import aggregate, clipped_policy_loss, entropy_bonus


def grpo_targets(batch: RolloutBatch, cfg: RLConfig, kl_coef: float, state: dict) -> Targets:
    """GRPO (Shao et al. 2024): group-normalised scores as every token's advantage; no KL in the reward."""
    mask = batch.response_mask
    seq_adv = group_advantages(batch.scores, batch.num_samples, "grpo", scale_by_std=cfg.scale_by_std)  # (B,)
    advantages = broadcast(seq_adv, mask)
    rewards = token_rewards(batch.scores, torch.zeros_like(mask), 0.0, mask)  # score on the last token only
    stats = target_stats(advantages, rewards, mask, 0.0, torch.zeros_like(mask))
    return Targets(advantages=advantages, returns=None, rewards=rewards, stats=stats)


def grpo_loss(mb, new_logprobs, new_values, entropy, cfg: RLConfig, kl_coef: float, max_len: int):
    """Clipped policy loss + kl_coef * k3 KL(new || ref) as a loss term (DeepSeekMath eq. 3-4)."""
    mask = mb["response_mask"]
    low, high = clip_bounds(cfg, 0.2)  # symmetric unless rl.clip_range_high is set
    pg_loss, pg_stats = clipped_policy_loss(new_logprobs, mb["logprobs"], mb["advantages"], mask, low,
                                            cfg.loss_aggregation, max_len, clip_high=high)
    return with_kl_term(mb, new_logprobs, entropy, cfg, kl_coef, max_len, pg_loss, pg_stats)


def with_kl_term(mb, new_logprobs, entropy, cfg: RLConfig, kl_coef: float, max_len: int, pg_loss, pg_stats):
    """pg_loss + kl_coef * k3 KL(new || ref) - entropy_coef * entropy, and the loss's stats (GRPO and its 2025
    variants). Always k3 whatever cfg.kl_estimator says: its gradient is a KL gradient, while k1's in a loss only
    lowers sampled logprobs."""
    mask = mb["response_mask"]
    kl = kl_estimate(new_logprobs, mb["ref_logprobs"], "k3")  # (B, T), grad flows to new_logprobs
    kl_term = aggregate(kl, mask, cfg.loss_aggregation, max_len)
    ent = entropy_bonus(entropy, mask, cfg.loss_aggregation, max_len)
    loss = pg_loss + kl_coef * kl_term - cfg.entropy_coef * ent
    stats = {"policy_loss": pg_loss.detach(), "kl_loss": kl_term.detach(), **pg_stats}
    return loss, {**common_stats(mb, new_logprobs, ent), **stats}


ALGORITHM = Algorithm("grpo", uses_critic=False, single_update=False, kl_in_reward=False, targets=grpo_targets,
                      loss=grpo_loss, needs_groups=True)

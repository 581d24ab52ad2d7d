"""RLOO (Ahmadian et al. 2024): leave-one-out baseline over the k samples of a prompt, clipped policy loss."""

from __future__ import annotations

from pefrl.algorithms.base import Algorithm, clip_bounds, RolloutBatch, Targets, broadcast, common_stats, target_stats, token_kl
from pefrl.config import RLConfig
from pefrl.ops.advantages import group_advantages, token_rewards
from pefrl.ops.losses import clipped_policy_loss, entropy_bonus


def rloo_targets(batch: RolloutBatch, cfg: RLConfig, kl_coef: float, state: dict) -> Targets:
    """RLOO (Ahmadian et al. 2024): sequence reward score - kl_coef * sum_t kl_t, leave-one-out baseline over the
    k samples of a prompt, one advantage per sequence broadcast to its tokens (as TRL's RLOOTrainer)."""
    mask = batch.response_mask
    kl = token_kl(batch, cfg)
    seq_rewards = batch.scores - kl_coef * kl.sum(-1)  # (B,)
    advantages = broadcast(group_advantages(seq_rewards, batch.num_samples, "rloo"), mask)
    rewards = token_rewards(batch.scores, kl, kl_coef, mask)  # same sequence sums, for logging
    return Targets(advantages=advantages, returns=None, rewards=rewards,
                   stats=target_stats(advantages, rewards, mask, kl_coef, kl))


def clipped_pg_loss_fn(mb, new_logprobs, new_values, entropy, cfg: RLConfig, kl_coef: float, max_len: int):
    """PPO-clipped policy loss without a critic (RLOO, REINFORCE++)."""
    mask = mb["response_mask"]
    low, high = clip_bounds(cfg, 0.2)  # Schulman et al. 2017's epsilon
    pg_loss, pg_stats = clipped_policy_loss(new_logprobs, mb["logprobs"], mb["advantages"], mask, low,
                                            cfg.loss_aggregation, max_len, clip_high=high)
    ent = entropy_bonus(entropy, mask, cfg.loss_aggregation, max_len)
    loss = pg_loss - cfg.entropy_coef * ent
    return loss, {**common_stats(mb, new_logprobs, ent), "policy_loss": pg_loss.detach(), **pg_stats}


ALGORITHM = Algorithm("rloo", uses_critic=False, single_update=False, kl_in_reward=True, targets=rloo_targets,
                      loss=clipped_pg_loss_fn, needs_groups=True)

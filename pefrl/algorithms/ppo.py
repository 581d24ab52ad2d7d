"""PPO (Schulman et al. 2017) as in Ziegler et al. 2019: KL-shaped token rewards, GAE on a critic, clipped
policy and value losses, rl.epochs x minibatches per rollout."""

from __future__ import annotations

from pefrl.algorithms.base import Algorithm, clip_bounds, RolloutBatch, Targets, common_stats, target_stats, token_kl
from pefrl.config import RLConfig
from pefrl.ops.advantages import gae, masked_mean, token_rewards, whiten
from pefrl.ops.losses import clipped_policy_loss, clipped_value_loss, entropy_bonus


def gae_targets(batch: RolloutBatch, cfg: RLConfig, kl_coef: float, state: dict) -> Targets:
    """Ziegler et al. 2019 / lm-human-preferences: token rewards with per-token KL, GAE on the critic's values."""
    if batch.values is None:
        raise ValueError("GAE targets need critic values (batch.values is None)")
    mask = batch.response_mask
    kl = token_kl(batch, cfg)  # (B, T)
    rewards = token_rewards(batch.scores, kl, kl_coef, mask)  # (B, T)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)  # rescale only: the sign of a reward carries meaning
    advantages, returns = gae(rewards, batch.values, mask, cfg.gamma, cfg.lam)  # returns from raw advantages
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)
    stats = target_stats(advantages, rewards, mask, kl_coef, kl)
    stats["returns_mean"] = masked_mean(returns, mask).item()
    stats["values_mean"] = masked_mean(batch.values, mask).item()
    return Targets(advantages=advantages, returns=returns, rewards=rewards, stats=stats)


def ppo_loss(mb, new_logprobs, new_values, entropy, cfg: RLConfig, kl_coef: float, max_len: int):
    mask = mb["response_mask"]
    low, high = clip_bounds(cfg, 0.2)  # Schulman et al. 2017's epsilon
    pg_loss, pg_stats = clipped_policy_loss(new_logprobs, mb["logprobs"], mb["advantages"], mask, low,
                                            cfg.loss_aggregation, max_len, clip_high=high)
    vf_loss, vf_stats = clipped_value_loss(new_values, mb["values"], mb["returns"], mask, cfg.value_clip_range)
    ent = entropy_bonus(entropy, mask, cfg.loss_aggregation, max_len)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * ent
    stats = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), **pg_stats, **vf_stats}
    return loss, {**common_stats(mb, new_logprobs, ent), **stats}


ALGORITHM = Algorithm("ppo", uses_critic=True, single_update=False, kl_in_reward=True, targets=gae_targets,
                      loss=ppo_loss)

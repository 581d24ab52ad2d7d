"""REINFORCE++ (Hu 2025): KL-shaped reward-to-go whitened over the batch, clipped policy loss."""

from __future__ import annotations

from pefrl.algorithms.base import Algorithm, RolloutBatch, Targets, target_stats, token_kl
from pefrl.algorithms.rloo import clipped_pg_loss_fn
from pefrl.config import RLConfig
from pefrl.ops.advantages import discounted_returns, token_rewards, whiten


def reinforce_pp_targets(batch: RolloutBatch, cfg: RLConfig, kl_coef: float, state: dict) -> Targets:
    """REINFORCE++ (Hu 2025): A_t = r(x, y) - kl_coef * sum_{s >= t} KL_s (reward-to-go with gamma), then
    normalised by the mean and std over ALL tokens of the batch (global, not per group)."""
    mask = batch.response_mask
    kl = token_kl(batch, cfg)
    rewards = token_rewards(batch.scores, kl, kl_coef, mask)
    returns = discounted_returns(rewards, mask, cfg.gamma)  # (B, T)
    advantages = whiten(returns, mask)
    return Targets(advantages=advantages, returns=None, rewards=rewards,
                   stats=target_stats(advantages, rewards, mask, kl_coef, kl))


ALGORITHM = Algorithm("reinforce_pp", uses_critic=False, single_update=False, kl_in_reward=True,
                      targets=reinforce_pp_targets, loss=clipped_pg_loss_fn)

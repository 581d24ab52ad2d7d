"""A2C (Mnih et al. 2016): PPO's targets, an unclipped loss, one on-policy step per rollout."""

from __future__ import annotations

from pefrl.algorithms.base import Algorithm, approx_kl, common_stats
from pefrl.algorithms.ppo import gae_targets
from pefrl.config import RLConfig
from pefrl.ops.losses import clipped_value_loss, entropy_bonus, policy_gradient_loss


def a2c_loss(mb, new_logprobs, new_values, entropy, cfg: RLConfig, kl_coef: float, max_len: int):
    """Advantage actor-critic (Mnih et al. 2016): -A log pi + vf_coef * 0.5 (V - R)^2; one on-policy step."""
    mask = mb["response_mask"]
    pg_loss = policy_gradient_loss(new_logprobs, mb["advantages"], mask, cfg.loss_aggregation, max_len,
                                   behaviour_logprobs=mb["logprobs"])
    vf_loss, _ = clipped_value_loss(new_values, mb["values"], mb["returns"], mask, clip_range=0.0)
    ent = entropy_bonus(entropy, mask, cfg.loss_aggregation, max_len)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * ent
    stats = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), **approx_kl(new_logprobs, mb)}
    return loss, {**common_stats(mb, new_logprobs, ent), **stats}


ALGORITHM = Algorithm("a2c", uses_critic=True, single_update=True, kl_in_reward=True, targets=gae_targets,
                      loss=a2c_loss)

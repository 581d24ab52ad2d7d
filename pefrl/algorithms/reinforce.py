"""REINFORCE (Williams 1992) with a moving-average baseline; one on-policy step per rollout."""

from __future__ import annotations

from pefrl.algorithms.base import Algorithm, RolloutBatch, Targets, approx_kl, common_stats, target_stats, token_kl
from pefrl.config import RLConfig
from pefrl.ops.advantages import discounted_returns, token_rewards
from pefrl.ops.losses import entropy_bonus, policy_gradient_loss


def reinforce_targets(batch: RolloutBatch, cfg: RLConfig, kl_coef: float, state: dict) -> Targets:
    """REINFORCE (Williams 1992) with a moving-average baseline b of the mean sequence return.

    A_t = G_t - b, G_t the KL-shaped reward-to-go. This batch uses b from BEFORE it (the first batch's b is its
    own mean return): b must not depend on this batch's actions for the gradient to stay unbiased, and the
    first batch has nothing better. Then b <- decay * b + (1 - decay) * mean return, kept in state['baseline'].
    whiten_advantages is not applied: a batch-mean shift would replace the baseline this algorithm is about.
    """
    mask = batch.response_mask
    kl = token_kl(batch, cfg)
    rewards = token_rewards(batch.scores, kl, kl_coef, mask)  # (B, T)
    returns = discounted_returns(rewards, mask, cfg.gamma)  # (B, T)
    mean_return = returns[:, 0].mean().item()  # G_0 is the whole (discounted) sequence return
    baseline = float(state.get("baseline", mean_return))
    advantages = (returns - baseline) * mask
    state["baseline"] = cfg.baseline_decay * baseline + (1.0 - cfg.baseline_decay) * mean_return
    stats = target_stats(advantages, rewards, mask, kl_coef, kl)
    stats["baseline"] = baseline
    return Targets(advantages=advantages, returns=None, rewards=rewards, stats=stats)


def pg_loss_fn(mb, new_logprobs, new_values, entropy, cfg: RLConfig, kl_coef: float, max_len: int):
    """-A log pi - entropy bonus (REINFORCE)."""
    mask = mb["response_mask"]
    pg_loss = policy_gradient_loss(new_logprobs, mb["advantages"], mask, cfg.loss_aggregation, max_len,
                                   behaviour_logprobs=mb["logprobs"])
    ent = entropy_bonus(entropy, mask, cfg.loss_aggregation, max_len)
    loss = pg_loss - cfg.entropy_coef * ent
    stats = {"policy_loss": pg_loss.detach(), **approx_kl(new_logprobs, mb)}
    return loss, {**common_stats(mb, new_logprobs, ent), **stats}


ALGORITHM = Algorithm("reinforce", uses_critic=False, single_update=True, kl_in_reward=True,
                      targets=reinforce_targets, loss=pg_loss_fn)

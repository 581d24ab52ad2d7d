"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071): GRPO's group advantages with
one importance ratio per sequence, s_i = exp(mean_t log(pi / pi_old)), clipped per sequence (eq. 5-7). The
published clip ranges are tiny (3e-4 low, 4e-4 high, section 5.1) because s_i is a per-token geometric mean;
the paper averages over sequences (rl.loss_aggregation sequence_mean) and has no KL term (rl.kl_coef 0)."""

from __future__ import annotations

from pefrl.algorithms.base import Algorithm, clip_bounds
from pefrl.algorithms.grpo import grpo_targets, with_kl_term
from pefrl.config import RLConfig
from pefrl.ops.losses import gspo_policy_loss

CLIP_LOW, CLIP_HIGH = 3e-4, 4e-4  # GSPO section 5.1


def gspo_loss(mb, new_logprobs, new_values, entropy, cfg: RLConfig, kl_coef: float, max_len: int):
    low, high = clip_bounds(cfg, CLIP_LOW, CLIP_HIGH)
    pg_loss, pg_stats = gspo_policy_loss(new_logprobs, mb["logprobs"], mb["advantages"], mb["response_mask"],
                                         cfg.loss_aggregation, max_len, clip_low=low, clip_high=high)
    return with_kl_term(mb, new_logprobs, entropy, cfg, kl_coef, max_len, pg_loss, pg_stats)


ALGORITHM = Algorithm("gspo", uses_critic=False, single_update=False, kl_in_reward=False, targets=grpo_targets,
                      loss=gspo_loss, needs_groups=True)

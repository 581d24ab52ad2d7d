"""DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv 2503.14476):
GRPO's group advantages and clipped loss with clip-higher (section 3.1: eps_low 0.2, eps_high 0.28), a token-level
mean (3.3, rl.loss_aggregation token_mean) and dynamic sampling (3.2, on by default: rl.dynamic_sampling, done
by the loop, pefrl/sampling_loop.py). Overlong filtering / shaping (3.4) are rl.overlong_* for any algorithm.
DAPO drops the KL term (section 2.3); the recipe sets rl.kl_coef 0, and a nonzero one adds GRPO's k3 term."""

from __future__ import annotations

from pefrl.algorithms.base import Algorithm, clip_bounds
from pefrl.algorithms.grpo import grpo_targets, with_kl_term
from pefrl.config import RLConfig
from pefrl.ops.losses import clipped_policy_loss

CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # DAPO section 3.1 / 5.1


def dapo_loss(mb, new_logprobs, new_values, entropy, cfg: RLConfig, kl_coef: float, max_len: int):
    """Clip-higher surrogate, max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) per token (DAPO eq. 10)."""
    low, high = clip_bounds(cfg, CLIP_LOW, CLIP_HIGH)
    pg_loss, pg_stats = clipped_policy_loss(new_logprobs, mb["logprobs"], mb["advantages"], mb["response_mask"],
                                            low, cfg.loss_aggregation, max_len, clip_high=high)
    return with_kl_term(mb, new_logprobs, entropy, cfg, kl_coef, max_len, pg_loss, pg_stats)


ALGORITHM = Algorithm("dapo", uses_critic=False, single_update=False, kl_in_reward=False, targets=grpo_targets,
                      loss=dapo_loss, needs_groups=True, dynamic_sampling=True)

"""CISPO (MiniMax 2025, "MiniMax-M1", arXiv 2506.13585, eq. 4-5): GRPO's group advantages on a REINFORCE token
loss weighted by the clipped, detached importance ratio, -sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi, so
no token's gradient is dropped. Published: no lower bound (eps_low "set to a large value"), token-level mean, no
KL term; the report tunes eps_high without giving a value: 0.28 here, DAPO's, as Trinity-RFT's CISPO default."""

from __future__ import annotations

from pefrl.algorithms.base import Algorithm, clip_bounds
from pefrl.algorithms.grpo import grpo_targets, with_kl_term
from pefrl.config import RLConfig
from pefrl.ops.losses import cispo_policy_loss

CLIP_LOW, CLIP_HIGH = None, 0.28  # None: no lower bound on the weight (MiniMax-M1 section 3.1)


def cispo_loss(mb, new_logprobs, new_values, entropy, cfg: RLConfig, kl_coef: float, max_len: int):
    low, high = clip_bounds(cfg, CLIP_LOW, CLIP_HIGH)
    pg_loss, pg_stats = cispo_policy_loss(new_logprobs, mb["logprobs"], mb["advantages"], mb["response_mask"],
                                          high, cfg.loss_aggregation, max_len, clip_low=low)
    return with_kl_term(mb, new_logprobs, entropy, cfg, kl_coef, max_len, pg_loss, pg_stats)


ALGORITHM = Algorithm("cispo", uses_critic=False, single_update=False, kl_in_reward=False, targets=grpo_targets,
                      loss=cispo_loss, needs_groups=True)

"""What every algorithm is made of: the batch it reads, the targets it returns, its capability flags, and
the statistics shared by the losses. Pure functions over tensors; no model, no trainer state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pefrl.config import RLConfig
from pefrl.ops.advantages import masked_mean
from pefrl.ops.kl import kl_estimate


@dataclass
class RolloutBatch:
    """What the trainer hands over after generation and scoring (no grad)."""

    response_mask: Tensor  # (B, T)
    logprobs: Tensor  # (B, T) behaviour / old-policy logprobs of the sampled tokens
    ref_logprobs: Tensor  # (B, T)
    scores: Tensor  # (B,) sequence reward from reward functions / model
    values: Tensor | None  # (B, T) critic values; None for critic-free algorithms
    num_samples: int  # k: rows [i*k, (i+1)*k) share prompt i
    # (B, T) the policy's own logprobs when sampling was NOT from it (epsilon-greedy: `logprobs` then holds the
    # behaviour mixture's, for the ratio); None when they equal `logprobs`. The KL to the reference reads these.
    policy_logprobs: Tensor | None = None
    entropy: Tensor | None = None  # (B, T) the sampling policy's entropy per token, for the step's log
    # (B, T) the critic adapter's values WITH their graph, when the update's one pass covers the rollout
    # (scoring.score_rollout); the update's first micro-batch uses them instead of a second critic forward
    values_graph: Tensor | None = None


@dataclass
class Targets:
    advantages: Tensor  # (B, T)
    returns: Tensor | None  # (B, T) value targets (critic algorithms), else None
    rewards: Tensor  # (B, T) per-token rewards actually used (for logging)
    stats: dict[str, float]


TargetsFn = Callable[[RolloutBatch, RLConfig, float, dict], Targets]
LossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class Algorithm:
    """One RL algorithm: its two functions and the capability flags the loop, the config and FSDP read
    (nothing else looks at its name)."""

    name: str
    uses_critic: bool  # a value function: the run loads a critic (model.critic) and the batch carries values
    single_update: bool  # exactly one optimizer step per rollout batch over the whole batch (on-policy PG)
    kl_in_reward: bool  # KL penalty shaped into the rewards (else, if any, a loss term)
    targets: TargetsFn  # (batch, cfg, kl_coef, state) -> Targets; state: JSON-able dict the trainer checkpoints
    loss: LossFn  # (mb, new_logprobs, new_values, entropy, cfg, kl_coef, max_len) -> (loss, stats)
    needs_groups: bool = False  # a group baseline over rollout.num_samples >= 2 samples of each prompt
    fsdp_ok: bool = True  # runs on an FSDP-sharded base
    # the default of rl.dynamic_sampling: refill the batch with prompts whose rewards differ (DAPO)
    dynamic_sampling: bool = False
    # Replaces the default epochs x minibatches update (e.g. a natural-gradient step):
    # update(models, updater, batch, targets, cfg, kl_coef, rollout) -> stats, `updater` the loop's narrow
    # optimizer service (pefrl/updater.py). None: the default loop with `loss`.
    update: Callable[..., dict[str, float]] | None = None


def loss_inputs(batch: RolloutBatch, targets: Targets) -> dict[str, Tensor]:
    """The (B, T) tensors a `loss` reads, keyed as its `mb` dict; slice each row-wise for a minibatch."""
    tensors = {"response_mask": batch.response_mask, "logprobs": batch.logprobs,
               "ref_logprobs": batch.ref_logprobs, "advantages": targets.advantages}
    if targets.returns is not None:
        tensors["returns"] = targets.returns
    if batch.values is not None:
        tensors["values"] = batch.values
    return tensors


# --- shared pieces ------------------------------------------------------------------------------------------


def clip_bounds(cfg: RLConfig, low: float | None, high: float | None = None) -> tuple[float | None, float | None]:
    """(low, high) clip epsilons: rl.clip_range / rl.clip_range_high where set, else the algorithm's published
    `low` / `high`; `high` None means symmetric (the low one)."""
    low = cfg.clip_range if cfg.clip_range is not None else low
    high = cfg.clip_range_high if cfg.clip_range_high is not None else high
    return low, high if high is not None else low


def token_kl(batch: RolloutBatch, cfg: RLConfig) -> Tensor:
    """Per-token KL(policy || ref) of the rollout, 0 outside the response. (B, T)"""
    logprobs = batch.policy_logprobs if batch.policy_logprobs is not None else batch.logprobs  # pi, never mu
    kl = kl_estimate(logprobs, batch.ref_logprobs, cfg.kl_estimator)
    return torch.where(batch.response_mask > 0, kl, 0.0)


def target_stats(advantages: Tensor, rewards: Tensor, mask: Tensor, kl_coef: float, kl: Tensor) -> dict[str, float]:
    # names avoid the trainer's own keys ("kl", "reward_mean") that metrics.jsonl already holds
    return {
        "adv_mean": masked_mean(advantages, mask).item(),
        "adv_abs_mean": masked_mean(advantages.abs(), mask).item(),
        "non_score_reward": (-kl_coef * kl * mask).sum(-1).mean().item(),
        "rewards_seq_mean": (rewards * mask).sum(-1).mean().item(),
    }


def broadcast(seq_adv: Tensor, mask: Tensor) -> Tensor:
    return seq_adv.unsqueeze(-1) * mask  # (B,) -> (B, T): every token of a sequence shares its advantage


def common_stats(mb: dict[str, Tensor], new_logprobs: Tensor, entropy_term: Tensor) -> dict[str, Tensor]:
    mask = mb["response_mask"]
    # token-mean k3 KL of the current policy to the reference; the trainer's "kl" is the rollout's, per sequence
    kl_ref = masked_mean(kl_estimate(new_logprobs.detach(), mb["ref_logprobs"], "k3"), mask)
    # value_loss 0 without a critic keeps one metrics schema for every algorithm (critic losses override it)
    return {"entropy": entropy_term.detach(), "kl_ref": kl_ref, "value_loss": torch.zeros_like(kl_ref)}


def approx_kl(new_logprobs: Tensor, mb: dict[str, Tensor]) -> dict[str, Tensor]:
    """k3 KL(old || new) for losses without a ratio (0 on the single on-policy step; a drift check)."""
    log_ratio = (new_logprobs.detach() - mb["logprobs"]) * mb["response_mask"]
    return {"approx_kl": masked_mean(torch.exp(log_ratio) - 1.0 - log_ratio, mb["response_mask"])}

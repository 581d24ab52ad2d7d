"""The algorithm registry: each RL algorithm is a `targets` function and a `loss` function, registered by name.

The trainer only calls `get_algorithm(cfg.algo)`, then `algo.targets(...)` once per rollout batch and
`algo.loss(...)` per micro-batch. Adding an algorithm = two functions and one `register(Algorithm(...))` call;
nothing else branches on the algorithm's name (config.ALGOS lists the names a YAML file may use).

Which RLConfig fields each algorithm reads (reward shaping / advantage / loss):

- ppo:          per-token KL (kl_estimator), whiten_rewards / GAE (gamma, lam), whiten_advantages /
                clipped policy (clip_range) + vf_coef * clipped value (value_clip_range)
- a2c:          as ppo / as ppo / -A log pi + vf_coef * unclipped value; one update per batch
- reinforce:    per-token KL (kl_estimator) / reward-to-go (gamma) - moving baseline (baseline_decay) /
                -A log pi; one update per batch
- rloo:         sequence KL, score - kl_coef * sum_t kl_t / leave-one-out over num_samples / clipped policy
- grpo:         none / group (r - mean) / std (scale_by_std) / clipped policy + kl_coef * k3 loss term
- reinforce_pp: per-token KL (kl_estimator) / reward-to-go (gamma) whitened over the batch / clipped policy

All losses subtract entropy_coef * entropy and aggregate per-token terms with loss_aggregation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pefrl.config import RLConfig
from pefrl.ops.advantages import discounted_returns, gae, group_advantages, masked_mean, token_rewards, whiten
from pefrl.ops.kl import kl_estimate
from pefrl.ops.losses import aggregate, clipped_policy_loss, clipped_value_loss, entropy_bonus, policy_gradient_loss


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
    name: str
    uses_critic: bool
    single_update: bool  # exactly one optimizer step per rollout batch over the whole batch (on-policy PG)
    kl_in_reward: bool  # KL penalty shaped into the rewards (else, if any, a loss term)
    targets: TargetsFn  # (batch, cfg, kl_coef, state) -> Targets; state: JSON-able dict the trainer checkpoints
    loss: LossFn  # (mb, new_logprobs, new_values, entropy, cfg, kl_coef, max_len) -> (loss, stats)
    # Replaces the trainer's default epochs x minibatches optimizer loop (e.g. a natural-gradient step):
    # update(run, batch, targets, kl_coef, rollout) -> stats. None: the default loop with `loss`.
    update: Callable[..., dict[str, float]] | None = None


ALGORITHMS: dict[str, Algorithm] = {}


def register(a: Algorithm) -> Algorithm:
    """Add an algorithm under `a.name`; a name registered twice is an error (no silent override)."""
    if a.name in ALGORITHMS:
        raise ValueError(f"algorithm {a.name!r} is already registered")
    ALGORITHMS[a.name] = a
    return a


def loss_inputs(batch: RolloutBatch, targets: Targets) -> dict[str, Tensor]:
    """The (B, T) tensors a `loss` reads, keyed as its `mb` dict; slice each row-wise for a minibatch."""
    tensors = {"response_mask": batch.response_mask, "logprobs": batch.logprobs,
               "ref_logprobs": batch.ref_logprobs, "advantages": targets.advantages}
    if targets.returns is not None:
        tensors["returns"] = targets.returns
    if batch.values is not None:
        tensors["values"] = batch.values
    return tensors


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid: {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


# --- shared pieces ------------------------------------------------------------------------------------------


def _token_kl(batch: RolloutBatch, cfg: RLConfig) -> Tensor:
    """Per-token KL(policy || ref) of the rollout, 0 outside the response. (B, T)"""
    logprobs = batch.policy_logprobs if batch.policy_logprobs is not None else batch.logprobs  # pi, never mu
    kl = kl_estimate(logprobs, batch.ref_logprobs, cfg.kl_estimator)
    return torch.where(batch.response_mask > 0, kl, 0.0)


def _target_stats(advantages: Tensor, rewards: Tensor, mask: Tensor, kl_coef: float, kl: Tensor) -> dict[str, float]:
    # names avoid the trainer's own keys ("kl", "reward_mean") that metrics.jsonl already holds
    return {
        "adv_mean": masked_mean(advantages, mask).item(),
        "adv_abs_mean": masked_mean(advantages.abs(), mask).item(),
        "non_score_reward": (-kl_coef * kl * mask).sum(-1).mean().item(),
        "rewards_seq_mean": (rewards * mask).sum(-1).mean().item(),
    }


def _broadcast(seq_adv: Tensor, mask: Tensor) -> Tensor:
    return seq_adv.unsqueeze(-1) * mask  # (B,) -> (B, T): every token of a sequence shares its advantage


def _common_stats(mb: dict[str, Tensor], new_logprobs: Tensor, entropy_term: Tensor) -> dict[str, Tensor]:
    mask = mb["response_mask"]
    # token-mean k3 KL of the current policy to the reference; the trainer's "kl" is the rollout's, per sequence
    kl_ref = masked_mean(kl_estimate(new_logprobs.detach(), mb["ref_logprobs"], "k3"), mask)
    # value_loss 0 without a critic keeps one metrics schema for every algorithm (critic losses override it)
    return {"entropy": entropy_term.detach(), "kl_ref": kl_ref, "value_loss": torch.zeros_like(kl_ref)}


# --- ppo and a2c: KL-shaped token rewards, GAE with a critic ---------------------------------------------------


def gae_targets(batch: RolloutBatch, cfg: RLConfig, kl_coef: float, state: dict) -> Targets:
    """Ziegler et al. 2019 / lm-human-preferences: token rewards with per-token KL, GAE on the critic's values."""
    if batch.values is None:
        raise ValueError("GAE targets need critic values (batch.values is None)")
    mask = batch.response_mask
    kl = _token_kl(batch, cfg)  # (B, T)
    rewards = token_rewards(batch.scores, kl, kl_coef, mask)  # (B, T)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)  # rescale only: the sign of a reward carries meaning
    advantages, returns = gae(rewards, batch.values, mask, cfg.gamma, cfg.lam)  # returns from raw advantages
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)
    stats = _target_stats(advantages, rewards, mask, kl_coef, kl)
    stats["returns_mean"] = masked_mean(returns, mask).item()
    stats["values_mean"] = masked_mean(batch.values, mask).item()
    return Targets(advantages=advantages, returns=returns, rewards=rewards, stats=stats)


def ppo_loss(mb, new_logprobs, new_values, entropy, cfg: RLConfig, kl_coef: float, max_len: int):
    mask = mb["response_mask"]
    pg_loss, pg_stats = clipped_policy_loss(new_logprobs, mb["logprobs"], mb["advantages"], mask, cfg.clip_range,
                                            cfg.loss_aggregation, max_len)
    vf_loss, vf_stats = clipped_value_loss(new_values, mb["values"], mb["returns"], mask, cfg.value_clip_range)
    ent = entropy_bonus(entropy, mask, cfg.loss_aggregation, max_len)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * ent
    stats = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), **pg_stats, **vf_stats}
    return loss, {**_common_stats(mb, new_logprobs, ent), **stats}


def a2c_loss(mb, new_logprobs, new_values, entropy, cfg: RLConfig, kl_coef: float, max_len: int):
    """Advantage actor-critic (Mnih et al. 2016): -A log pi + vf_coef * 0.5 (V - R)^2; one on-policy step."""
    mask = mb["response_mask"]
    pg_loss = policy_gradient_loss(new_logprobs, mb["advantages"], mask, cfg.loss_aggregation, max_len,
                                   behaviour_logprobs=mb["logprobs"])
    vf_loss, _ = clipped_value_loss(new_values, mb["values"], mb["returns"], mask, clip_range=0.0)
    ent = entropy_bonus(entropy, mask, cfg.loss_aggregation, max_len)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * ent
    stats = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), **_approx_kl(new_logprobs, mb)}
    return loss, {**_common_stats(mb, new_logprobs, ent), **stats}


def _approx_kl(new_logprobs: Tensor, mb: dict[str, Tensor]) -> dict[str, Tensor]:
    """k3 KL(old || new) for losses without a ratio (0 on the single on-policy step; a drift check)."""
    log_ratio = (new_logprobs.detach() - mb["logprobs"]) * mb["response_mask"]
    return {"approx_kl": masked_mean(torch.exp(log_ratio) - 1.0 - log_ratio, mb["response_mask"])}


# --- critic-free -----------------------------------------------------------------------------------------------


def reinforce_targets(batch: RolloutBatch, cfg: RLConfig, kl_coef: float, state: dict) -> Targets:
    """REINFORCE (Williams 1992) with a moving-average baseline b of the mean sequence return.

    A_t = G_t - b, G_t the KL-shaped reward-to-go. This batch uses b from BEFORE it (the first batch's b is its
    own mean return): b must not depend on this batch's actions for the gradient to stay unbiased, and the
    first batch has nothing better. Then b <- decay * b + (1 - decay) * mean return, kept in state['baseline'].
    whiten_advantages is not applied: a batch-mean shift would replace the baseline this algorithm is about.
    """
    mask = batch.response_mask
    kl = _token_kl(batch, cfg)
    rewards = token_rewards(batch.scores, kl, kl_coef, mask)  # (B, T)
    returns = discounted_returns(rewards, mask, cfg.gamma)  # (B, T)
    mean_return = returns[:, 0].mean().item()  # G_0 is the whole (discounted) sequence return
    baseline = float(state.get("baseline", mean_return))
    advantages = (returns - baseline) * mask
    state["baseline"] = cfg.baseline_decay * baseline + (1.0 - cfg.baseline_decay) * mean_return
    stats = _target_stats(advantages, rewards, mask, kl_coef, kl)
    stats["baseline"] = baseline
    return Targets(advantages=advantages, returns=None, rewards=rewards, stats=stats)


def pg_loss_fn(mb, new_logprobs, new_values, entropy, cfg: RLConfig, kl_coef: float, max_len: int):
    """-A log pi - entropy bonus (REINFORCE)."""
    mask = mb["response_mask"]
    pg_loss = policy_gradient_loss(new_logprobs, mb["advantages"], mask, cfg.loss_aggregation, max_len,
                                   behaviour_logprobs=mb["logprobs"])
    ent = entropy_bonus(entropy, mask, cfg.loss_aggregation, max_len)
    loss = pg_loss - cfg.entropy_coef * ent
    stats = {"policy_loss": pg_loss.detach(), **_approx_kl(new_logprobs, mb)}
    return loss, {**_common_stats(mb, new_logprobs, ent), **stats}


def rloo_targets(batch: RolloutBatch, cfg: RLConfig, kl_coef: float, state: dict) -> Targets:
    """RLOO (Ahmadian et al. 2024): sequence reward score - kl_coef * sum_t kl_t, leave-one-out baseline over the
    k samples of a prompt, one advantage per sequence broadcast to its tokens (as TRL's RLOOTrainer)."""
    mask = batch.response_mask
    kl = _token_kl(batch, cfg)
    seq_rewards = batch.scores - kl_coef * kl.sum(-1)  # (B,)
    advantages = _broadcast(group_advantages(seq_rewards, batch.num_samples, "rloo"), mask)
    rewards = token_rewards(batch.scores, kl, kl_coef, mask)  # same sequence sums, for logging
    return Targets(advantages=advantages, returns=None, rewards=rewards,
                   stats=_target_stats(advantages, rewards, mask, kl_coef, kl))


def clipped_pg_loss_fn(mb, new_logprobs, new_values, entropy, cfg: RLConfig, kl_coef: float, max_len: int):
    """PPO-clipped policy loss without a critic (RLOO, REINFORCE++)."""
    mask = mb["response_mask"]
    pg_loss, pg_stats = clipped_policy_loss(new_logprobs, mb["logprobs"], mb["advantages"], mask, cfg.clip_range,
                                            cfg.loss_aggregation, max_len)
    ent = entropy_bonus(entropy, mask, cfg.loss_aggregation, max_len)
    loss = pg_loss - cfg.entropy_coef * ent
    return loss, {**_common_stats(mb, new_logprobs, ent), "policy_loss": pg_loss.detach(), **pg_stats}


def grpo_targets(batch: RolloutBatch, cfg: RLConfig, kl_coef: float, state: dict) -> Targets:
    """GRPO (Shao et al. 2024): group-normalised scores as every token's advantage; no KL in the reward."""
    mask = batch.response_mask
    seq_adv = group_advantages(batch.scores, batch.num_samples, "grpo", scale_by_std=cfg.scale_by_std)  # (B,)
    advantages = _broadcast(seq_adv, mask)
    rewards = token_rewards(batch.scores, torch.zeros_like(mask), 0.0, mask)  # score on the last token only
    stats = _target_stats(advantages, rewards, mask, 0.0, torch.zeros_like(mask))
    return Targets(advantages=advantages, returns=None, rewards=rewards, stats=stats)


def grpo_loss(mb, new_logprobs, new_values, entropy, cfg: RLConfig, kl_coef: float, max_len: int):
    """Clipped policy loss + kl_coef * k3 KL(new || ref) as a loss term (DeepSeekMath eq. 3-4). Always k3 whatever
    cfg.kl_estimator says: its gradient is a KL gradient, while k1's in a loss only lowers sampled logprobs."""
    mask = mb["response_mask"]
    pg_loss, pg_stats = clipped_policy_loss(new_logprobs, mb["logprobs"], mb["advantages"], mask, cfg.clip_range,
                                            cfg.loss_aggregation, max_len)
    kl = kl_estimate(new_logprobs, mb["ref_logprobs"], "k3")  # (B, T), grad flows to new_logprobs
    kl_term = aggregate(kl, mask, cfg.loss_aggregation, max_len)
    ent = entropy_bonus(entropy, mask, cfg.loss_aggregation, max_len)
    loss = pg_loss + kl_coef * kl_term - cfg.entropy_coef * ent
    stats = {"policy_loss": pg_loss.detach(), "kl_loss": kl_term.detach(), **pg_stats}
    return loss, {**_common_stats(mb, new_logprobs, ent), **stats}


def reinforce_pp_targets(batch: RolloutBatch, cfg: RLConfig, kl_coef: float, state: dict) -> Targets:
    """REINFORCE++ (Hu 2025): A_t = r(x, y) - kl_coef * sum_{s >= t} KL_s (reward-to-go with gamma), then
    normalised by the mean and std over ALL tokens of the batch (global, not per group)."""
    mask = batch.response_mask
    kl = _token_kl(batch, cfg)
    rewards = token_rewards(batch.scores, kl, kl_coef, mask)
    returns = discounted_returns(rewards, mask, cfg.gamma)  # (B, T)
    advantages = whiten(returns, mask)
    return Targets(advantages=advantages, returns=None, rewards=rewards,
                   stats=_target_stats(advantages, rewards, mask, kl_coef, kl))


register(Algorithm("ppo", uses_critic=True, single_update=False, kl_in_reward=True, targets=gae_targets,
                   loss=ppo_loss))
register(Algorithm("a2c", uses_critic=True, single_update=True, kl_in_reward=True, targets=gae_targets,
                   loss=a2c_loss))
register(Algorithm("reinforce", uses_critic=False, single_update=True, kl_in_reward=True,
                   targets=reinforce_targets, loss=pg_loss_fn))
register(Algorithm("rloo", uses_critic=False, single_update=False, kl_in_reward=True, targets=rloo_targets,
                   loss=clipped_pg_loss_fn))
register(Algorithm("grpo", uses_critic=False, single_update=False, kl_in_reward=False, targets=grpo_targets,
                   loss=grpo_loss))
register(Algorithm("reinforce_pp", uses_critic=False, single_update=False, kl_in_reward=True,
                   targets=reinforce_pp_targets, loss=clipped_pg_loss_fn))

from pefrl import trpo  # noqa: F401  registers trpo

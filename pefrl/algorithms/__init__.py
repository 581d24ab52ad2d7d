"""The algorithm registry: each RL algorithm is a `targets` function and a `loss` function (and optionally its
own `update`), with capability flags, in one file under pefrl/algorithms/, listed once in `_BUILTIN` below.

The trainer only calls `get_algorithm(cfg.algo)`, then `algo.targets(...)` once per rollout batch and
`algo.loss(...)` per micro-batch; the loop, FSDP and the config read the flags (`uses_critic`, `single_update`,
`needs_groups`, `fsdp_ok`, `dynamic_sampling`), never the name. Adding an algorithm = one file with an `ALGORITHM = Algorithm(...)`
plus its line in `_BUILTIN`: the config accepts every registered name (`check_config`).

Which RLConfig fields each algorithm reads (reward shaping / advantage / loss):

- ppo:          per-token KL (kl_estimator), whiten_rewards / GAE (gamma, lam), whiten_advantages /
                clipped policy (clip_range, clip_range_high) + vf_coef * clipped value (value_clip_range)
- a2c:          as ppo / as ppo / -A log pi + vf_coef * unclipped value; one update per batch
- reinforce:    per-token KL (kl_estimator) / reward-to-go (gamma) - moving baseline (baseline_decay) /
                -A log pi; one update per batch
- rloo:         sequence KL, score - kl_coef * sum_t kl_t / leave-one-out over num_samples / clipped policy
- grpo:         none / group (r - mean) / std (scale_by_std) / clipped policy + kl_coef * k3 loss term
- reinforce_pp: per-token KL (kl_estimator) / reward-to-go (gamma) whitened over the batch / clipped policy
- dapo:         as grpo, clip-higher (clip_range 0.2, clip_range_high 0.28 unless set); dynamic_sampling on
- gspo:         as grpo, one clipped ratio per sequence (clip_range 3e-4, clip_range_high 4e-4 unless set)
- cispo:        as grpo / -sg(clip(r, ., 1 + clip_range_high (0.28))) A log pi, no lower bound unless clip_range
- trpo:         as ppo / as ppo / natural-gradient step in a KL trust region (max_kl, cg_iters, cg_damping,
                line_search_steps), then PPO's value half

All losses subtract entropy_coef * entropy and aggregate per-token terms with loss_aggregation.
"""

from __future__ import annotations

from pefrl.algorithms import a2c, cispo, dapo, grpo, gspo, ppo, reinforce, reinforce_pp, rloo, trpo
from pefrl.algorithms.base import Algorithm, RolloutBatch, Targets, loss_inputs
from pefrl.config import Config, ConfigError

__all__ = ["ALGORITHMS", "Algorithm", "RolloutBatch", "Targets", "check_config", "get_algorithm", "loss_inputs",
           "register"]

_BUILTIN = (ppo, a2c, reinforce, rloo, grpo, reinforce_pp, trpo, dapo, gspo, cispo)

ALGORITHMS: dict[str, Algorithm] = {}


def register(a: Algorithm) -> Algorithm:
    """Add an algorithm under `a.name`; a name registered twice is an error (no silent override)."""
    if a.name in ALGORITHMS:
        raise ValueError(f"algorithm {a.name!r} is already registered")
    ALGORITHMS[a.name] = a
    return a


def check_config(cfg: Config) -> Config:
    """What the schema cannot check without the registry (config.py sits below it): `algo` names a registered
    algorithm, and one that needs groups gets rollout.num_samples >= 2. Returns cfg."""
    if cfg.algo not in ALGORITHMS:
        raise ConfigError(f"algo must be one of {sorted(ALGORITHMS)}, got {cfg.algo!r}")
    if ALGORITHMS[cfg.algo].needs_groups and cfg.rollout.num_samples < 2:
        raise ConfigError(f"algo {cfg.algo} needs rollout.num_samples >= 2 (a group baseline), "
                          f"got {cfg.rollout.num_samples}")
    return cfg


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid: {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


for _module in _BUILTIN:
    register(_module.ALGORITHM)

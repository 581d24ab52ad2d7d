"""Per-token KL estimators and KL-coefficient controllers.

Estimators follow Schulman (2020), "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html): tokens
are sampled from the policy, so with log r = ref_logprobs - logprobs, KL(policy || ref) = E[-log r].
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

# exp() of a log ratio beyond this overflows float16/bfloat16 long before float32; the clamp only bites on
# tokens whose reference probability is e^20 times the policy's, which a KL-penalised run never reaches.
_MAX_LOG_RATIO = 20.0


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(policy || ref) from the sampled tokens' logprobs. All tensors (B, T).

    k1 = logp - ref                      unbiased, can be negative per token
    k2 = 0.5 * (logp - ref)^2            biased, never negative, low variance
    k3 = exp(ref - logp) - (ref - logp) - 1   unbiased and never negative (Schulman 2020)

    Positions outside the response are NOT zeroed here: multiply by `response_mask` (or use `masked_mean`).
    """
    log_ratio = logprobs - ref_logprobs  # (B, T)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        neg = (-log_ratio).clamp(max=_MAX_LOG_RATIO)  # log(ref / policy)
        return torch.exp(neg) - neg - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: ['k1', 'k2', 'k3']")


class KLController(Protocol):
    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...
    def state_dict(self) -> dict[str, float]: ...
    def load_state_dict(self, d: dict[str, Any]) -> None: ...


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Proportional controller of the KL coefficient toward a target KL (Ziegler et al. 2019, Sec. 2.2).

    err = clip(kl / target - 1, -0.2, 0.2); coef *= 1 + err * n_steps / horizon. `current_kl` is the KL per
    sequence (summed over tokens) the target is stated in; `n_steps` the samples seen since the last update.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        # the clip keeps one noisy batch from moving the coefficient by more than 20% of n_steps / horizon
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        # target and horizon come from the config of the resumed run; only the learned coefficient is state
        self.value = float(d["value"])


def make_kl_controller(kl_coef: float, kl_target: float | None = None,
                       kl_horizon: int = 10000) -> FixedKLController | AdaptiveKLController:
    """Adaptive controller toward `kl_target` when it is set, else a fixed `kl_coef` (rl.kl_coef, rl.kl_target,
    rl.kl_horizon)."""
    if kl_target is not None:
        return AdaptiveKLController(kl_coef, kl_target, kl_horizon)
    return FixedKLController(kl_coef)

"""Evaluation estimators over n samples per problem, and completion-length statistics.

P problems, n samples each; `num_correct` (P,) counts the samples that passed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pass_at_k(num_samples: Tensor | int, num_correct: Tensor, k: int) -> Tensor:
    """Unbiased pass@k per problem, (P,) float64 (Chen et al. 2021, "Evaluating Large Language Models Trained on
    Code", eq. 1 and its numerically stable form in figure 3):

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i),   1 if n - c < k

    the probability that at least one of k samples drawn without replacement from the n is correct. The product
    never forms a binomial coefficient, so n in the thousands is fine. Needs 1 <= k <= n per problem. Average
    over problems for the benchmark number. Taking max over exactly k samples is the n = k case of this.
    """
    c = num_correct.to(torch.float64)  # (P,)
    n = torch.as_tensor(num_samples, dtype=torch.float64).expand_as(c)  # (P,)
    if k < 1 or (n < k).any():
        raise ValueError(f"pass@k needs 1 <= k <= n samples per problem, got k={k}, min n={int(n.min())}")
    if ((c < 0) | (c > n)).any():
        raise ValueError("num_correct must lie in [0, num_samples]")
    i = torch.arange(1, int(n.max()) + 1, dtype=torch.float64)  # (N,)
    in_product = (i > (n - c).unsqueeze(-1)) & (i <= n.unsqueeze(-1))  # (P, N): i in (n - c, n]
    factors = torch.where(in_product, 1.0 - k / i, 1.0)  # (P, N)
    return torch.where(n - c < k, 1.0, 1.0 - factors.prod(-1))


def mean_at_k(scores: Tensor) -> Tensor:
    """mean@k (DAPO's avg@32): the mean score of each problem's k samples, (P, k) -> (P,). It is the unbiased
    estimate of the expected single-sample score, so unlike pass@k it does not grow with k; k only lowers
    its variance. Works for graded scores as well as 0/1."""
    return scores.to(torch.float64).mean(-1)


def length_stats(response_mask: Tensor, finished: Tensor | None = None) -> dict[str, Tensor]:
    """Completion lengths (valid response tokens per row of the (B, T) mask): length_mean / _min / _max.

    With `finished` (B,) bool (ended on EOS or a stop string, not at the cap) also truncated_frac, the share cut
    off, and finished_length_mean, the mean length of the others (0 if none): a rising truncated_frac is the
    first sign that lengths are running into the cap. Scalar tensors, no grad.
    """
    with torch.no_grad():
        lengths = response_mask.sum(-1).to(torch.float32)  # (B,)
        stats = {"length_mean": lengths.mean(), "length_min": lengths.min(), "length_max": lengths.max()}
        if finished is not None:
            done = finished.to(torch.float32)  # (B,)
            stats["truncated_frac"] = 1.0 - done.mean()
            stats["finished_length_mean"] = (lengths * done).sum() / done.sum().clamp(min=1.0)
    return stats

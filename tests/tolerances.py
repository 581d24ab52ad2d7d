"""Tolerances for comparing two fp32 computations of the same quantity that sum in a different order.

Two mathematically equal fp32 results (dense vs chunked logprobs, a forward from cached hidden states vs a whole
one, another CPU's kernels or thread count) differ by rounding only. Each of the K additions in a reduction
rounds with relative error <= eps_fp32 (2^-23 ~ 1.19e-7); the errors are unbiased, so a sum of K terms of size
~|x| drifts by about eps * sqrt(K) * |x| (a random walk; the worst case K * eps * |x| is never approached in
practice). A result built from several reductions in a row (matmuls over the hidden size, a softmax over the
vocabulary, a gradient summed over the batch's tokens) compounds them: K is their product of lengths, which
sqrt() keeps modest. SAFETY covers the constant in front of the random walk (kernels split sums into blocks,
fused multiply-adds) without hiding a real bug: a wrong mask, position or adapter moves results by ~1e-2 and more.

Measured (2026-12, test_decode's top-layers critic, qwen2): gradients up to ~4 in size differed by 1.13e-5 on an
AMD EPYC with AVX512-BF16 kernels against 0 elsewhere; eps * sqrt(K) * 4 with K ~ 2e4 is 6.7e-5, SAFETY 8 -> 5e-4.
"""

from __future__ import annotations

import math

import torch

EPS_FP32 = torch.finfo(torch.float32).eps
SAFETY = 8.0


def fp32_atol(expected: torch.Tensor, k: int) -> float:
    """eps_fp32 * sqrt(k) * the scale of `expected` (its largest magnitude, at least 1), times SAFETY."""
    scale = max(float(expected.detach().abs().max()) if expected.numel() else 0.0, 1.0)
    return SAFETY * EPS_FP32 * math.sqrt(k) * scale


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, k: int) -> None:
    """actual == expected up to the rounding of `k`-term fp32 reductions done in another order (see above)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=fp32_atol(expected, k))

import math

import pytest
import torch

from pefrl.ops.losses import aggregate, clipped_policy_loss, clipped_value_loss, entropy_bonus, policy_gradient_loss

nan = float("nan")


def test_aggregation_modes_on_a_ragged_mask():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, nan, 100.0]])  # padding holds garbage
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "token_mean", 4).item() == pytest.approx(2.5)  # (1+2+3+4) / 4
    assert aggregate(per_token, mask, "sequence_mean", 4).item() == pytest.approx(3.0)  # (2 + 4) / 2
    assert aggregate(per_token, mask, "fixed_length", 4).item() == pytest.approx(1.25)  # 10 / (2 * 4)
    # a row with no tokens does not count as a sequence
    empty = torch.cat([mask, torch.zeros(1, 3)])
    assert aggregate(torch.cat([per_token, torch.ones(1, 3)]), empty, "sequence_mean", 4).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(per_token, mask, "sum", 4)


def _policy(advantage: float):
    logprobs = torch.tensor([[0.1, -0.1, 0.3, -0.3]], requires_grad=True)
    old_logprobs = torch.zeros(1, 4)
    advantages = torch.full((1, 4), advantage)
    mask = torch.ones(1, 4)
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2, "token_mean", 4)
    loss.backward()
    return loss, stats, logprobs.grad


R = [math.exp(0.1), math.exp(-0.1), math.exp(0.3), math.exp(-0.3)]  # ratio = [1.105, 0.905, 1.350, 0.741]


def test_clipping_with_positive_advantage():
    loss, stats, grad = _policy(1.0)
    # A = +1: per token max(-r, -clip(r)) = -min(r, clip(r)); only e^0.3 > 1.2 is clipped (to 1.2);
    # e^-0.3 < 0.8 is NOT clipped: the unclipped term is already the pessimistic one
    assert loss.item() == pytest.approx(-(R[0] + R[1] + 1.2 + R[3]) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.25)
    # d/dlogp of -r/4 is -r/4; the clipped token has no gradient
    torch.testing.assert_close(grad, torch.tensor([[-R[0] / 4, -R[1] / 4, 0.0, -R[3] / 4]]))
    assert stats["ratio_mean"].item() == pytest.approx(sum(R) / 4)
    # approx_kl: k3 of KL(old || new) = mean(r - 1 - log r)
    assert stats["approx_kl"].item() == pytest.approx(sum(r - 1 - math.log(r) for r in R) / 4, rel=1e-5)
    assert not stats["clipfrac"].requires_grad


def test_clipping_with_negative_advantage():
    loss, stats, grad = _policy(-1.0)
    # A = -1: per token max(r, clip(r)); only e^-0.3 < 0.8 is clipped (to 0.8)
    assert loss.item() == pytest.approx((R[0] + R[1] + R[2] + 0.8) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.25)
    torch.testing.assert_close(grad, torch.tensor([[R[0] / 4, R[1] / 4, R[2] / 4, 0.0]]))


def test_no_clipping_inside_range_and_padding_ignored():
    logprobs = torch.tensor([[0.15, -0.15, 500.0]])  # e^0.15 = 1.16 and e^-0.15 = 0.86: inside [0.8, 1.2]
    old_logprobs = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the huge log ratio sits on padding
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, torch.ones(1, 3), mask, 0.2, "token_mean", 3)
    assert stats["clipfrac"].item() == 0.0
    assert loss.item() == pytest.approx(-(math.exp(0.15) + math.exp(-0.15)) / 2)
    assert torch.isfinite(stats["approx_kl"]) and torch.isfinite(stats["ratio_mean"])


def test_policy_gradient_loss_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0]], requires_grad=True)
    advantages = torch.tensor([[2.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = policy_gradient_loss(logprobs, advantages, mask, "token_mean", 3)
    assert loss.item() == pytest.approx((2.0 + -2.0) / 2)  # -A * logp = [2, -2]
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, 0.5, 0.0]]))  # -A / 2, 0 on padding


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 5.0]])
    old_values = torch.tensor([[0.8, 1.0, 0.0]])
    returns = torch.tensor([[1.5, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = clipped_value_loss(values, old_values, returns, mask, 0.2)
    # token 0: (1 - 1.5)^2 = 0.25; clipped v = 0.8 + 0.2 = 1.0, same error -> not clipped
    # token 1: (2 - 3)^2 = 1; clipped v = 1.0 + 0.2 = 1.2 -> (1.2 - 3)^2 = 3.24 is larger -> clipped
    assert loss.item() == pytest.approx(0.5 * (0.25 + 3.24) / 2)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)
    plain, stats = clipped_value_loss(values, old_values, returns, mask, 0.0)
    assert plain.item() == pytest.approx(0.5 * (0.25 + 1.0) / 2)  # clip_range 0: 0.5 * MSE
    assert stats["vf_clipfrac"].item() == 0.0


def test_entropy_bonus_follows_aggregation():
    entropy = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert entropy_bonus(entropy, mask, "token_mean", 2).item() == pytest.approx(2.0)
    assert entropy_bonus(entropy, mask, "sequence_mean", 2).item() == pytest.approx(2.0)  # (2 + 2) / 2
    assert entropy_bonus(entropy, mask, "fixed_length", 2).item() == pytest.approx(1.5)  # 6 / 4

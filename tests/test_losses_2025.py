"""Clip-higher (DAPO), GSPO and CISPO losses, worked by hand."""

import math

import pytest
import torch

from pefrl.ops.losses import cispo_policy_loss, clipped_policy_loss, gspo_policy_loss


def _clip_higher(clip_high):
    logprobs = torch.tensor([[math.log(1.25), 0.3, -0.3]], requires_grad=True)
    # ratio will be [1.25, 1.350, 0.741]
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = clipped_policy_loss(logprobs, torch.zeros(1, 3), advantages, torch.ones(1, 3), 0.2, "token_mean", 3,
                                      clip_high=clip_high)
    loss.backward()
    return loss, stats, logprobs.grad


def test_clip_higher_lets_a_positive_token_grow_further():
    loss, stats, grad = _clip_higher(0.28)
    # range [0.8, 1.28]: 1.25 is inside; 1.35 (A > 0) clipped to 1.28; 0.741 (A < 0) clipped to 0.8
    # per token max(-A r, -A clip(r)) = [-1.25, -1.28, 0.8]
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8) / 3)
    torch.testing.assert_close(grad, torch.tensor([[-1.25 / 3, 0.0, 0.0]]))  # only the unclipped token moves
    assert stats["clipfrac_high"].item() == pytest.approx(1 / 3)
    assert stats["clipfrac_low"].item() == pytest.approx(1 / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)


def test_symmetric_clip_is_the_default():
    loss, stats, grad = _clip_higher(None)
    # range [0.8, 1.2]: 1.25 is now clipped too; per token [-1.2, -1.2, 0.8], no gradient anywhere
    assert loss.item() == pytest.approx((-1.2 - 1.2 + 0.8) / 3)
    torch.testing.assert_close(grad, torch.zeros(1, 3))
    assert stats["clipfrac_high"].item() == pytest.approx(2 / 3)
    assert stats["clipfrac"].item() == pytest.approx(1.0)
    loss_02, _, _ = _clip_higher(0.2)
    assert loss_02.item() == loss.item()


def test_gspo_clips_whole_sequences_by_hand():
    old_logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    log_ratio = torch.tensor([[0.2, -0.1, 0.5], [1e-4, -1e-4, 2e-4]])
    logprobs = (old_logprobs + log_ratio).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0's 0.5 sits on padding
    loss, stats = gspo_policy_loss(logprobs, old_logprobs, torch.ones(2, 3), mask, "sequence_mean", 3)
    # s_0 = exp(mean(0.2, -0.1)) = e^0.05 = 1.0513 > 1 + 4e-4: clipped to 1.0004
    # s_1 = exp(mean(1e-4, -1e-4, 2e-4)) = exp(2e-4 / 3) = 1.0000667: inside [1 - 3e-4, 1 + 4e-4]
    s1 = math.exp(2e-4 / 3)
    assert loss.item() == pytest.approx((-1.0004 - s1) / 2)
    loss.backward()
    # row 0: every token of a clipped sequence has zero gradient; row 1: d(-s_1 / 2) / d logprob_t = -s_1 / 3 / 2
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, 0.0], [-s1 / 6] * 3]))
    assert stats["clipfrac_high"].item() == pytest.approx(2 / 5)  # row 0's 2 valid tokens of 5
    assert stats["clipfrac_low"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx((math.exp(0.05) + s1) / 2)


def test_gspo_clips_low_with_a_negative_advantage():
    logprobs = torch.tensor([[-0.01, -0.01]], requires_grad=True)
    # s = e^-0.01 = 0.990 < 1 - 3e-4 and A = -1: per token max(s, clip(s)) = 1 - 3e-4
    loss, stats = gspo_policy_loss(logprobs, torch.zeros(1, 2), -torch.ones(1, 2), torch.ones(1, 2), "sequence_mean", 2)
    assert loss.item() == pytest.approx(1 - 3e-4)
    loss.backward()
    assert (logprobs.grad == 0).all()
    assert stats["clipfrac_low"].item() == 1.0


def test_gspo_token_form_has_the_gradient_of_the_sequence_ratio():
    g = torch.Generator().manual_seed(0)
    old_logprobs = -torch.rand(4, 5, generator=g)
    logprobs = (old_logprobs + 0.1 * torch.randn(4, 5, generator=g)).requires_grad_()
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    seq_adv = torch.tensor([1.0, -0.5, 2.0, -1.0])  # (B,)
    # wide clip range: nothing clipped, so the loss is -mean_i A_i s_i, eq. 5 without the clip
    loss, _ = gspo_policy_loss(logprobs, old_logprobs, seq_adv[:, None].expand(4, 5), mask, "sequence_mean", 5,
                               clip_low=0.9, clip_high=10.0)
    (grad,) = torch.autograd.grad(loss, logprobs)
    s = torch.exp(((logprobs - old_logprobs) * mask).sum(-1) / mask.sum(-1))  # (B,), with its graph
    direct = -(seq_adv * s).mean()
    (direct_grad,) = torch.autograd.grad(direct, logprobs)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-6)
    torch.testing.assert_close(grad, direct_grad)


def _cispo(clip_low=None):
    old_logprobs = torch.tensor([[-1.0, -2.0, -1.0]])
    logprobs = torch.tensor([[-0.5, -2.0, -1.5]], requires_grad=True)
    # ratio will be [e^0.5, 1, e^-0.5] = [1.649, 1, 0.607]
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = cispo_policy_loss(logprobs, old_logprobs, advantages, torch.ones(1, 3), 0.28, "token_mean", 3,
                                    clip_low=clip_low)
    loss.backward()
    return loss, stats, logprobs.grad


def test_cispo_by_hand_keeps_the_gradient_of_clipped_tokens():
    loss, stats, grad = _cispo()
    r2 = math.exp(-0.5)
    # weight = sg(clip(r, -, 1.28)) = [1.28, 1, 0.607]; per token -w A logp = [0.64, 2, -0.607 * 1.5]
    assert loss.item() == pytest.approx((0.64 + 2.0 - r2 * 1.5) / 3)
    # gradient -w A / 3: the clipped token 0 still pushes up, with weight 1.28
    torch.testing.assert_close(grad, torch.tensor([[-1.28 / 3, -1.0 / 3, r2 / 3]]))
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["ratio_mean"].item() == pytest.approx((math.exp(0.5) + 1 + r2) / 3)
    # the same token under PPO's clip (A > 0, r = 1.649 > 1.28) gets no gradient at all
    logprobs = torch.tensor([[-0.5]], requires_grad=True)
    ppo, _ = clipped_policy_loss(logprobs, torch.tensor([[-1.0]]), torch.ones(1, 1), torch.ones(1, 1), 0.2, "token_mean",
                                 1, clip_high=0.28)
    ppo.backward()
    assert logprobs.grad.item() == 0.0


def test_cispo_lower_bound_when_asked():
    loss, stats, grad = _cispo(clip_low=0.2)
    # token 2's weight e^-0.5 = 0.607 is raised to 0.8
    assert loss.item() == pytest.approx((0.64 + 2.0 - 0.8 * 1.5) / 3)
    torch.testing.assert_close(grad, torch.tensor([[-1.28 / 3, -1.0 / 3, 0.8 / 3]]))
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)


def test_cispo_ignores_padding():
    logprobs = torch.tensor([[-1.0, 300.0]], requires_grad=True)  # a huge ratio on padding must not leak
    mask = torch.tensor([[1.0, 0.0]])
    loss, stats = cispo_policy_loss(logprobs, torch.tensor([[-1.0, 0.0]]), torch.ones(1, 2), mask, 0.28, "token_mean", 2)
    assert loss.item() == pytest.approx(1.0)  # -1 * 1 * (-1)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, 0.0]]))
    assert torch.isfinite(stats["approx_kl"]) and stats["clipfrac"].item() == 0.0

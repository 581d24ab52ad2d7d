import json
import math

import pytest
import torch

from pefrl.ops.kl import AdaptiveKLController, FixedKLController, kl_estimate, make_kl_controller


def test_estimators_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0]])
    # log ratio logp - ref = [0.5, -1.0]
    torch.testing.assert_close(kl_estimate(logprobs, ref_logprobs, "k1"), torch.tensor([[0.5, -1.0]]))
    # 0.5 * [0.25, 1.0]
    torch.testing.assert_close(kl_estimate(logprobs, ref_logprobs, "k2"), torch.tensor([[0.125, 0.5]]))
    # ref - logp = [-0.5, 1.0]: e^-0.5 + 0.5 - 1 = 0.106531, e^1 - 1 - 1 = 0.718282
    k3 = kl_estimate(logprobs, ref_logprobs, "k3")
    torch.testing.assert_close(k3, torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2.0]]))
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logprobs, ref_logprobs, "k4")


def test_k3_never_negative_and_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    logprobs, ref_logprobs = -torch.rand(64, 16, generator=g) * 5, -torch.rand(64, 16, generator=g) * 5
    assert (kl_estimate(logprobs, ref_logprobs, "k3") >= 0).all()
    assert (kl_estimate(logprobs, ref_logprobs, "k2") >= 0).all()
    assert (kl_estimate(logprobs, ref_logprobs, "k1") < 0).any()  # k1 is negative on some tokens
    assert kl_estimate(logprobs, logprobs, "k3").abs().max() == 0
    # a huge log ratio stays finite (clamped)
    assert torch.isfinite(kl_estimate(torch.tensor([-200.0]), torch.tensor([0.0]), "k3")).all()


def test_k1_and_k3_means_match_true_kl_on_samples():
    p = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1])
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    true_kl = (p * (p / q).log()).sum().item()  # KL(p || q) = 0.3600
    g = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=g)  # sampled from the policy p
    logprobs, ref_logprobs = p.log()[tokens], q.log()[tokens]
    assert kl_estimate(logprobs, ref_logprobs, "k1").mean().item() == pytest.approx(true_kl, abs=0.01)
    assert kl_estimate(logprobs, ref_logprobs, "k3").mean().item() == pytest.approx(true_kl, abs=0.01)


def test_fixed_controller_does_not_move_and_round_trips():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 64)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert other.value == 0.05


def test_adaptive_controller_by_hand():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(6.6, 1000)  # err = 6.6 / 6 - 1 = 0.1 -> coef *= 1 + 0.1 * 0.1 = 1.01
    assert ctl.value == pytest.approx(0.101)
    ctl.update(60.0, 1000)  # err = 9 clipped to 0.2 -> coef *= 1.02
    assert ctl.value == pytest.approx(0.101 * 1.02)
    ctl.update(0.0, 1000)  # err = -1 clipped to -0.2 -> coef *= 0.98
    assert ctl.value == pytest.approx(0.101 * 1.02 * 0.98)
    resumed = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert resumed.value == ctl.value


def test_adaptive_controller_moves_toward_target():
    # a toy run whose KL shrinks as the coefficient grows: kl = 1 / coef. Target 5 means coef -> 0.2.
    ctl = AdaptiveKLController(0.05, target=5.0, horizon=100)
    for _ in range(400):
        ctl.update(1.0 / ctl.value, 10)
    assert ctl.value == pytest.approx(0.2, rel=0.05)
    ctl = AdaptiveKLController(1.0, target=5.0, horizon=100)  # from above: KL too small, coef must fall
    for _ in range(400):
        ctl.update(1.0 / ctl.value, 10)
    assert ctl.value == pytest.approx(0.2, rel=0.05)


def test_make_kl_controller_picks_by_target():
    assert isinstance(make_kl_controller(0.1), FixedKLController)
    ctl = make_kl_controller(0.1, 6.0, 500)
    assert isinstance(ctl, AdaptiveKLController)
    assert (ctl.value, ctl.target, ctl.horizon) == (0.1, 6.0, 500)

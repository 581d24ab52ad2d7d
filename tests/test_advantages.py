import math

import pytest
import torch

from pefrl.ops.advantages import (
    discounted_returns,
    gae,
    group_advantages,
    last_token_index,
    masked_mean,
    masked_var,
    token_rewards,
    whiten,
)

nan = float("nan")


def test_masked_mean_ignores_padding_even_nan():
    x = torch.tensor([[1.0, 2.0, nan], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 4.0]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # empty mask: 0, not NaN


def test_masked_var_by_hand():
    x = torch.tensor([[1.0, 2.0, 4.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9
    assert masked_var(x, mask).item() == pytest.approx(42 / 9 / 2)  # unbiased: / (n - 1)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(42 / 9 / 3)


def test_whiten_zero_mean_unit_var_inside_mask_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g) * 3 + 2
    mask = torch.ones(4, 6)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    w = whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert (w[mask == 0] == 0).all()
    rescaled = whiten(x, mask, shift_mean=False)  # only divided by std: the mean survives
    assert masked_mean(rescaled, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-5)


def test_last_token_index_and_token_rewards_by_hand():
    scores = torch.tensor([1.0, 2.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(last_token_index(mask), torch.tensor([2, 1, 0]))
    rewards = token_rewards(scores, kl, 0.5, mask)
    expected = torch.tensor([
        [-0.05, -0.10, -0.15 + 1.0],  # -0.5 * kl, score 1 on the last token
        [-0.20, -0.25 + 2.0, 0.0],  # EOS at t=1; the padded t=2 gets nothing
        [0.0, 0.0, 0.0],  # no valid token: the score is dropped
    ])
    torch.testing.assert_close(rewards, expected)


def test_gae_1x3_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: delta = 1 + 0.9*0 - 0.7 = 0.3                  A2 = 0.3
    # t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03               A1 = 0.03 + 0.72*0.3 = 0.246
    # t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04               A0 = 0.04 + 0.72*0.246 = 0.21712
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0]]))  # A + V


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] + [0.0] * 4])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, (discounted_returns(rewards, mask, 1.0) - values) * mask)
    torch.testing.assert_close(ret, discounted_returns(rewards, mask, 1.0))


def test_gae_ignores_everything_after_eos():
    rewards = torch.tensor([[0.5, 1.0, 7.0, -3.0]])  # garbage after the EOS at t=1
    values = torch.tensor([[0.2, 0.4, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    short_adv, short_ret = gae(rewards[:, :2], values[:, :2], mask[:, :2], gamma=0.9, lam=0.95)
    torch.testing.assert_close(adv[:, :2], short_adv)
    torch.testing.assert_close(ret[:, :2], short_ret)
    assert (adv[:, 2:] == 0).all() and (ret[:, 2:] == 0).all()
    # the EOS step is terminal: A1 = 1.0 - 0.4 = 0.6 (no bootstrap from V2 = 9)
    assert adv[0, 1].item() == pytest.approx(0.6)


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # row 0: G2 = 3, G1 = 2 + 0.5*3 = 3.5, G0 = 1 + 0.5*3.5 = 2.75; row 1 ends at t=1: G1 = 2, G0 = 2
    expected = torch.tensor([[2.75, 3.5, 3.0], [2.0, 2.0, 0.0]])
    torch.testing.assert_close(discounted_returns(rewards, mask, 0.5), expected)


def test_rloo_leave_one_out_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # k=2, groups [1, 0] and [0, 1]: the baseline is the other sample
    torch.testing.assert_close(group_advantages(scores, 2, "rloo"), torch.tensor([1.0, -1.0, -1.0, 1.0]))
    # k=4, one group: baselines (0+0+1)/3, (1+0+1)/3, (1+0+1)/3, (1+0+0)/3
    torch.testing.assert_close(group_advantages(scores, 4, "rloo"), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))


def test_grpo_group_std_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 4.0, 4.0, 4.0, 4.0])
    # group 0: mean 3, centred [-2, -1, 0, 3], unbiased std sqrt(14 / 3) = 2.16025; group 1 identical -> 0
    std = math.sqrt(14 / 3)
    expected = torch.tensor([-2.0, -1.0, 0.0, 3.0]) / (std + 1e-4)
    adv = group_advantages(scores, 4, "grpo")
    torch.testing.assert_close(adv[:4], expected)
    assert (adv[4:] == 0).all()
    # Dr. GRPO: centred only
    torch.testing.assert_close(group_advantages(scores, 4, "grpo", scale_by_std=False)[:4],
                               torch.tensor([-2.0, -1.0, 0.0, 3.0]))


def test_group_advantages_fail_loudly():
    with pytest.raises(ValueError, match="not a whole number of groups"):
        group_advantages(torch.zeros(5), 2, "rloo")
    with pytest.raises(ValueError, match="num_samples >= 2"):
        group_advantages(torch.zeros(4), 1, "grpo")
    with pytest.raises(ValueError, match="unknown group advantage mode"):
        group_advantages(torch.zeros(4), 2, "mean")


def test_masked_middle_tokens_are_skipped_not_terminal():
    # An episode: policy turn, two observation tokens (mask 0), policy turn; reward 1 at the very end.
    # With gamma = lam = 1 and zero values, every policy token's advantage is the final reward:
    # [1, 1, 0, 0, 1, 1] (observations get 0, and do not cut turn 1 off from the reward).
    mask = torch.tensor([[1.0, 1, 0, 0, 1, 1]])
    rewards = torch.tensor([[0.0, 0, 0, 0, 0, 1]])
    values = torch.zeros(1, 6)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]
    assert discounted_returns(rewards, mask, gamma=1.0).tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]
    # gamma = 0.5 discounts per policy token, skipping the observations: [0.5^3, 0.5^2, 0, 0, 0.5, 1]
    assert discounted_returns(rewards, mask, gamma=0.5).tolist() == [[0.125, 0.25, 0.0, 0.0, 0.5, 1.0]]

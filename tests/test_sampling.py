"""DAPO's dynamic sampling, soft overlong punishment and overlong filtering, worked by hand."""

import pytest
import torch

from pefrl.ops.sampling import frac_reward_zero_std, informative_groups, mask_truncated, overlong_penalty


def test_informative_groups_by_hand():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5001])
    # groups of 3: all correct, mixed, all wrong, almost equal
    torch.testing.assert_close(informative_groups(scores, 3), torch.tensor([False, True, False, True]))
    assert frac_reward_zero_std(scores, 3).item() == pytest.approx(0.5)
    # a tolerance treats the 1e-4 spread as no spread
    torch.testing.assert_close(informative_groups(scores, 3, tol=1e-3), torch.tensor([False, True, False, False]))
    assert frac_reward_zero_std(scores, 3, tol=1e-3).item() == pytest.approx(0.75)
    rows = informative_groups(scores, 3).repeat_interleave(3)  # (B,) row mask, as the docstring says
    assert rows.tolist() == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3
    with pytest.raises(ValueError, match="whole number"):
        informative_groups(scores, 5)


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([10, 16, 17, 18, 20, 25])
    # L_max 20, L_cache 4: safe up to 16, then (16 - |y|) / 4, then -1
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, 20, 4), expected)
    torch.testing.assert_close(overlong_penalty(lengths, 20, 4, penalty_factor=0.5), expected / 2)
    # DAPO's own setting: L_max 20480, L_cache 4096; 18432 is half way into the cache
    assert overlong_penalty(torch.tensor([18432]), 20480, 4096).item() == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(lengths, 20, 0)
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(lengths, 4, 8)


def test_mask_truncated_drops_only_the_cut_rows():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    finished = torch.tensor([True, True, False])  # row 2 hit the cap without EOS
    expected = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(mask_truncated(mask, finished), expected)

"""pass@k, mean@k and completion-length statistics, worked by hand."""

from math import comb

import pytest
import torch

from pefrl.ops.eval_stats import length_stats, mean_at_k, pass_at_k


def test_pass_at_k_by_hand():
    n = torch.tensor([5, 5, 5, 10])
    c = torch.tensor([2, 4, 0, 10])
    got = pass_at_k(n, c, 2)
    # n=5, c=2: 1 - prod_{i=4}^{5} (1 - 2/i) = 1 - 0.5 * 0.6 = 0.7 = 1 - C(3,2)/C(5,2) = 1 - 3/10
    # n=5, c=4: n - c = 1 < k = 2, any 2 samples contain a correct one: 1
    # c=0: 0; c=n: 1
    torch.testing.assert_close(got, torch.tensor([0.7, 1.0, 0.0, 1.0], dtype=torch.float64))
    assert 1 - comb(3, 2) / comb(5, 2) == pytest.approx(0.7)


def test_pass_at_1_is_the_share_correct_and_large_n_is_stable():
    torch.testing.assert_close(pass_at_k(8, torch.tensor([0, 3, 8]), 1),
                               torch.tensor([0.0, 3 / 8, 1.0], dtype=torch.float64))
    # n=2000, c=1, k=100: 1 - (1 - 100/2000) = 0.05; C(2000, 100) itself would overflow a float
    assert pass_at_k(2000, torch.tensor([1]), 100).item() == pytest.approx(0.05)
    # n = k: pass@k is 1 iff any sample passed (the max over the k samples)
    torch.testing.assert_close(pass_at_k(4, torch.tensor([0, 1, 4]), 4), torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))


def test_pass_at_k_rejects_impossible_inputs():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, torch.tensor([1]), 5)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="num_correct"):
        pass_at_k(4, torch.tensor([5]), 2)


def test_mean_at_k_by_hand():
    scores = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 1.0, 0.0]])
    torch.testing.assert_close(mean_at_k(scores), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_length_stats_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    stats = length_stats(mask)  # lengths [4, 2, 3]
    assert (stats["length_mean"].item(), stats["length_min"].item(), stats["length_max"].item()) == (3.0, 2.0, 4.0)
    assert "truncated_frac" not in stats
    stats = length_stats(mask, finished=torch.tensor([False, True, True]))  # row 0 hit the cap
    assert stats["truncated_frac"].item() == pytest.approx(1 / 3)
    assert stats["finished_length_mean"].item() == pytest.approx(2.5)  # (2 + 3) / 2
    none_finished = length_stats(mask, finished=torch.zeros(3, dtype=torch.bool))
    assert none_finished["finished_length_mean"].item() == 0.0

import math

import pytest

from pefrl.config import ConfigError, RewardConfig
from pefrl.rewards import RewardError, Scorer, build_scorer, load_function


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def flaky(prompts, completions, **columns):
    if any(c == "boom" for c in completions):
        raise ValueError("cannot score boom")
    return [1.0] * len(completions)


def nan_reward(prompts, completions, **columns):
    return [math.nan if c == "x" else 0.0 for c in completions]


def test_load_function_by_module_and_file(tmp_path):
    assert load_function("tests.test_rewards:length_reward")(["p"], ["abc"]) == [3.0]
    file = tmp_path / "my_rewards.py"
    file.write_text("def f(prompts, completions, **kw):\n    return [2.0] * len(completions)\n")
    assert load_function(f"{file}:f")(["p"], ["c"]) == [2.0]
    with pytest.raises(ValueError, match="no callable 'nope'"):
        load_function("tests.test_rewards:nope")


def test_weighted_sum_and_columns():
    cfg = RewardConfig(functions=["tests.test_rewards:length_reward", "pefrl.tasks.arithmetic:exact_match"],
                       weights=[0.5, 2.0])
    scorer = build_scorer(cfg)
    scores, stats = scorer(["1+1=", "2+2="], ["2", "5"], {"answer": ["2", "4"]})
    assert scores.tolist() == [0.5 * 1 + 2.0 * 1, 0.5 * 1 + 0.0]
    assert stats["reward/exact_match"] == 0.5


def test_failing_sample_is_named():
    scorer = Scorer([("flaky", flaky, 1.0)])
    with pytest.raises(RewardError, match=r"flaky failed on sample 1 \(prompt 'p1'"):
        scorer(["p0", "p1"], ["ok", "boom"], {})


def test_skip_counts_failures():
    scorer = Scorer([("flaky", flaky, 1.0)], on_error="skip")
    scores, stats = scorer(["p0", "p1", "p2"], ["ok", "boom", "ok"], {})
    assert scores.tolist() == [1.0, 0.0, 1.0] and stats["reward_failures"] == 1


def test_nan_is_rejected_naming_sample():
    scorer = Scorer([("nan_reward", nan_reward, 1.0)])
    with pytest.raises(RewardError, match="nan for sample 1"):
        scorer(["a", "b"], ["y", "x"], {})


def test_timeout():
    import time

    def slow(prompts, completions, **kw):
        time.sleep(2)
        return [0.0] * len(completions)

    scorer = Scorer([("slow", slow, 1.0)], timeout_s=0.2)
    with pytest.raises(RewardError, match="timeout_s"):
        scorer(["a"], ["b"], {})


# --- return values ------------------------------------------------------------------------------------------


def test_none_is_an_error_naming_the_sample_or_a_counted_failure_with_skip():
    nones = lambda prompts, completions, **_: [None] * len(completions)
    with pytest.raises(RewardError, match=r"<lambda> returned None for sample 0 \(prompt 'a'\)"):
        Scorer([("<lambda>", nones, 1.0)])(["a", "b"], ["x", "y"], {})
    scores, stats = Scorer([("n", nones, 1.0)], on_error="skip")(["a", "b"], ["x", "y"], {})
    assert scores.tolist() == [0.0, 0.0] and stats["reward_failures"] == 2


@pytest.mark.parametrize("bad, message", [
    ({"x": 1.0, "y": 2.0}, "returned a dict for 2 completions"),
    ("10", "returned a str for 2 completions"),
    (1.0, "returned a float for 2 completions"),
    ([[1.0], [2.0]], r"returned \[1.0\] for sample 0"),
])
def test_values_that_are_not_one_number_per_completion_are_rejected(bad, message):
    scorer = Scorer([("r", lambda prompts, completions, **_: bad, 1.0)], on_error="skip")  # skip: still an error
    with pytest.raises(RewardError, match=message):
        scorer(["a", "b"], ["x", "y"], {})


def test_numpy_and_torch_numbers_and_arrays_are_accepted():
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    for value in (np.array([1.0, 2.0]), np.array([1, 2], dtype=np.int64), torch.tensor([1.0, 2.0]),
                  [np.float32(1.0), np.float64(2.0)], [torch.tensor(1.0), torch.tensor(2)], (1, 2.0)):
        scores, _ = Scorer([("r", lambda prompts, completions, **_: value, 1.0)])(["a", "b"], ["x", "y"], {})
        assert scores.tolist() == [1.0, 2.0], value
    with pytest.raises(RewardError, match=r"an array of shape \(2, 1\)"):
        Scorer([("r", lambda *a, **k: torch.ones(2, 1), 1.0)])(["a", "b"], ["x", "y"], {})


def test_a_batch_that_fails_but_whose_samples_succeed_is_counted_and_warned_about_once():
    one_at_a_time = lambda prompts, completions, **_: [1.0] if len(completions) == 1 else 1 / 0
    scorer = Scorer([("one_at_a_time", one_at_a_time, 1.0)])
    with pytest.warns(UserWarning, match="one_at_a_time failed on a batch of 2 but succeeded on every sample"):
        scores, stats = scorer(["a", "b"], ["x", "y"], {})
    assert scores.tolist() == [1.0, 1.0] and stats["reward_batch_retries"] == 1 and stats["reward_failures"] == 0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second step is silent, and still counted
        assert scorer(["a", "b"], ["x", "y"], {})[1]["reward_batch_retries"] == 1
    _, stats = Scorer([("flaky", flaky, 1.0)], on_error="skip")(["p0", "p1"], ["ok", "boom"], {})
    assert stats["reward_batch_retries"] == 0  # explained by a failing sample: not a batch retry


# --- worker processes ---------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Running (a zombie, reparented where nobody reaps, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_hung_call_is_killed_and_the_other_samples_scored_by_a_closure(tmp_path):
    import multiprocessing
    import os
    import time

    pids = tmp_path / "pids"

    def hangs_on_h(prompts, completions, **_):  # a closure: cannot be pickled, runs in a forked worker
        if "h" in completions:
            pids.open("a").write(f"{os.getpid()}\n")
            while True:
                time.sleep(1)
        return [float(len(c)) for c in completions]

    scorer = Scorer([("hangs_on_h", hangs_on_h, 1.0)], on_error="skip", timeout_s=2.0, workers=2)
    scores, stats = scorer(["p0", "p1", "p2", "p3"], ["aa", "h", "aaa", "a"], {})
    assert scores.tolist() == [2.0, 0.0, 3.0, 1.0] and stats["reward_failures"] == 1
    hung = [int(p) for p in pids.read_text().split()]
    assert len(hung) == 2 and os.getpid() not in hung  # batch slice [p0, p1], then sample p1 alone
    assert not any(_alive(p) for p in hung)  # killed and reaped
    assert scorer(["p"], ["abcd"], {})[0].tolist() == [4.0]  # replaced: the next call works
    scorer.close()
    assert multiprocessing.active_children() == []


def test_workers_run_slices_of_the_batch_at_once(tmp_path):
    import os
    import time

    def rendezvous(prompts, completions, **_):  # returns only once both slices have started
        (tmp_path / f"started-{os.getpid()}").touch()
        for _ in range(600):
            if len(list(tmp_path.glob("started-*"))) == 2:
                return [float(os.getpid())] * len(completions)
            time.sleep(0.05)
        raise TimeoutError("the other slice never started: slices ran one after the other")

    scorer = Scorer([("rendezvous", rendezvous, 1.0)], workers=2)
    scores, stats = scorer(["a", "b", "c", "d"], ["w", "x", "y", "z"], {})
    scorer.close()
    pids = scores.tolist()
    assert pids[0] == pids[1] != pids[2] == pids[3] and os.getpid() not in pids
    assert stats["reward_batch_retries"] == 0


def test_reduce_stats_weights_means_by_samples_and_sums_counts():
    from pefrl.rewards import reduce_stats

    rank0 = {"reward_failures": 0.0, "reward_batch_retries": 1.0, "reward/r": 1.0}  # 2 samples
    rank1 = {"reward_failures": 3.0, "reward_batch_retries": 0.0, "reward/r": 0.25}  # 4 samples
    both = {}
    # a fake all-reduce: rank 1's packed tensor added to each rank's own
    pack = lambda stats, n: reduce_stats(stats, n, lambda t: (both.setdefault("t", t), t)[1])
    pack(rank1, 4)
    other = both["t"]
    got = reduce_stats(rank0, 2, lambda t: t + other)
    assert got == {"reward_failures": 3.0, "reward_batch_retries": 1.0, "reward/r": pytest.approx((2 * 1.0 + 4 * 0.25) / 6)}
    assert reduce_stats(rank0, 2, lambda t: t) == rank0  # one rank: unchanged


def test_no_reward_at_all_is_a_config_error():
    # a ConfigError, so the CLI prints it as one 'config error' line instead of a traceback
    with pytest.raises(ConfigError, match="no reward: set reward.functions and/or reward.model"):
        build_scorer(RewardConfig())

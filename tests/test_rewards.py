import math

import pytest

from pefrl.config import RewardConfig
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

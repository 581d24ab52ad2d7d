"""Rule rewards of the recipes (pefrl/tasks/math.py, pefrl/tasks/format.py) on hand-made examples."""

import pytest

from pefrl.config import RewardConfig
from pefrl.rewards import build_scorer
from pefrl.tasks.format import format_regex, length_score, length_target, make_format_regex, make_length_target
from pefrl.tasks.math import exact_match_extracted, exact_match_strict, extract_answer, normalize_number


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72", "72"),  # a GSM8K reference solution
    ("#### 1,234", "1234"),
    ("So the answer is 18.", "18"),
    ("The final answer is: **$5.50**", "5.5"),
    (r"Thus $x = \boxed{-3}$.", "-3"),
    ("12 + 30 = 42", "42"),            # no marker: last number (flexible)
    ("42", "42"),
    ("I am not sure.", None),
    ("The answer is 3, no wait, the answer is 4", "4"),  # the last marked answer wins
    ("#### 7 but the answer is 8", "7"),               # '####' outranks 'answer is'
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_strict_needs_a_marker():
    assert extract_answer("12 + 30 = 42", strict=True) is None
    assert extract_answer("so #### 42", strict=True) == "42"


@pytest.mark.parametrize("raw, expected", [("$1,234.00", "1234"), ("42.0", "42"), ("007", "7"), ("-0", "0"),
                                           ("0.50", "0.5"), ("12345678901234567890", "12345678901234567890"),
                                           ("abc", "abc")])
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


def test_exact_match_extracted_reads_gsm8k_references():
    completions = ["She has 5 + 7 = 12 apples. The answer is 12.", "#### 13", "12", "no idea"]
    answers = ["5 + 7 = 12\n#### 12", "12", "#### 12", "12"]
    assert exact_match_extracted([""] * 4, completions, answers) == [1.0, 0.0, 1.0, 0.0]
    # strict: the bare "12" no longer counts
    assert exact_match_strict([""] * 4, completions, answers) == [1.0, 0.0, 0.0, 0.0]


def test_exact_match_rejects_reference_without_number():
    with pytest.raises(ValueError, match=r"answer 1 \('n/a'\) holds no number"):
        exact_match_extracted(["", ""], ["1", "2"], ["1", "n/a"])


def test_length_score_by_hand():
    # target 10: |15-10|/10 = 0.5 -> 0.5; |5-10|/10 -> 0.5; 20 and beyond -> 0
    assert [length_score(n, 10) for n in (10, 15, 5, 20, 40, 0)] == [1.0, 0.5, 0.5, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        length_score(3, 0)


def test_length_target_uses_column_or_default():
    # default target 2: "42" -> 1, "  7 " -> |1-2|/2 -> 0.5, "123" -> 0.5
    assert length_target(["p"] * 3, ["42", "  7 ", "123"]) == [1.0, 0.5, 0.5]
    assert length_target(["p"] * 2, ["abcd", "abcd"], target_length=[4, 8]) == [1.0, 0.5]
    with pytest.raises(ValueError):  # one target per completion
        length_target(["p"] * 2, ["a", "b"], target_length=[1])


def test_format_regex_is_full_match():
    assert format_regex(["p"] * 4, ["42", " 42\n", "42 apples", ""]) == [1.0, 1.0, 0.0, 0.0]
    patterns = [r"yes|no", r"yes|no", r"(?s)<a>.*</a>"]
    assert format_regex(["p"] * 3, ["no", "maybe", "<a>x\ny</a>"], pattern=patterns) == [1.0, 0.0, 1.0]


def test_factories_fix_parameters():
    assert make_length_target(4)(["p"], ["abcdef"], target_length=[6]) == [0.5]  # the column is ignored
    assert make_format_regex(r"[A-Z]+")(["p", "p"], ["OK", "ok"]) == [1.0, 0.0]
    with pytest.raises(ValueError):
        make_length_target(0)


def test_rewards_load_by_import_path():
    cfg = RewardConfig(functions=["pefrl.tasks.math:exact_match_extracted", "pefrl.tasks.format:length_target"],
                       weights=[1.0, 0.5])
    scores, stats = build_scorer(cfg)(["1+1="] * 2, ["2", "20"], {"answer": ["#### 2", "#### 2"]})
    # "2": match 1 + 0.5 * length 1/2 -> 0.5*0.5; "20": no match + 0.5 * length exactly 2
    assert scores.tolist() == [1.0 + 0.25, 0.0 + 0.5]

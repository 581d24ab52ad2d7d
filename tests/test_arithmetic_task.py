"""The builtin arithmetic task, its sloppy teacher, and the shipped default model (pefrl/assets/tiny-arith)."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pefrl.tasks import arithmetic

# Band for greedy exact match on the first 200 eval problems, documented in the model card. The carry-free
# share of all pairs is 30.25%, so an asset that imitates its teacher lands near 0.30; one that learned real
# carries (too good) or failed to learn addition (too bad) falls outside.
GREEDY_BAND = (0.20, 0.40)


def test_split_is_disjoint_complete_and_deterministic():
    train, eval_ = arithmetic.pairs("train"), arithmetic.pairs("eval")
    assert len(train) == 9000 and len(eval_) == 1000
    assert set(train).isdisjoint(eval_)
    assert set(train) | set(eval_) == {(a, b) for a in range(100) for b in range(100)}
    # Fixed by sha256, not by a process-dependent hash or RNG: these are the first three eval problems.
    assert [r["prompt"] for r in arithmetic.problems("eval")[:3]] == ["71+63=", "46+48=", "12+62="]
    assert arithmetic.problems("eval")[0]["answer"] == "134"
    with pytest.raises(ValueError, match="split"):
        arithmetic.problems("test")


def test_exact_match_strips_whitespace_only():
    prompts = ["1+2=", "1+2=", "1+2=", "9+9=", "9+9="]
    completions = ["3", " 3\n", "03", "18 ", "1 8"]
    answer = ["3", "3", "3", "18", "18"]
    assert arithmetic.exact_match(prompts, completions, answer, other=[0] * 5) == [1.0, 1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        arithmetic.exact_match(["1+2="], ["3", "3"], ["3"])


def test_teacher_distribution_worked_by_hand():
    # 12+34: no carry, always right.
    assert arithmetic.teacher_distribution(12, 34, drop_prob=0.7) == {"46": 1.0}
    # 18+25 = 43: one units carry; forgotten (0.7) -> 33.
    assert arithmetic.teacher_distribution(18, 25, drop_prob=0.7) == pytest.approx({"43": 0.3, "33": 0.7})
    # 50+60 = 110: one tens carry; forgotten -> 10.
    assert arithmetic.teacher_distribution(50, 60, drop_prob=0.7) == pytest.approx({"110": 0.3, "10": 0.7})
    # 45+55 = 100: the units carry makes the tens carry; forgetting the units one gives 90 whatever the tens does
    # (0.7), keeping it and forgetting the tens one gives 0 (0.3 * 0.7), keeping both 100 (0.3 * 0.3).
    expected = {"100": 0.09, "0": 0.21, "90": 0.7}
    assert arithmetic.teacher_distribution(45, 55, drop_prob=0.7) == pytest.approx(expected)


def test_teacher_forgets_carries_at_drop_prob():
    rng = random.Random(0)
    met = forgot = 0
    for a, b in arithmetic.pairs("train")[:4000]:
        answer, carries, dropped = arithmetic.sloppy_sum(a, b, rng)
        met, forgot = met + carries, forgot + dropped
        if carries == 0:
            assert answer == str(a + b)
    rate = forgot / met  # ~3,900 carries: standard error ~0.007
    assert abs(rate - arithmetic.DROP_PROB) < 0.03, rate


@pytest.fixture(scope="module")
def asset():
    tokenizer = AutoTokenizer.from_pretrained(arithmetic.DEFAULT_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(arithmetic.DEFAULT_MODEL_DIR).eval()
    return model, tokenizer


def test_asset_tokenizer_restores_special_tokens_and_left_padding(asset):
    _, tok = asset
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "</s>", "<s>")
    assert tok.padding_side == "left"
    # Digits are single tokens and the prompt gets no BOS: the model was trained on the raw prompt.
    assert tok.convert_ids_to_tokens(tok("12+34=")["input_ids"]) == ["1", "2", "+", "3", "4", "="]
    files = sorted(p.name for p in arithmetic.DEFAULT_MODEL_DIR.iterdir())
    assert "model.safetensors" in files and "README.md" in files
    assert (arithmetic.DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size < 3_000_000


def test_asset_greedy_accuracy_in_documented_band_and_stops_at_eos(asset):
    model, tok = asset
    rows = arithmetic.problems("eval")[:200]
    result = arithmetic.evaluate(model, tok, rows, greedy=True)
    assert GREEDY_BAND[0] <= result["accuracy"] <= GREEDY_BAND[1], result
    assert result["eos_rate"] == 1.0
    recorded = json.loads((arithmetic.DEFAULT_MODEL_DIR / "build_metrics.json").read_text())
    assert result["accuracy"] == pytest.approx(recorded["greedy_accuracy_first200"], abs=0.011)
    completions, stopped = arithmetic.generate(model, tok, [r["prompt"] for r in rows[:50]])
    assert all(c.isdigit() for c in completions) and all(stopped)


def test_left_padding_does_not_change_greedy_answers(asset):
    model, tok = asset
    prompts = ["3+4=", "71+63=", "5+95="]  # lengths 4, 6, 5 tokens: two of three get left padding
    batched, _ = arithmetic.generate(model, tok, prompts)
    alone = [arithmetic.generate(model, tok, [p])[0][0] for p in prompts]
    assert batched == alone


def test_asset_samples_the_right_answer_sometimes(asset):
    # The right answer must be in the policy's support on carry problems, or exact-match RL has nothing to reward.
    model, tok = asset
    carry_pairs = [(a, b) for a, b in arithmetic.pairs("eval")[:100] if a % 10 + b % 10 >= 10][:40]
    rows = [{"prompt": arithmetic.prompt(a, b), "answer": str(a + b)} for a, b in carry_pairs]
    torch.manual_seed(0)
    result = arithmetic.evaluate(model, tok, rows, greedy=False, num_samples=8)
    assert result["pass@8"] >= 0.5, result

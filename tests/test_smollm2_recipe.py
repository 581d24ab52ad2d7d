"""The SmolLM2-135M-Instruct recipes (fp32 and 4-bit): their task and reward (fast), and smoke runs of the real
model followed by a verified merged export (slow; skipped when the model is not prepared on this machine)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pefrl.config_loader import load_config
from pefrl.tasks import smollm_arith

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "recipes" / "configs" / f"smollm2_ppo{s}.yaml" for s in ("", "_4bit")]


def test_answer_form_reward_pays_only_the_requested_sentence_with_the_right_sum():
    completions = ["The answer is 12.", " The answer is 12\n",  # the period may go, whitespace is ignored
                   "7 + 5 = 12", "12", "The answer is: 12.",        # right sum, other forms: nothing
                   "The answer is 13.", "The answer is 12. 7 + 5 = 12", "The answer is 120.", ""]
    assert smollm_arith.answer_form_reward([""] * 9, completions, ["12"] * 9) == [1, 1, 0, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="answers"):
        smollm_arith.answer_form_reward(["p"], ["1", "2"], ["1"])


def test_splits_are_disjoint_fixed_closed_under_order_and_match_the_committed_data():
    train, evals = smollm_arith.problems("train"), smollm_arith.problems("eval")
    assert (len(train), len(evals)) == (50, 50)
    sums = {split: {frozenset(map(int, re.findall(r"\d+", r["prompt"])[:2])) for r in rows}
            for split, rows in (("train", train), ("eval", evals))}
    assert not sums["train"] & sums["eval"]  # "3 + 4" held out means "4 + 3" is too
    assert evals[0] == {"prompt": "What is 0 + 4? Reply in the form 'The answer is N.'", "answer": "4"}
    for split, rows in (("train", train), ("eval", evals)):
        lines = (REPO / "recipes" / "data" / f"smollm_arith_{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows  # regenerate: python -m pefrl.tasks.smollm_arith


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_recipe_configs_differ_only_in_quantization(config):
    cfg = load_config(config)
    # The 4-bit recipe keeps the value loss off the policy adapter (critic adapter): on the earlier task its
    # shared-critic run went 0.24 -> 0.22, the critic adapter 0.24 -> 0.34 (docs/quantization.md).
    assert cfg.algo == "ppo" and cfg.model.critic == ("adapter" if "4bit" in config.stem else "shared")
    assert cfg.model.quantization == ("4bit" if "4bit" in config.stem else None)
    assert cfg.reward.functions == ["pefrl.tasks.smollm_arith:answer_form_reward"]


def _smollm2_prepared() -> bool:
    from pefrl.hub import ModelNotPreparedError, smollm2_path

    try:
        smollm2_path()
    except ModelNotPreparedError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_recipe_two_steps_then_verified_merged_export(config, tmp_path):
    if not _smollm2_prepared():
        pytest.skip("SmolLM2-135M-Instruct not prepared (python scripts/prepare_smollm2.py)")
    from pefrl.hub import smollm2_path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run, out = tmp_path / "run", tmp_path / "merged"
    train = subprocess.run([sys.executable, "-m", "pefrl", "train", str(config), "train.steps=2", f"output_dir={run}",
                            "data.eval_size=4", f"model.name_or_path={smollm2_path()}"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in records)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["eval_after"] <= 1.0

    export = subprocess.run([sys.executable, "-m", "pefrl", "export", str(run), "--out", str(out), "--merge",
                             "--dtype", "fp32"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert export.returncode == 0, export.stderr[-3000:]
    # the report is one JSON line; other libraries may log to stdout at import (deepspeed, when installed)
    report = json.loads(next(line for line in export.stdout.splitlines() if line.startswith("{")))
    assert report["max_abs_diff"] < 1e-3 and (out / "model.safetensors").is_file()

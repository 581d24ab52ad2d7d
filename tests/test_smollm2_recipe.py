"""The SmolLM2-135M-Instruct recipes (fp32 and 4-bit): their task and reward (fast), and smoke runs of the real
model followed by a verified merged export (slow; skipped when the model is not prepared on this machine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pefrl.config import load_config
from pefrl.tasks import smollm_arith

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "recipes" / "configs" / f"smollm2_ppo{s}.yaml" for s in ("", "_4bit")]


def test_answer_reward_pays_for_the_bare_number_and_half_for_a_stated_one():
    completions = ["12", " 12.\n", "7 + 5 = 12, the", "The answer is: 12.", "12 + 0 = 7", "A simple way: 12 +",
                   "13", "7 + 5 = 13", ""]
    assert smollm_arith.answer_reward([""] * 9, completions, ["12"] * 9) == [1, 1, .5, .5, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="answers"):
        smollm_arith.answer_reward(["p"], ["1", "2"], ["1"])


def test_splits_are_disjoint_fixed_and_match_the_committed_data():
    train, evals = smollm_arith.problems("train"), smollm_arith.problems("eval")
    assert (len(train), len(evals)) == (75, 25)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert evals[0] == {"prompt": "What is 7 + 5? Reply with just the number.", "answer": "12"}
    for split, rows in (("train", train), ("eval", evals)):
        lines = (REPO / "recipes" / "data" / f"smollm_arith_{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows  # regenerate: python -m pefrl.tasks.smollm_arith


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_recipe_configs_differ_only_in_quantization(config):
    cfg = load_config(config)
    # The 4-bit recipe keeps the value loss off the policy adapter (critic adapter): its shared-critic run went
    # 0.24 -> 0.22, the critic adapter 0.24 -> 0.34 (recipes/configs/smollm2_ppo_4bit.yaml).
    assert cfg.algo == "ppo" and cfg.model.critic == ("adapter" if "4bit" in config.stem else "shared")
    assert cfg.model.quantization == ("4bit" if "4bit" in config.stem else None)
    assert cfg.reward.functions == ["pefrl.tasks.smollm_arith:answer_reward"]


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
    report = json.loads(export.stdout.splitlines()[0])
    assert report["max_abs_diff"] < 1e-3 and (out / "model.safetensors").is_file()

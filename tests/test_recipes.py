"""Recipes: every config in recipes/configs loads and names files that exist; smoke runs of 2 steps (slow).

The smoke runs are subprocesses, as a user runs them (`python -m pefrl train CONFIG train.steps=2 ...`), from the
repository root since recipe configs name data files relative to it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pefrl.config_loader import load_config
from pefrl.data import load_rows
from pefrl.rewards import load_function

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
RECIPES = {"math_gsm8k_style", "format_length", "reward_model", "guessing_game"}


def _embedded_model_present() -> bool:
    from pefrl.tasks.arithmetic import DEFAULT_MODEL_DIR

    return (DEFAULT_MODEL_DIR / "config.json").is_file()


def test_issue_recipes_are_present():
    assert RECIPES <= {c.stem for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_recipe_config_loads_and_its_files_exist(config, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(config)
    if config.stem in RECIPES:
        assert "Real model" in config.read_text(), f"{config.name} must name the real model users would pick"
    for spec in cfg.reward.functions:
        load_function(spec)
    if cfg.reward.model:
        assert (REPO / cfg.reward.model / "config.json").is_file()
    if cfg.env.name:
        from pefrl.envs import make_envs

        assert isinstance(make_envs(cfg.env.name, [0])[0].reset(), str)
        return
    for source in (cfg.data.prompts, cfg.data.eval_prompts):
        if source and not source.startswith("builtin:"):
            rows = load_rows(source, cfg.data)
            assert len(rows) >= cfg.rollout.batch_size


def test_committed_reward_model_scores_even_completions_high():
    from pefrl.rewards import RewardModel

    rm = RewardModel(str(REPO / "recipes" / "reward_models" / "even-number"))
    scores = rm(["12+30=", "9+9=", "1+1=", "5+5=", "50+50="], ["42", "17", "", "abc", "100"])
    assert scores[0] > 1 and scores[4] > 1  # even
    assert scores[1] < -1 and scores[2] < -1 and scores[3] < -1  # odd, empty, not a number


def _train(config: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pefrl", "train", str(config), "train.steps=2", f"output_dir={out}",
           "data.eval_size=8", "train.eval_every=0", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_recipe_smoke_two_steps(config, tmp_path):
    if not _embedded_model_present():
        pytest.skip("embedded model pefrl/assets/tiny-arith not built")
    cfg = load_config(config)
    if cfg.model.name_or_path and not Path(cfg.model.name_or_path).expanduser().exists():
        pytest.skip(f"{cfg.model.name_or_path} is not prepared here (see the config's header)")
    out = tmp_path / "run"
    result = _train(config, out)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]
    assert (out / "final" / "pefrl_heads.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "eval_after" in summary


@pytest.mark.slow
def test_math_recipe_then_eval_and_plot(tmp_path):
    """The user's path after training: `pefrl eval` reproduces the trainer's final evaluation; `pefrl plot`."""
    if not _embedded_model_present():
        pytest.skip("embedded model pefrl/assets/tiny-arith not built")
    out = tmp_path / "run"
    assert _train(REPO / "recipes" / "configs" / "math_gsm8k_style.yaml", out).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "pefrl", "eval", str(out), "--size", "8"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert evaluated["n"] == 8 and evaluated["reward_mean"] == pytest.approx(summary["eval_after"], abs=1e-6)
    plot = subprocess.run([sys.executable, "-m", "pefrl", "plot", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert plot.returncode == 0 and (out / "metrics.png").stat().st_size > 10_000


TIMING = {"step_time_s", "step_cpu_s", "gen_time_s", "score_time_s", "reference_time_s", "train_time_s",
          "gen_tokens_per_s"}


@pytest.mark.slow  # 8 subprocess runs (about 90 s on 2 cores)
@pytest.mark.parametrize("algo", ["ppo", "grpo", "trpo", "dapo"])  # dapo: dynamic sampling's refills
def test_recipe_script_writes_the_metrics_of_pefrl_train(algo, tmp_path):
    """recipes/<algo>.py spells out the loop of `pefrl train`: on the same config both write the same
    metrics.jsonl, every field but the timings, to the bit (one thread, CPU)."""
    if not _embedded_model_present():
        pytest.skip("embedded model pefrl/assets/tiny-arith not built")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    config = REPO / "recipes" / "configs" / f"arithmetic_{algo}.yaml"
    common = ["train.steps=2", "rollout.batch_size=8", "rl.minibatch_size=4", "data.eval_size=8", "train.eval_every=1"]
    script = subprocess.run([sys.executable, str(REPO / "recipes" / f"{algo}.py"), "--config", str(config),
                             f"output_dir={tmp_path / 'script'}", *common], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert script.returncode == 0, script.stderr[-3000:]
    assert _train(config, tmp_path / "train", *common).returncode == 0

    def records(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]

    script_records, train_records = records("script"), records("train")
    assert [r["step"] for r in script_records] == [0, 1] and "eval_reward_mean" in script_records[0]
    assert script_records == train_records

"""The README is the project's contract with a new user: its commands must be the ones that work (CI runs the
test command verbatim), and its reward example must run as written."""

import re
import shlex
import tomllib
from pathlib import Path

import yaml

from pefrl.config_loader import load_config
from pefrl.rewards import build_scorer, load_function

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    return [line for block in _blocks("bash") for line in block.splitlines() if line.startswith("pip install torch")]


def test_ci_runs_the_readme_test_command_verbatim():
    tests = [c for c in _commands() if "pytest" in c]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert len(tests) == 1 and ci == tests


def test_the_readme_run_command_names_a_real_entry_point_and_config():
    (run,) = [c for c in _commands() if "pefrl train" in c]
    argv = shlex.split(run.split("&&")[-1])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[:2] == ["pefrl", "train"] and "pefrl" in scripts
    cfg = load_config(REPO / argv[2], argv[3:])  # loads, and its builtin data and reward resolve
    build_scorer(cfg.reward, [])


def test_the_readme_reward_example_runs_as_written(tmp_path, monkeypatch):
    """The python block is my_rewards.py, the yaml block's reward section loads it by path; scoring works."""
    (example,) = [b for b in _blocks("python") if b.startswith("# my_rewards.py")]
    (reward_yaml,) = [b for b in _blocks("yaml") if b.startswith("reward:")]
    (tmp_path / "my_rewards.py").write_text(example)
    monkeypatch.chdir(tmp_path)
    section = yaml.safe_load(reward_yaml)["reward"]
    cfg = load_config(None, [f"reward.functions={section['functions']}", f"reward.weights={section['weights']}"])
    fn = load_function(cfg.reward.functions[0])
    assert fn(["1+1=", "2+2="], [" 2", "5"], answer=["2", "4"]) == [1.0, 0.0]

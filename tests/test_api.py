"""The Python API (pefrl.load_config / train / evaluate) as a user drives it: callables as rewards, rows as
prompts, data the test writes, run from a directory that is not the repository; and the README's example."""

import ast
import json
import os
import re
import subprocess
import sys
import types
from contextlib import chdir
from pathlib import Path

import pytest

import pefrl
from pefrl.cli import main
from pefrl.config import ConfigError, RewardConfig
from pefrl.data import DataError
from pefrl.rewards import RewardError, build_scorer, supply_rewards
from pefrl.saved import callable_spec
from pefrl.tasks.arithmetic import exact_match

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TINY = {"rollout": {"batch_size": 8, "max_new_tokens": 4}, "rl": {"minibatch_size": 8, "epochs": 1},
        "train": {"steps": 2}, "data": {"eval_size": 8}}


def write_problems(path: Path, n: int = 24) -> Path:
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in zip(range(10, 10 + n), range(30, 30 + n))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def exact(prompts, completions, answer, **columns):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


def metric_keys(run_dir: Path) -> set:
    return {k for line in (run_dir / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}


def test_readme_python_example_runs_from_another_directory(tmp_path):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    write_problems(tmp_path / "prompts.jsonl", 48)
    (tmp_path / "example.py").write_text(code)
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"eval \d\.\d\d -> \d\.\d\d", out.stdout)
    assert ast.literal_eval(out.stdout.strip().splitlines()[-1])["n"] == 32
    run_dir = tmp_path / "runs" / "api_demo"
    assert "reward/exact" in metric_keys(run_dir)
    saved = (run_dir / "config.yaml").read_text()
    assert "<callable>:exact" in saved  # defined in __main__: recorded by name, with the marker
    assert f"eval_prompts: {tmp_path / 'prompts.jsonl'}" in saved  # absolute

    # pefrl eval from elsewhere: says what to pass, then works with it
    (tmp_path / "rw.py").write_text("def exact(prompts, completions, answer, **columns):\n"
                                    "    return [float(c.strip() == a) for c, a in zip(completions, answer)]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    fail = subprocess.run([sys.executable, "-m", "pefrl.cli", "eval", str(run_dir), "--size", "8"], cwd=elsewhere,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert fail.returncode == 1
    assert "--reward" in fail.stderr and "pefrl.evaluate(" in fail.stderr and "Loading" not in fail.stderr
    ok = subprocess.run([sys.executable, "-m", "pefrl.cli", "eval", str(run_dir), "--size", "8", "--reward",
                         str(tmp_path / "rw.py") + ":exact"], cwd=elsewhere, env=ENV, capture_output=True, text=True,
                        timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout.strip().splitlines()[-1])["n"] == 8


def test_train_with_callables_in_dict_config_and_dataset_prompts(tmp_path, capsys):
    import datasets

    write_problems(tmp_path / "eval.jsonl", 8)
    rows = [json.loads(line) for line in write_problems(tmp_path / "train.jsonl").read_text().splitlines()]
    short = lambda prompts, completions, **_: [-len(c) / 10 for c in completions]  # noqa: E731
    with chdir(tmp_path):
        cfg = pefrl.load_config({**TINY, "output_dir": "run", "data": {"eval_prompts": "eval.jsonl", "eval_size": 8},
                                 "reward": {"functions": [exact_match, short], "weights": [1.0, 0.5]}},
                                overrides=["train.seed=3"])
        assert cfg.reward.functions == [exact_match, short] and cfg.train.seed == 3
        summary = pefrl.train(cfg, rewards=[exact], prompts=datasets.Dataset.from_list(rows))
    assert summary["steps"] == 2
    assert {"reward/exact_match", "reward/<lambda>", "reward/exact"} <= metric_keys(tmp_path / "run")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "- pefrl.tasks.arithmetic:exact_match" in saved  # importable: by import path
    assert "- <callable>:<lambda>" in saved
    assert "test_api:exact" in saved or "<callable>:exact" in saved
    # the run is evaluated through the API, the lambda passed again by name
    short.__name__ = "<lambda>"
    result = pefrl.evaluate(tmp_path / "run", rewards=[short, exact], size=8)
    assert result["n"] == 8 and result["reward_mean"] == pytest.approx(summary["eval_after"], abs=1e-6)


def test_prompts_forms():
    from pefrl.api import prompt_rows

    assert prompt_rows(["1+1=", "2+2="]) == [{"prompt": "1+1="}, {"prompt": "2+2="}]
    assert prompt_rows([{"q": "1+1=", "answer": "2"}], "q") == [{"q": "1+1=", "answer": "2"}]
    online = prompt_rows(s for s in ["3+3="])
    assert not isinstance(online, list) and list(online) == [{"prompt": "3+3="}]
    with pytest.raises(DataError, match="row 1 must be a string or a dict of columns, got a int"):
        prompt_rows(["ok", 5])  # a dict's prompt is checked as the row is drawn (test_chat_data.py)
    with pytest.raises(DataError, match="set data.prompts"):
        prompt_rows("prompts.jsonl")


def test_load_config_stays_strict_and_takes_paths(tmp_path):
    with pytest.raises(ConfigError, match="did you mean train.lr"):
        pefrl.load_config({"lr": 1e-3})
    (tmp_path / "c.yaml").write_text("train: {steps: 7}\n")
    assert pefrl.load_config(str(tmp_path / "c.yaml"), ["train.lr=1e-3"]).train.steps == 7
    cfg = pefrl.load_config({"reward": {"functions": exact}})  # one callable, not a list
    assert cfg.reward.functions == [exact]
    assert pefrl.load_config(cfg, ["train.steps=3"]).reward.functions == [exact]


def test_callable_specs():
    def closure(prompts, completions, **_):
        return [0.0] * len(completions)

    assert callable_spec(exact_match) == "pefrl.tasks.arithmetic:exact_match"
    assert callable_spec(closure) == "<callable>:closure"
    assert callable_spec(lambda p, c: c) == "<callable>:<lambda>"
    main_fn = types.FunctionType(exact.__code__, {}, "exact")
    main_fn.__module__ = "__main__"
    assert callable_spec(main_fn) == "<callable>:exact"


def test_unimportable_reward_must_be_given_again():
    cfg = RewardConfig(functions=["<callable>:exact", "pefrl.tasks.arithmetic:exact_match"], weights=[2.0, 1.0])
    with pytest.raises(RewardError, match=r"--reward path/to/file.py:exact.*pefrl.evaluate\(run_dir, rewards=\[exact\]"):
        build_scorer(cfg)
    scorer = build_scorer(supply_rewards(cfg, [exact]))
    assert [(name, w) for name, _, w in scorer.functions] == [("exact", 2.0), ("exact_match", 1.0)]
    assert build_scorer(cfg, [("exact", exact)]).functions[0][1] is exact  # the legacy extra_rewards fill it too
    with pytest.raises(RewardError, match="matches none of the run's reward functions"):
        supply_rewards(cfg, [lambda p, c: c])


def test_import_pefrl_is_cheap_and_no_submodule_shadows_an_api_name():
    out = subprocess.run([sys.executable, "-c", "import sys, pefrl; pefrl.load_config; "
                          "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
    # importing a submodule sets it as an attribute of the package: none may be named like an API function
    import pefrl.evaluation  # noqa: F401  (the module behind pefrl.evaluate)

    for name in pefrl.__all__:
        assert not isinstance(getattr(pefrl, name), types.ModuleType), name
    assert callable(pefrl.evaluate) and callable(pefrl.train) and callable(pefrl.load_config)


def test_prompts_from_python_never_fall_back_to_the_builtin_eval_set(tmp_path):
    """data.eval_prompts 'auto' follows data.prompts (builtin: its eval set); prompts passed in Python replace
    data.prompts, so they must not be evaluated on the builtin arithmetic set (the user's reward may not fit it)."""
    seen = []

    def own(prompts, completions, **_):
        seen.extend(prompts)
        return [float(c.strip().isdigit()) for c in completions]

    cfg = pefrl.load_config({**TINY, "output_dir": str(tmp_path / "run"), "train": {"steps": 1}})
    summary = pefrl.train(cfg, rewards=[own], prompts=["what is 1+1?"] * 8)
    assert "eval_before" not in summary and set(seen) == {"what is 1+1?"}
    assert "eval_prompts: null" in (tmp_path / "run" / "config.yaml").read_text()

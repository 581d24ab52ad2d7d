"""The command line as a user meets it: a project directory with its own data and reward file, trained with
relative paths, then evaluated from another directory with options and overrides in any order; the start line,
plain progress lines off a terminal, the missing-model hint, and third-party noise filtered but not real warnings."""

import json
import logging
import re
import warnings
from contextlib import chdir
from pathlib import Path

import pytest

from pefrl import _quiet
from pefrl.cli import build_parser, main, split_overrides
from pefrl.config_loader import load_config
from pefrl.hub import INSTALL_HINT, PREPARE_HINT
from pefrl.rundir import RunDirError, check_resume_config

REWARD = ("def exact(prompts, completions, answer, **columns):\n"
          "    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]\n")
CONFIG = """\
output_dir: runs/demo
data: {prompts: data/train.jsonl, eval_prompts: data/eval.jsonl, eval_size: 8}
rollout: {batch_size: 8, max_new_tokens: 4}
rl: {minibatch_size: 8, epochs: 1}
reward: {functions: [rewards/mine.py:exact]}
train: {steps: 2, lr: 5.0e-4}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project trained with `pefrl train configs/demo.yaml` from its root: relative data, reward and output."""
    root = tmp_path_factory.mktemp("project")
    (root / "data").mkdir()
    (root / "rewards").mkdir()
    (root / "configs").mkdir()
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in zip(range(10, 34), range(40, 64))]
    for name, part in (("train", rows[8:]), ("eval", rows[:8])):
        (root / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (root / "rewards" / "mine.py").write_text(REWARD)
    (root / "configs" / "demo.yaml").write_text(CONFIG)
    return root


def test_train_prints_start_line_and_plain_steps_off_a_terminal(project, capsys):
    with chdir(project):
        assert main(["train", "configs/demo.yaml", "train.seed=1"]) == 0  # an override after the config
    out, err = capsys.readouterr()
    assert re.search(r"^pefrl ppo: 1 process, cpu, float32, model \S+tiny-arith \(llama, 0\.59M params\), "
                     r"trainable 0\.\d\dM \(lora r=16 on 14 modules = 2 layers x \(q_proj, k_proj, v_proj, o_proj, gate_proj, "
                     r"up_proj, down_proj\) \+ value head\)$", out, re.M)
    assert "step 1/2 | reward" in out and "step 2/2 | reward" in out
    assert "pefrl ppo" not in err and "step/s" not in err  # no progress bar of the loop
    saved = load_config(project / "runs" / "demo" / "config.yaml")
    assert saved.data.prompts == str(project / "data" / "train.jsonl")
    assert saved.reward.functions == [f"{project / 'rewards' / 'mine.py'}:exact"]
    assert saved.train.seed == 1


def test_eval_from_another_directory_with_overrides_after_options(project, tmp_path, capsys):
    run_dir = project / "runs" / "demo"
    assert (run_dir / "final").is_dir(), "needs the training test's run"
    with chdir(tmp_path):  # the run's relative paths would not resolve from here
        assert main(["eval", str(run_dir), "--size", "4", "data.eval_size=3", "--adapter", "final"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and result["data"] == str(project / "data" / "eval.jsonl")


def test_resume_check_sees_no_change_from_another_directory(project, tmp_path):
    saved = project / "runs" / "demo" / "config.yaml"
    with chdir(project):
        relative = load_config(project / "configs" / "demo.yaml", ["train.seed=1"])
        check_resume_config(saved, relative)  # relative here, absolute in the run: the same config
    with chdir(tmp_path):
        check_resume_config(saved, load_config(saved))
        with pytest.raises(RunDirError, match="data.prompts"):  # a real change is still one
            check_resume_config(saved, load_config(saved, [f"data.prompts={project / 'data' / 'eval.jsonl'}"]))


def test_split_overrides_keeps_option_values_and_files(tmp_path):
    parser = build_parser()
    (tmp_path / "x=y.yaml").write_text("train: {steps: 1}\n")
    with chdir(tmp_path):
        assert split_overrides(parser, ["train", "x=y.yaml", "a.b=1"]) == (["train", "x=y.yaml"], ["a.b=1"])
    assert split_overrides(parser, ["eval", "R", "--data", "k=v", "k2=v"]) == (["eval", "R", "--data", "k=v"], ["k2=v"])
    assert split_overrides(parser, ["plot", "R", "--out", "a=b"]) == (["plot", "R", "--out", "a=b"], [])
    args = parser.parse_args(split_overrides(parser, ["train", "train.steps=3"])[0])
    assert args.config is None


def test_missing_cached_model_names_the_preparation(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEFRL_CACHE", str(tmp_path / "cache"))
    for missing, expect in ((tmp_path / "cache" / "SmolLM2-135M-Instruct", f"{PREPARE_HINT} --out"),
                            (tmp_path / "cache" / "SmolLM2-missing", PREPARE_HINT)):
        assert main(["train", f"model.name_or_path={missing}", f"output_dir={tmp_path / 'run'}"]) == 1
        err = capsys.readouterr().err
        assert f"{missing} does not exist" in err and INSTALL_HINT in err and expect in err
    assert main(["train", f"model.name_or_path={tmp_path / 'elsewhere'}", f"output_dir={tmp_path / 'run'}"]) == 1
    assert PREPARE_HINT not in capsys.readouterr().err  # not pefrl's cache: no preparation to name


def test_known_noise_is_filtered_and_real_warnings_still_show(caplog):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _quiet.install()
        for message, module in (("`is_gradient_checkpointing` is deprecated and will be removed in v6.",
                                 "transformers.modeling_utils"),
                                ("`something_else` is deprecated", "transformers.modeling_utils"),
                                ("`is_gradient_checkpointing` is deprecated", "mypackage.model")):
            warnings.warn_explicit(message, FutureWarning, "f.py", 1, module=module)
    assert [str(w.message) for w in seen] == ["`something_else` is deprecated",
                                              "`is_gradient_checkpointing` is deprecated"]
    logger = logging.getLogger(_quiet.BNB_LOGGER)
    with caplog.at_level(logging.WARNING, logger=_quiet.BNB_LOGGER):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "x")
        logger.warning("a real bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes problem"]


def test_bitsandbytes_import_is_quiet_after_pefrl():
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = "import {}bitsandbytes, logging; logging.getLogger('bitsandbytes.backends.cpu.ops').warning('kept')"
    quiet = subprocess.run([sys.executable, "-c", code.format("pefrl.cli, ")], env=env, capture_output=True,
                           text=True, timeout=300)
    assert "kernels-community" not in quiet.stderr and "kept" in quiet.stderr

"""`pefrl plot`, `pefrl init`, `pefrl eval` and scripts/gen_config_reference.py."""

import importlib.util
import json
from pathlib import Path

import pytest

from pefrl.cli import main
from pefrl.commands.plot import plot_metrics, series
from pefrl.config_loader import load_config, reference
from pefrl.rewards import build_scorer

REPO = Path(__file__).resolve().parents[1]


def _write_metrics(run_dir: Path, steps: int = 6, eval_every: int = 3) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(steps):
        record = {"step": s, "reward_mean": 0.1 * s, "reward_std": 0.05, "kl": 0.01 * s, "entropy": 1.0 - 0.1 * s,
                  "gen_time_s": 0.5, "score_time_s": 0.1, "reference_time_s": 0.2, "train_time_s": 0.7,
                  "step_time_s": 1.6}
        if (s + 1) % eval_every == 0:
            record["eval_reward_mean"] = 0.2 * s
        lines.append(json.dumps(record))
    lines[2] = lines[2].replace('"kl": 0.02', '"kl": null')  # a non-finite value, as MetricsWriter writes it
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_series_skips_missing_and_null_values(tmp_path):
    _write_metrics(tmp_path)
    from pefrl.metrics import read_metrics

    records = read_metrics(tmp_path)
    assert series(records, "eval_reward_mean") == ([3, 6], [0.4, 1.0])  # 1-based steps 3 and 6
    assert series(records, "kl")[0] == [1, 2, 4, 5, 6]  # step 3's null is skipped, not plotted as 0


def test_plot_writes_png_default_and_out(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _write_metrics(run_dir)
    (run_dir / "summary.json").write_text(json.dumps({"eval_before": 0.0, "eval_after": 1.0}))
    assert main(["plot", str(run_dir)]) == 0
    png = run_dir / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == str(png)
    out = tmp_path / "elsewhere" / "m.png"
    assert main(["plot", str(run_dir), "--out", str(out)]) == 0 and out.stat().st_size > 10_000


def test_plot_without_timings_or_eval(tmp_path):
    records = [{"step": s, "reward_mean": float(s)} for s in range(3)]  # e.g. a run from an older version
    out = plot_metrics(records, tmp_path / "m.png")
    assert out.is_file()
    with pytest.raises(ValueError, match="empty"):
        plot_metrics([], tmp_path / "n.png")


def test_plot_missing_run_dir_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        main(["plot", str(tmp_path / "nope")])


def test_init_writes_loadable_config_and_reward(tmp_path, monkeypatch, capsys):
    target = tmp_path / "proj"
    assert main(["init", str(target)]) == 0
    assert "pefrl train config.yaml" in capsys.readouterr().out
    monkeypatch.chdir(target)  # the config names my_reward.py relative to where pefrl runs
    cfg = load_config("config.yaml")
    assert cfg.reward.functions == ["my_reward.py:reward"]
    assert cfg.rollout.num_sequences % cfg.minibatch_size == 0
    scores, _ = build_scorer(cfg.reward)(["2+3=", "9+9="], ["5", "17"], {"answer": ["5", "18"]})
    assert scores.tolist() == [1.0, 0.0]


def test_init_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "my_reward.py").write_text("# mine\n")
    assert main(["init", str(tmp_path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "my_reward.py").read_text() == "# mine\n"
    assert not (tmp_path / "config.yaml").exists()  # nothing written when anything would be overwritten


def _gen_reference_module():
    spec = importlib.util.spec_from_file_location("gen_config_reference", REPO / "scripts" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gen_config_reference_writes_and_checks(tmp_path, capsys):
    gen = _gen_reference_module()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n{gen.START}\nold table\n{gen.END}\n\noutro\n")
    assert gen.main(["--readme", str(readme), "--check"]) == 1  # stale
    assert gen.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\nintro\n") and text.endswith(f"{gen.END}\n\noutro\n")
    assert reference() in text and "old table" not in text
    assert "| `rollout.temperature` | float | `1.0` |" in text
    assert gen.main(["--readme", str(readme), "--check"]) == 0  # fresh now
    readme.write_text(text.replace("Sampling temperature", "Sampling temp"))
    assert gen.main(["--readme", str(readme), "--check"]) == 1


def test_gen_config_reference_needs_markers(tmp_path):
    gen = _gen_reference_module()
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    assert gen.main(["--readme", str(readme)]) == 2
    assert readme.read_text() == "no markers\n"


def text_code(prompts, completions, **columns):
    """A reward that tells completions apart (any change of text changes it): a checksum in [0, 1)."""
    return [sum(map(ord, c)) % 97 / 97 for c in completions]


def test_eval_loads_the_runs_adapters(tmp_path, capsys):
    import torch

    from pefrl.evaluation import evaluate_run
    from pefrl.config import Config
    from pefrl.config_loader import save_config
    from pefrl.data import load_rows
    from pefrl.adapters_io import save_adapters
    from pefrl.models import load_models, load_tokenizer
    from pefrl.tiny import build_model, build_tokenizer
    from pefrl.evaluation import evaluate

    torch.set_num_threads(1)
    model_dir, run_dir = tmp_path / "base", tmp_path / "run"
    tok = build_tokenizer()
    build_model("llama", tok, hidden_size=32, num_layers=2).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = load_config(None, [f"model.name_or_path={model_dir}", "reward.functions=[tests.test_cli_commands:text_code]",
                             "rollout.batch_size=4", "rollout.max_new_tokens=4", "rl.minibatch_size=4"])
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    models = load_models(cfg.model, cfg.lora, uses_critic=True)  # as training saves it: with the critic
    with torch.no_grad():  # a policy far from the base, so greedy completions differ
        for name, p in models.model.named_parameters():
            if "lora_B" in name and ".policy." in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    save_adapters(models, run_dir / "final")
    rows = load_rows("builtin:arithmetic-eval")[:8]
    expected = evaluate(models, load_tokenizer(cfg.model), rows, cfg, build_scorer(cfg.reward))["reward_mean"]

    result = evaluate_run(run_dir, size=8)
    assert result["n"] == 8 and result["data"] == "builtin:arithmetic-eval"
    assert result["reward_mean"] == pytest.approx(expected, abs=1e-6)
    assert evaluate_run(run_dir, size=8, adapter="none")["reward_mean"] != pytest.approx(expected, abs=1e-6)
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--data", "builtin:arithmetic-eval", "--size", "8"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["reward_mean"] == pytest.approx(expected)
    # a run directory is code: eval says which of it it imports
    assert f"{run_dir / 'config.yaml'} makes this import and run: tests.test_cli_commands:text_code" in captured.err
    with pytest.raises(FileNotFoundError, match="no adapter directory"):
        evaluate_run(run_dir, adapter="checkpoint-9")
    (run_dir / "checkpoint-3").mkdir()
    (run_dir / "final").rename(run_dir / "checkpoint-3" / "adapters")  # a checkpoint's layout
    assert evaluate_run(run_dir, size=8, adapter="checkpoint-3")["reward_mean"] == pytest.approx(expected, abs=1e-6)


def test_readme_config_reference_is_fresh():
    gen = _gen_reference_module()
    text = (REPO / "README.md").read_text()
    if gen.START not in text:
        pytest.skip("README has no config-reference markers yet")
    assert gen.main(["--check"]) == 0, "run: python scripts/gen_config_reference.py"


@pytest.mark.parametrize("argv, message", [
    (["train", "lr=3e-4"], "pefrl train: config error: unknown config key lr; did you mean train.lr?"),
    (["train", "train.lr=inf"], "pefrl train: config error: train.lr must be a finite number, got inf"),
    (["train", "train.steps=1", "data.prompts=./no/such/prompts.jsonl", "output_dir=/tmp/pefrl-never-written",
      "reward.functions=[pefrl.tasks.arithmetic:exact_match]"],
     "pefrl train: error: data.prompts ./no/such/prompts.jsonl does not exist"),
    (["eval", "./no/such/run"], "pefrl eval: error: no/such/run/config.yaml does not exist"),
])
def test_pefrl_errors_print_one_line_and_exit_1(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("PEFRL_DEBUG", raising=False)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.endswith("\n") and message in err.splitlines()[-1] and "Traceback" not in err


def test_pefrl_debug_shows_the_traceback(monkeypatch):
    from pefrl.config import ConfigError
    from pefrl.errors import PefrlError

    monkeypatch.setenv("PEFRL_DEBUG", "1")
    with pytest.raises(ConfigError) as info:
        main(["train", "lr=3e-4"])
    assert isinstance(info.value, PefrlError) and info.traceback  # raised, so Python prints the traceback


def test_every_subcommand_is_registered(capsys):
    from pefrl.commands import COMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out.split("{", 1)[1].split("}", 1)[0].split(",") for name in COMMANDS)

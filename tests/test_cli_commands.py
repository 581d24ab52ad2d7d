"""`pefrl plot`, `pefrl init`, `pefrl eval` and scripts/gen_config_reference.py."""

import importlib.util
import json
from pathlib import Path

import pytest

from pefrl.cli import main
from pefrl.commands.plot import plot_metrics, series
from pefrl.config import load_config, reference
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
    assert cfg.rollout.num_sequences % cfg.rl.minibatch_size == 0
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

"""scripts/race.py, pefrl side only: schedule matching, contestant selection, the one evaluation path, the table,
verdict and plot, and a whole race of one contestant on the embedded tiny model (TRL is never imported here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


race = _load("race")


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_trl_schedule_is_pefrl_warmup_then_constant():
    # TRL's default (linear decay to zero) must never be what the TRL side runs
    assert race.trl_scheduler(0) == {"lr_scheduler_type": "constant"}
    assert race.trl_scheduler(5) == {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 5}


def test_contestants_share_settings_and_ppo_gets_the_same_samples(tmp_path):
    from pefrl.config_loader import load_config

    a = race.parse_args(["--tiny", "--steps", "4", "--save-every", "2", "--batch-size", "4", "--num-samples", "2",
                         "--minibatch-size", "8", "--warmup-steps", "3"])
    cfgs = {c: load_config(None, race.pefrl_overrides(a, race.CONTESTANTS[c], tmp_path / c)) for c in ("grpo", "ppo")}
    for cfg in cfgs.values():
        assert (cfg.train.lr, cfg.train.warmup_steps, cfg.rl.kl_coef, cfg.lora.r, cfg.rollout.temperature) == \
            (a.lr, 3, a.kl_coef, a.lora_r, a.temperature)
        assert cfg.rollout.num_sequences == 8 and cfg.train.save_every == 2 and cfg.train.keep_last >= 2
        assert not cfg.data.eval_prompts  # the trainer does not evaluate: race.evaluate_adapters does, afterwards
    assert (cfgs["ppo"].rollout.batch_size, cfgs["ppo"].rollout.num_samples) == (8, 1)
    assert race.checkpoints(a) == [2, 4]


def test_a_contestant_whose_algorithm_is_missing_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setitem(race.CONTESTANTS, "nope", race.Contestant("nope", "pefrl", "no-such-algo"))
    chosen, notes = race.available(["grpo", "nope", "trl-grpo"])
    assert [c.name for c in chosen] == ["grpo", "trl-grpo"]
    assert len(notes) == 1 and notes[0].startswith("nope: skipped")
    with pytest.raises(SystemExit):
        race.available(["grpo", "typo"])


def _points(name_acc_cpu):
    return [{"step": s, "samples": 10 * s, "cpu_s": cpu, "greedy": acc, "pass_at_k": acc, "mean_at_k": acc}
            for s, (acc, cpu) in enumerate(name_acc_cpu)]


def test_verdict_table_and_plot(tmp_path):
    results = {"grpo": _points([(0.2, 0.0), (0.5, 10.0), (0.7, 20.0)]),
               "ppo": _points([(0.2, 0.0), (0.3, 15.0), (0.4, 30.0)]),
               "trl-grpo": _points([(0.2, 0.0), (0.4, 25.0), (0.5, 50.0)])}
    lines = race.verdict(results)
    assert "grpo: reached it at step 1, 10 CPU s = 0.20 of trl-grpo's" in lines  # 0.5 first reached at 10 / 50
    assert "ppo: did not reach it within the budget" in lines
    assert "| grpo | 2 | 20 | 20.0 | 0.70 | 0.70 | 0.70 |" in race.table(results, 4)
    flat = {"grpo": results["grpo"], "trl-grpo": _points([(0.2, 0.0), (0.1, 25.0), (0.2, 50.0)])}
    assert "says nothing about learning" in race.verdict(flat)[0]  # TRL ended at the base's accuracy
    png = race.plot(results, tmp_path / "race.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peft_adapter_adopted_for_the_one_evaluation_path(tmp_path):
    from pefrl.adapters_io import load_adapters
    from pefrl.config import LoraConfig, ModelConfig
    from pefrl.models import load_models

    import torch

    models = load_models(ModelConfig(), LoraConfig(r=2, alpha=4), uses_critic=False)
    lora_b = [p for n, p in models.model.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        lora_b[0].fill_(0.5)
    models.model.save_pretrained(str(tmp_path / "trl"))  # a bare peft adapter, as TRL saves it
    (tmp_path / "adapters").mkdir()
    (tmp_path / "trl" / "policy").rename(tmp_path / "adapters" / "policy")
    race.adopt_peft_adapter(tmp_path / "adapters")
    fresh = load_models(ModelConfig(), LoraConfig(r=2, alpha=4), uses_critic=False)
    load_adapters(fresh, tmp_path / "adapters")
    assert [p for n, p in fresh.model.named_parameters() if "lora_B" in n][0].eq(0.5).all()
    with pytest.raises(FileNotFoundError):
        race.adopt_peft_adapter(tmp_path / "empty")


def test_tiny_race_of_one_contestant(tmp_path, capsys):
    out, png = tmp_path / "race", tmp_path / "race.png"
    race.main(["--tiny", "--contestants", "grpo", "--steps", "2", "--save-every", "1", "--batch-size", "4",
               "--num-samples", "2", "--minibatch-size", "8", "--eval-size", "6", "--k", "2", "--parallel", "1",
               "--out", str(out), "--plot", str(png)])
    saved = json.loads((out / "race.json").read_text())
    points = saved["points"]["grpo"]
    assert [p["step"] for p in points] == [0, 1, 2] and [p["samples"] for p in points] == [0, 8, 16]
    assert 0 == points[0]["cpu_s"] < points[1]["cpu_s"] < points[2]["cpu_s"]
    for p in points:
        assert 0.0 <= p["mean_at_k"] <= p["pass_at_k"] <= 1.0 and 0.0 <= p["greedy"] <= 1.0 and p["n"] == 6
    assert png.is_file() and "| grpo | 2 | 16 |" in capsys.readouterr().out


def test_split_table_gives_each_stage_its_share_of_the_step():
    # stage wall seconds summed over two steps: generate 2, update 4 of 6 -> 33% / 67%
    run = {"step_cpu_s": [1.0, 3.0], "split_s": {"gen_time_s": [1.0, 1.0], "score_time_s": [0.0, 0.0],
                                                 "reference_time_s": [0.0, 0.0], "train_time_s": [1.0, 3.0]}}
    assert "| grpo | 2.00 | 33% | 0% | 0% | 67% |" in race.split_table({"grpo": run})


def test_mean_over_seeds_averages_each_point_and_keeps_contestants_every_seed_has():
    def pt(step, cpu, greedy):
        return {"step": step, "samples": 32 * step, "cpu_s": cpu, "greedy": greedy, "pass_at_k": greedy,
                "mean_at_k": greedy / 2}

    seed0 = {"grpo": [pt(0, 0, 0.2), pt(2, 30, 0.6)], "trl-grpo": [pt(0, 0, 0.2), pt(2, 60, 0.4)]}
    seed1 = {"grpo": [pt(0, 0, 0.2), pt(2, 34, 0.8)], "ppo": [pt(0, 0, 0.2), pt(2, 50, 0.3)]}
    mean = race.mean_points([seed0, seed1])
    assert list(mean) == ["grpo"]  # ppo and trl-grpo ran in one seed only
    assert mean["grpo"][1]["step"] == 2 and mean["grpo"][1]["samples"] == 64
    assert mean["grpo"][1]["cpu_s"] == pytest.approx(32) and mean["grpo"][1]["greedy"] == pytest.approx(0.7)
    assert mean["grpo"][1]["mean_at_k"] == pytest.approx(0.35)


def test_the_trl_side_gets_every_training_argument_it_reads(tmp_path, monkeypatch):
    """race_trl.py's arguments, as race.py passes them, are all that bench_trl's shared TRL settings read (TRL
    itself is not imported): a race once failed only on its TRL side when bench_trl started reading a new one."""
    race_trl = _load("race_trl")
    bench_trl = sys.modules["bench_trl"]
    a = race.parse_args(["--tiny", "--steps", "2", "--save-every", "1", "--warmup-steps", "2"])
    a.model = "smollm2"  # trl_args resolves the model directory; the tiny race's prompts are builtin
    monkeypatch.setattr(race.bench, "resolve_model", lambda name: tmp_path)
    args = race_trl.parse_args(race.trl_args(a, tmp_path / "trl"))
    common = bench_trl.common_training_args(args, str(tmp_path))
    assert (common["learning_rate"], common["seed"], common["gradient_checkpointing"]) == (a.lr, a.seed, False)

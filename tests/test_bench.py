"""scripts/bench.py, pefrl side only (TRL is an optional extra and is never imported here)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from pefrl.config_loader import load_config

ROOT = Path(__file__).resolve().parent.parent


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The bench children set torch's thread count for the process they run in: here, pytest's; put it back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_reward_is_digit_fraction():
    # "12a": 2 of 3 characters are digits; "" scores 0 rather than dividing by zero
    assert bench.bench_reward(["p"] * 3, ["12a", "", "xy"]) == pytest.approx([2 / 3, 0.0, 0.0])


def test_overrides_give_both_sides_the_same_batch(tmp_path):
    a = bench.parse_args(["--batch-size", "3", "--num-samples", "2", "--max-new-tokens", "5", "--steps", "4"])
    for algo, (prompts, samples) in {"ppo": (6, 1), "grpo": (3, 2), "rloo": (3, 2)}.items():
        cfg = load_config(None, bench.pefrl_overrides(a, algo, tmp_path, tmp_path, tmp_path / "p.jsonl", str(tmp_path)))
        assert (cfg.algo, cfg.rollout.batch_size, cfg.rollout.num_samples) == (algo, prompts, samples)
        # one optimizer step per epoch over the whole rollout: TRL's single minibatch
        assert cfg.rl.minibatch_size == 6 and cfg.rl.epochs == 1 and cfg.rl.grad_accum_steps == 1
        assert cfg.data.chat_template == "off" and cfg.data.eval_prompts is None
        trl = bench.trl_args(a, algo, tmp_path, tmp_path, tmp_path / "p.jsonl")
        assert trl[trl.index("--batch-size") + 1] == str(prompts)
        assert trl[trl.index("--num-samples") + 1] == str(samples)
    assert load_config(None, bench.pefrl_overrides(a, "ppo", tmp_path, tmp_path / "rm", tmp_path, "o")).reward.model
    assert load_config(None, bench.pefrl_overrides(a, "grpo", tmp_path, tmp_path, tmp_path, "o")).reward.functions


def _run(steps, peak, after, tokens, split=None, cpu=None):
    r = {"step_times_s": steps, "step_cpu_s": cpu or steps, "peak_rss_bytes": peak * 2**20,
         "rss_after_imports_bytes": after * 2**20,
         "gen_time_s": 2.0, "gen_tokens": tokens, "steps": len(steps), "cuda_peak_bytes": None}
    if split is not None:
        r["split_s"] = split
    return r


def test_summary_and_ratios_by_hand():
    # kept steps (first dropped): pefrl 1, 2, 3, 5 -> median 2.5; trl 5, 6 -> median 5.5
    # stages sum to 2.0 s in every kept step: "other" per step is -1, 0, 1, 3 -> median 0.5
    split = {"gen_time_s": [9, 1, 1], "score_time_s": [9, 0, 0], "reference_time_s": [9, 0.5, 0.5],
             "train_time_s": [9, 0.5, 0.5]}
    # CPU seconds per kept step: pefrl 1, 1, 1, 2 -> median 1; trl 3, 4 -> 3.5
    pefrl = bench.summarize([_run([9, 1, 2], 100, 60, 40, split, cpu=[9, 1, 1]),
                             _run([9, 3, 5], 120, 60, 40, split, cpu=[9, 1, 2])], skip=1)
    trl = bench.summarize([_run([9, 5, 6], 200, 50, 60, cpu=[9, 3, 4]) | {"step_gc_s": [9, 1, 1]}], skip=1)  # 4, 5 -> 4.5
    assert pefrl["median_step_s"] == 2.5 and trl["median_step_s"] == 5.5
    assert pefrl["peak_rss_mib"] == 110 and pefrl["rss_growth_mib"] == 50  # medians of per-run numbers
    assert pefrl["step_tokens_per_s"] == pytest.approx((40 / 3) / 2.5)  # 40 tokens over 3 steps per run
    assert pefrl["gen_tokens_per_s"] == pytest.approx(80 / 4.0)
    assert pefrl["split_s"]["gen_time_s"] == 1 and pefrl["split_s"]["reference_time_s"] == 0.5
    text = bench.table({"grpo": {"pefrl": pefrl, "trl": trl}})
    assert trl["median_step_without_gc_s"] == 4.5
    assert pefrl["median_step_cpu_s"] == 1 and trl["median_step_cpu_s"] == 3.5
    assert "| grpo | 2.20x | 1.80x | 3.50x | 0.55 | 0.33 |" in text  # 5.5/2.5, 4.5/2.5, 3.5/1, 110/200, 50/150
    assert pefrl["split_s"]["other_s"] == 0.5
    assert "| grpo | 1.000 | 0.000 | 0.500 | 0.500 | 0.500 |" in text


def test_pefrl_child_reports_steps_split_and_memory(tmp_path, capsys):
    model = bench.prepare_tiny(tmp_path / "tiny", hidden_size=32, num_layers=1)
    prompts = bench.write_prompts(tmp_path / "prompts.jsonl", 8)
    a = bench.parse_args(["--batch-size", "2", "--num-samples", "2", "--max-new-tokens", "4", "--steps", "2",
                          "--lora-r", "4", "--lora-alpha", "8"])
    result = bench.child_pefrl(bench.pefrl_overrides(a, "grpo", model, model, prompts, str(tmp_path / "run")), 1)
    assert result["steps"] == 2 and len(result["step_times_s"]) == 2 == len(result["step_cpu_s"])
    assert all(0 < c for c in result["step_cpu_s"])
    assert set(result["split_s"]) == {"gen_time_s", "score_time_s", "reference_time_s", "train_time_s"}
    for i, step in enumerate(result["step_times_s"]):
        assert sum(result["split_s"][k][i] for k in result["split_s"]) <= step
    assert 0 < result["gen_tokens"] <= 2 * 4 * 4  # 2 steps x 4 sequences x at most 4 tokens
    assert result["peak_rss_bytes"] > 0 and result["rss_after_imports_bytes"] > 0  # no memory threshold, as below
    assert capsys.readouterr().out.count("BENCH_JSON ") == 1


def test_floor_child_loads_the_base_and_backpropagates_once(tmp_path, capsys):
    model = bench.prepare_tiny(tmp_path / "tiny", hidden_size=32, num_layers=1)
    result = bench.child_floor(str(model), rows=4, length=6, threads=1)
    # No memory threshold: in-process these are pytest's numbers, and the kernel's counters behind them are
    # approximate (see bench.peak_rss); what is checked is that the child measured and reported once.
    assert result["peak_rss_bytes"] > 0 and result["rss_after_imports_bytes"] > 0
    assert capsys.readouterr().out.count("BENCH_JSON ") == 1
    results = {"ppo": {"pefrl": {"peak_rss_mib": 500.0}, "trl": {"peak_rss_mib": 625.0}}}
    # growth above the floor beside each peak: 500 - 400, 625 - 400; then 400/625, 500/625
    assert "| ppo | 500 | 100 | 625 | 225 | 0.64 | 0.80 |" in bench.floor_table(results, 400.0)


def test_stage_peaks_attribute_a_transient_allocation_to_its_stage():
    # in a subprocess: StagePeaks resets the process's peak RSS, which other tests here read
    code = """
from stage_peaks import StagePeaks
peaks = StagePeaks()
peaks.mark("before")
block = bytearray(300 * 2**20)  # touched: resident
del block
peaks.mark("alloc")  # the 300 MiB peak belongs here, though the block is freed
peaks.mark("after")  # the peak restarted from the current RSS
p = peaks.peaks
assert p["alloc"] - p["before"] > 250 * 2**20, p
assert p["alloc"] - p["after"] > 250 * 2**20, p
assert peaks.overall == max(p.values())
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "scripts", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

"""scripts/bench_fsdp.py: per-rank memory of one process, DDP and FSDP, at tiny shape (the 1B run is by hand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench_fsdp  # noqa: E402
import memory_model as mm  # noqa: E402


def test_prediction_shards_the_base_only_under_fsdp():
    rec = {"shape": "llama-3.2-1b", "setup": "ddp", "algo": "grpo", "batch_size": 2, "num_samples": 2,
           "max_new_tokens": 8}
    rank = {"world": 2, "rss_after_imports_bytes": 0}
    ddp, fsdp = bench_fsdp.predicted(rec, rank), bench_fsdp.predicted(rec | {"setup": "fsdp"}, rank)
    sharded = bench_fsdp.predicted(rec | {"setup": "fsdp", "sharded_loading": True}, rank)
    s = mm.SHAPES["llama-3.2-1b"]
    assert ddp["load"] == fsdp["load"] == 2 * s.params  # every rank loads the whole bf16 base (a record without
    assert sharded["load"] == mm.fsdp_rank_base_bytes(s, 2)  # sharded_loading predates it) / only its share
    assert ddp["step"] - fsdp["step"] == pytest.approx(2 * s.params - mm.fsdp_rank_base_bytes(s, 2))
    assert sharded["step"] == fsdp["step"]


def test_whole_loading_flips_the_accelerate_config_key(tmp_path):
    import yaml

    a = bench_fsdp.parse_args(["--setups", "fsdp", "--fsdp-loading", "whole"])
    config = bench_fsdp.accelerate_config(a, "fsdp", tmp_path)
    assert yaml.safe_load(config.read_text())["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is False
    assert bench_fsdp.accelerate_config(bench_fsdp.parse_args([]), "fsdp", tmp_path) == bench_fsdp.SETUPS["fsdp"]


def test_unknown_setup_is_refused():
    with pytest.raises(SystemExit):
        bench_fsdp.parse_args(["--setups", "single,zero3"])


@pytest.mark.slow  # three launches of a tiny model, two of them two ranks: about a minute on 2 shared cores
def test_every_rank_reports_its_memory_and_fsdp_falls_back_to_generate(tmp_path):
    out = tmp_path / "fsdp.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_fsdp.py"), "--shape", "tiny-qwen2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = {r["setup"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert {k: [(r["rank"], r["world"]) for r in v["ranks"]] for k, v in recs.items()} == {
        "single": [(0, 1)], "ddp": [(0, 2), (1, 2)], "fsdp": [(0, 2), (1, 2)]}
    for r in recs["fsdp"]["ranks"]:
        assert r["load_peak_bytes"] > 0 and r["step_peak_bytes"] > 0 and r["rss_at_step1_bytes"]["anon"] > 0
    log = (bench_fsdp.bench.CACHE / "logs" / "fsdp-tiny-qwen2-fsdp.log").read_text()
    assert "rollout engine: transformers (FSDP-sharded base" in log

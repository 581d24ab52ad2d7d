"""scripts/bench_1b.py and scripts/gpu_check.py: the 1B-class building blocks at tiny shape, and the GPU check
run on CPU so it stays ready."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench_1b  # noqa: E402
import memory_model as mm  # noqa: E402


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2.5-1.5b", "qwen2.5-0.5b"])
def test_config_builder_gives_the_formula_parameter_count(name):
    model = bench_1b.meta_model(mm.SHAPES[name])  # meta device: shapes only, no memory
    assert next(model.parameters()).device == torch.device("meta")
    assert sum(p.numel() for p in model.parameters()) == mm.SHAPES[name].params
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (
        mm.SHAPES[name].hidden, mm.SHAPES[name].layers, mm.SHAPES[name].kv_heads, mm.SHAPES[name].vocab)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied


def test_built_base_loads_with_a_smaller_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = bench_1b.build_base("tiny-qwen2", tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and len(tok) < model.config.vocab_size == 512
    norm = model.model.norm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    assert model.model.layers[0].self_attn.q_proj.weight.float().std().item() == pytest.approx(0.02, rel=0.1)
    # ids past the tokenizer's vocab (the model may sample them) decode to nothing, not an error
    assert tok.decode([tok.eos_token_id, 500]) == tok.decode([tok.eos_token_id])


def test_child_run_reports_a_killed_child_as_not_fitting(tmp_path):
    cmd = [sys.executable, "-c", "import time; x = bytearray(400 * 2**20); time.sleep(30)"]
    r = bench_1b.child_run(cmd, tmp_path / "log", cap_bytes=100 * 2**20)
    assert r["failed"].startswith("killed at RSS") and r["max_rss_seen_bytes"] > 100 * 2**20


@pytest.mark.slow  # ~15 s of CPU, but a minute of wall time on a loaded 2-core machine
def test_gpu_check_runs_on_cpu_at_tiny_shape(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--steps", "2", "--batch-size", "2", "--num-samples", "2", "--max-new-tokens", "4",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [r["algo"] for r in results] == ["grpo", "ppo"]
    for r in results:
        assert r["rows"] == 4 and r["decode_tokens_per_s"] > 0 and r["cuda_peak_bytes"] is None
        assert set(r["split_s"]) == {"gen_time_s", "score_time_s", "reference_time_s", "train_time_s"}
    assert "| tiny-qwen2 | ppo | 4 |" in proc.stdout

"""scripts/memory_model.py: the byte formulas, worked by hand on real shapes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import memory_model as mm  # noqa: E402

LLAMA_1B = mm.SHAPES["llama-3.2-1b"]


def test_parameter_counts_match_the_published_models():
    # model cards: Llama-3.2-1B 1.24B, Qwen2.5-1.5B 1.54B, Llama-3.1-8B 8.03B, Llama-3.1-70B 70.6B
    assert LLAMA_1B.params == 1_235_814_400
    assert mm.SHAPES["qwen2.5-1.5b"].params == 1_543_714_304
    assert mm.SHAPES["llama-3.1-8b"].params == 8_030_261_248
    assert mm.SHAPES["llama-3.1-70b"].params == 70_553_706_496


def test_lora_params_of_llama_1b():
    # per layer, r=16 x (in + out): q 16*4096, k 16*2560, v 16*2560, o 16*4096, gate/up/down 16*10240 each
    per_layer = 16 * (4096 + 2560 + 2560 + 4096 + 3 * 10240)
    assert per_layer == 704_512
    assert mm.lora_params(LLAMA_1B, r=16) == 16 * per_layer == 11_272_192
    assert mm.trainable_bytes(10) == 160  # fp32 weight, grad, AdamW m and v


def test_base_bytes_bf16_and_4bit():
    s = mm.Shape("llama", hidden=64, layers=1, heads=4, kv_heads=4, intermediate=128, vocab=100, tied=True)
    linear = 4 * 64 * 64 + 3 * 64 * 128  # 16384 + 24576 = 40960
    other = 100 * 64 + 2 * 64 + 64  # embedding, two layer norms, final norm = 6592
    assert s.params == linear + other == 47_552
    assert mm.base_bytes(s, "bf16") == 2 * 47_552
    # 4-bit: half a byte per weight + a 1-byte absmax per 64 weights + fp32 per 256 blocks; the rest fp32
    assert mm.base_bytes(s, "4bit") == pytest.approx(linear * (0.5 + 1 / 64 + 4 / 16384) + 4 * other)
    assert mm.base_bytes(s, "4bit") == pytest.approx(21_130.0 + 26_368.0)
    # 8-bit: 1 byte per weight + an fp32 scale per output row (64+64+64+64+128+128+64 = 576 rows)
    assert mm.base_bytes(s, "8bit") == linear + 4 * 576 + 4 * other


def test_kv_cache_and_logits():
    # Llama-3.2-1B: 16 layers x (k + v) x 8 kv heads x 64 dims x 2 bytes = 32 KiB per token
    assert mm.kv_cache_bytes(LLAMA_1B, batch=1, seq_len=1) == 32_768
    assert mm.kv_cache_bytes(LLAMA_1B, batch=16, seq_len=1024) == 512 * 2**20
    # fp32 logits, log-softmax and gradient: 3 x 4 bytes x B x T x V; chunking bounds T
    assert mm.logits_bytes(LLAMA_1B, 2, 10) == 12 * 2 * 10 * 128_256
    assert mm.logits_bytes(LLAMA_1B, 2, 10, chunk=4) == 12 * 2 * 4 * 128_256


def test_activations_with_lora_without_and_checkpointed():
    s = mm.Shape("llama", hidden=8, layers=3, heads=2, kv_heads=1, intermediate=16, vocab=10, tied=True)
    # kv = 1 head x 4 dims; with LoRA r=2: 6*8 + 2*4 + 4*16 + 7*2 = 48 + 8 + 64 + 14 = 134 elements per token, layer
    assert mm.activation_bytes(s, 1, 1, elem=2, lora_r=2) == 2 * 3 * 134
    assert mm.activation_bytes(s, 2, 5, elem=2, lora_r=2) == 10 * 2 * 3 * 134  # linear in B x T
    # frozen base, no adapters: 4.5*8 + 2*4 + 3*16 = 36 + 8 + 48 = 92
    assert mm.activation_bytes(s, 1, 1, elem=4, lora_r=None) == 4 * 3 * 92
    # checkpointing: one h-wide input per layer (3 x 8) + one layer's full set (134)
    assert mm.activation_bytes(s, 1, 1, elem=2, checkpointing=True, lora_r=2) == 2 * (24 + 134)


def test_pefrl_shares_one_base_and_trl_ppo_holds_four_models():
    w = mm.Workload()
    s = mm.SHAPES["llama-3.1-8b"]
    assert mm.pefrl_bytes(s, "4bit", w) < mm.trl_grpo_bytes(s, "4bit", w) < mm.trl_ppo_bytes(s, "4bit", w)
    # TRL PPO minus GRPO is at least the full value model's training state and a second base (the reward model)
    assert mm.trl_ppo_bytes(s, "4bit", w) - mm.trl_grpo_bytes(s, "4bit", w) >= 16 * s.params + mm.base_bytes(s, "4bit")
    assert mm.fits(0, 22 * mm.GiB, 1, 24) and not mm.fits(0, 22.1 * mm.GiB, 1, 24)
    assert mm.fits(8 * 70 * mm.GiB, 8 * mm.GiB, 8, 80)  # sharded: 70 + 8 per GPU


def test_cpu_peak_counts_the_mapped_file_while_quantizing():
    s = mm.Shape("llama", hidden=64, layers=1, heads=4, kv_heads=4, intermediate=128, vocab=100, tied=True)
    # loading a bf16 file into 4-bit: the whole file (2 bytes a parameter) + the quantized copy, bf16 embeddings
    p = mm.cpu_peak_bytes(s, "4bit", rows=1, seq_len=1, response_len=1, imports=1000.0)
    assert p["load"] == pytest.approx(1000 + 2 * 47_552 + mm.base_bytes(s, "4bit", other_bytes=2))
    # a pre-quantized checkpoint is the base itself: no bf16 file on top
    q = mm.cpu_peak_bytes(s, "4bit", rows=1, seq_len=1, response_len=1, imports=1000.0, prequantized=True)
    assert q["load"] == pytest.approx(1000 + mm.base_bytes(s, "4bit"))
    # the step: base + two adapters and the value head (16 bytes each) + activations + logits
    lora = mm.lora_params(s)
    assert p["step"] == pytest.approx(1000 + mm.base_bytes(s, "4bit") + 16 * (2 * lora + 65)
                                      + mm.activation_bytes(s, 1, 1, 2) + mm.logits_bytes(s, 1, 1))
    assert p["peak"] == max(p["load"], p["step"])


def test_fsdp_rank_base_is_a_share_of_the_layers_plus_the_replicated_and_three_gathered_layers():
    s = mm.Shape("llama", hidden=64, layers=4, heads=4, kv_heads=4, intermediate=128, vocab=100, tied=True)
    # one layer: q, k, v, o 64x64 each + gate, up, down 64x128 each = 40960, two norms 128 -> 41088 values;
    # replicated: tied embedding 100x64 + final norm 64 = 6464
    assert mm.fsdp_rank_base_bytes(s, world=1) == 2 * (4 * 41088 + 6464) == mm.base_bytes(s, "bf16")
    share = 2 * (6464 + 4 * 41088 / 2 + 3 * 41088)  # 3 layers' worth held while one runs (fsdp_layers_held.py)
    assert mm.fsdp_rank_base_bytes(s, world=2) == share  # more than the whole base at 4 layers: a tiny model
    assert mm.fsdp_rank_base_bytes(s, world=4, gathered_layers=0) == 2 * (6464 + 41088)
    # the CPU step holds the rank's share; so does loading, sharded (fsdp_cpu_ram_efficient_loading), else the
    # whole base on every rank
    one = mm.cpu_peak_bytes(s, "bf16", rows=1, seq_len=1, response_len=1, imports=0.0)
    two = mm.cpu_peak_bytes(s, "bf16", rows=1, seq_len=1, response_len=1, imports=0.0, fsdp_world=2)
    whole = mm.cpu_peak_bytes(s, "bf16", rows=1, seq_len=1, response_len=1, imports=0.0, fsdp_world=2,
                              sharded_loading=False)
    assert one["step"] - two["step"] == pytest.approx(2 * (4 * 41088 + 6464) - share)
    assert two["load"] == share and whole["load"] == one["load"] == 2 * (4 * 41088 + 6464)
    assert whole["step"] == two["step"]
    with pytest.raises(ValueError, match="quantized bases under FSDP"):
        mm.cpu_peak_bytes(s, "4bit", rows=1, seq_len=1, response_len=1, imports=0.0, fsdp_world=2)

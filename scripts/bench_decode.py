"""Rollout engines side by side in one process: transformers' generate (then a separate reference forward, which
it cannot score) against pefrl's sampler with the reference rows riding along, through the lean layer
(pefrl/arch/llama.py) and through the generic stepper (the model's own forward with peft's mixed-adapter rows,
pefrl/decode_generic.py).

    python scripts/bench_decode.py --model tiny              # the benchmark's tiny Llama (scripts/bench.py)
    python scripts/bench_decode.py --model smollm2 --repeats 3
    python scripts/bench_decode.py --model smollm2 --repeats 3 --quant 4bit
    python scripts/bench_decode.py --model family:qwen3 --repeats 3   # any family of pefrl.tiny, built at 256 x 4

Every row is forced to --max-new-tokens (EOS ignored) so all engines generate the same number of tokens; LoRA
(on every linear layer of the decoder blocks, pefrl's default) has a random B so the adapter matters. Prints the
best of --repeats wall times (after one warm-up call), CPU times and tokens per CPU second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager

import torch

import bench  # scripts/bench.py: the same models the TRL benchmark uses
from pefrl import decode
from pefrl import rollout as rollout_module
from pefrl.config import LoraConfig, ModelConfig, RolloutConfig
from pefrl.forward import critic_values, reference_logprobs
from pefrl.models import load_models, load_tokenizer
from pefrl.rollout import generate


def family_model(arch: str, out_dir: str) -> str:
    """A random `arch` model (pefrl.tiny: hidden 256, 4 layers, 4 heads) saved with the tiny BPE tokenizer."""
    from pefrl.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    build_model(arch, tok, hidden_size=256, num_layers=4).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def best_of(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds) of `repeats` calls after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


@contextmanager
def generic_only():
    """rollout.engine 'pefrl' takes the generic stepper even where the lean layer runs."""
    lean = decode.unsupported_reason
    decode.unsupported_reason = lambda models: "benchmark: generic stepper"
    try:
        yield
    finally:
        decode.unsupported_reason = lean


def engine_rows(models, tokenizer, prompts, cfg, critic: bool) -> dict:
    """Benchmark name -> zero-argument callable."""
    sample = generate(models, tokenizer, prompts, cfg["pefrl"])
    inputs = (sample.input_ids, sample.attention_mask, sample.query_ids.shape[1])

    def generate_then_reference():
        generate(models, tokenizer, prompts, cfg["transformers"])
        with torch.no_grad():
            reference_logprobs(models, *inputs, 1.0)

    def generic(with_reference: bool):
        with generic_only():
            generate(models, tokenizer, prompts, cfg["pefrl"], with_reference=with_reference)

    rows = {
        "transformers generate": lambda: generate(models, tokenizer, prompts, cfg["transformers"]),
        "generate + separate reference forward": generate_then_reference,
        "generic stepper": lambda: generic(False),
        "generic stepper + reference rows": lambda: generic(True),
    }
    if decode.unsupported_reason(models) is None:
        rows["lean decoder"] = lambda: generate(models, tokenizer, prompts, cfg["pefrl"])
        rows["lean decoder + reference rows"] = lambda: generate(models, tokenizer, prompts, cfg["pefrl"],
                                                                 with_reference=True)
    if critic:
        rows["separate critic-adapter forward"] = lambda: critic_values(models, *inputs)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | smollm2 | PATH | family:ARCH (pefrl.tiny.MODEL_TYPES)")
    p.add_argument("--quant", default=None, choices=["4bit", "8bit"], help="load the base with bitsandbytes")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model.dtype of the base")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--critic", action="store_true", help="also time the critic adapter's own forward")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.model.startswith("family:"):
        path = family_model(a.model.removeprefix("family:"), tempfile.mkdtemp(prefix="pefrl-bench-decode-"))
    else:
        path = str(bench.resolve_model(a.model))
    model_cfg = ModelConfig(name_or_path=path, quantization=a.quant, dtype=a.dtype)
    models = load_models(model_cfg, LoraConfig(r=16, alpha=32, dropout=0.0), uses_critic=a.critic)
    with torch.no_grad():
        for name, param in models.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01, generator=torch.Generator().manual_seed(0))
    tokenizer = load_tokenizer(model_cfg)
    rollout_module._eos_ids = lambda models, tokenizer: []  # no EOS: every row runs to max_new_tokens
    prompts = [f"{i}+{3 * i}=" for i in range(a.batch)]
    cfg = {e: RolloutConfig(max_new_tokens=a.max_new_tokens, engine=e) for e in ("transformers", "pefrl")}
    with torch.no_grad():
        times = {name: best_of(fn, a.repeats)
                 for name, fn in engine_rows(models, tokenizer, prompts, cfg, a.critic).items()}
    tokens = a.batch * a.max_new_tokens
    print(f"{a.model} {a.quant or 'unquantized'} {a.dtype}: {a.batch} rows x {a.max_new_tokens} tokens, {a.threads} "
          f"thread(s), best of {a.repeats}")
    print("| | wall (s) | CPU (s) | tokens / CPU s | CPU vs generate + reference |\n|---|---|---|---|---|")
    hf_cpu = times["generate + separate reference forward"][1]
    for name, (wall, cpu) in times.items():
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {tokens / cpu:.0f} | {hf_cpu / cpu:.2f}x |")


if __name__ == "__main__":
    main()

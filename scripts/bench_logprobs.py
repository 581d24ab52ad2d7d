"""Peak memory of dense vs chunked token logprobs (+ entropy), forward and backward.

    python scripts/bench_logprobs.py                                   # lm_head level: H=576, V=49152 (SmolLM2)
    python scripts/bench_logprobs.py --batch 8 --time 512 --chunks 256,1024
    python scripts/bench_logprobs.py --model ~/.cache/pefrl/SmolLM2-135M-Instruct --batch 4 --time 256

Each variant runs in its own fresh subprocess (so one variant's freed memory cannot hide another's peak):
- head level (default): hidden (B, T, H) with grad -> lm_head (frozen, as under LoRA) -> logprobs and entropy ->
  backward into hidden. `dense` builds the (B*T, V) logits at once (forward.policy_forward with chunk_size=None);
  `chunk=N` is ops.logprobs.chunked_logprobs (N positions at a time, recomputed in backward).
- model level (--model): forward.policy_forward of a LoRA policy on that base, prompt 32 tokens + T response.
Peak = on CUDA torch.cuda.max_memory_allocated minus the memory held before the step; on CPU the process's peak
RSS (getrusage ru_maxrss) minus its RSS before the step (tracemalloc does not see torch's allocations).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _head_inputs(args, torch, device):
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    lm_head = torch.nn.Linear(args.hidden, args.vocab, bias=False, dtype=dtype, device=device).requires_grad_(False)
    hidden = torch.randn(args.batch, args.time, args.hidden, dtype=dtype, device=device, requires_grad=True)
    tokens = torch.randint(0, args.vocab, (args.batch, args.time), device=device)  # (B, T)
    return lm_head, hidden, tokens


def _head_step(args, torch, chunk, inputs):
    from pefrl.ops.logprobs import chunked_logprobs, entropy_from_logits, selective_logprobs

    lm_head, hidden, tokens = inputs
    if chunk is None:
        logits = lm_head(hidden)  # (B, T, V)
        logprobs, entropy = selective_logprobs(logits, tokens), entropy_from_logits(logits)
    else:
        logprobs, entropy = chunked_logprobs(hidden, lm_head, tokens, 1.0, chunk, with_entropy=True)
    (logprobs.sum() + 0.01 * entropy.sum()).backward()


def _model_inputs(args, torch, device):
    from pefrl.config import LoraConfig, ModelConfig
    from pefrl.models import load_models

    models = load_models(ModelConfig(name_or_path=args.model, dtype=args.dtype), LoraConfig(r=16), uses_critic=False)
    models.model.to(device)
    prompt_len = 32
    vocab = models.model.get_base_model().config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, prompt_len + args.time), device=device)  # (B, P + T)
    return models, ids, torch.ones_like(ids), prompt_len


def _model_step(args, torch, chunk, inputs):
    from pefrl.forward import policy_forward

    models, ids, mask, prompt_len = inputs
    logprobs, entropy, _ = policy_forward(models, ids, mask, prompt_len, 1.0, chunk_size=chunk)
    (logprobs.sum() + 0.01 * entropy.sum()).backward()


def child(args) -> None:
    """One variant in this (fresh) process: print {"peak_mib", "seconds"} as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chunk = None if args.variant == "dense" else int(args.variant.split("=")[1])
    setup, step = (_model_inputs, _model_step) if args.model else (_head_inputs, _head_step)
    inputs = setup(args, torch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss()
    t0 = time.perf_counter()
    step(args, torch, chunk, inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss is KiB on Linux
    print(json.dumps({"peak_mib": peak / MIB, "seconds": time.perf_counter() - t0, "device": device.type}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--time", type=int, default=256, help="response positions per sequence (T)")
    p.add_argument("--hidden", type=int, default=576, help="head level: hidden size (SmolLM2-135M: 576)")
    p.add_argument("--vocab", type=int, default=49152, help="head level: vocabulary (SmolLM2: 49152)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--chunks", default="256,1024", help="comma-separated chunk sizes (positions)")
    p.add_argument("--model", default=None, help="a base model directory: measure policy_forward end to end")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # set in the child processes
    args = p.parse_args()
    if args.variant:
        return child(args)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    passthrough = [a for a in sys.argv[1:]]
    results = {}
    for variant in ["dense", *(f"chunk={c}" for c in args.chunks.split(","))]:
        out = subprocess.run([sys.executable, __file__, *passthrough, "--variant", variant], env=env,
                             capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    what = f"model {args.model}" if args.model else f"lm_head H={args.hidden} V={args.vocab}"
    print(f"{what}, B={args.batch} T={args.time} {args.dtype}, forward+backward, device "
          f"{results['dense']['device']}")
    dense = results["dense"]["peak_mib"]
    print(f"{'variant':<12} {'peak MiB':>9} {'vs dense':>9} {'seconds':>8}")
    for variant, r in results.items():
        print(f"{variant:<12} {r['peak_mib']:9.0f} {r['peak_mib'] / dense:9.2f} {r['seconds']:8.2f}")


if __name__ == "__main__":
    main()

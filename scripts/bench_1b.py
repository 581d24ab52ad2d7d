"""1B-class bases on a CPU machine: pefrl PPO/GRPO at 4-bit and bf16 against TRL, peak RSS and CPU s/step.

    python scripts/bench_1b.py --shape qwen2.5-1.5b --runs pefrl:ppo:4bit,pefrl:grpo:4bit,trl:grpo:4bit --floor

The bases are random bf16 weights in the published shapes (scripts/memory_model.py SHAPES) with a small offline
BPE tokenizer (pefrl.tiny; ids past its vocab decode to nothing), so no download is needed and the memory is
the real model's. Every run is a subprocess of scripts/bench.py's kinds (pefrl: `--child-pefrl`, TRL:
scripts/bench_trl.py in its venv, floor: `--child-floor`), watched here: a run whose RSS passes `--cap-gb` is
killed and reported as not fitting, so TRL's PPO (full value and reward models) cannot take the machine down.
pefrl scores with the rule reward; TRL's PPO needs a reward-model object, a sequence-classification copy of
the base. Results: docs/benchmarks.md ("1B-class on CPU").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import bench  # scripts/ is on sys.path when run as a script (and in the tests)
from memory_model import SHAPES, Shape

# a tiny shape for the tests and a quick check of the whole chain (seconds, not minutes)
BUILDABLE = SHAPES | {"tiny-qwen2": Shape("qwen2", 64, 2, 4, 2, 128, 512, True)}
BNB_DIR = bench.CACHE / "bnb"  # bitsandbytes for the TRL venvs: pip install --no-deps --target .cache/bench/bnb


def hf_config(shape: Shape, tokenizer=None):
    """The transformers config of `shape`; token ids from `tokenizer` when given (its vocab may be smaller)."""
    from transformers import LlamaConfig, Qwen2Config

    ids = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id)
    cls = LlamaConfig if shape.arch == "llama" else Qwen2Config
    return cls(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
               num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate, vocab_size=shape.vocab,
               tie_word_embeddings=shape.tied, rope_theta=shape.rope_theta, max_position_embeddings=4096,
               head_dim=shape.head_dim, rms_norm_eps=1e-6, **ids)


def meta_model(shape: Shape):
    """The model of `shape` on the meta device: parameter shapes without any memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16)


def build_base(name: str, out: Path, seed: int = 0) -> Path:
    """Random bf16 weights (normal, std 0.02; norms 1, biases 0) in shape BUILDABLE[name], saved with a BPE tokenizer."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    from pefrl.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(BUILDABLE[name], tokenizer), dtype=torch.bfloat16)
    model.to_empty(device="cpu")  # uninitialized storage: filled below, faster than transformers' init
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            elif pname.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def rss_of(pid: int) -> int:
    """Resident set size of process `pid` in bytes (Linux /proc, so no psutil is needed on a bare machine)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def prequantize(model: Path, quant: str = "4bit") -> Path:
    """The loader lever: quantize the bf16 checkpoint once and save it (bitsandbytes serializes 4-bit and 8-bit
    weights), so that later loads map the small quantized file instead of the whole bf16 one. pefrl loads it
    with the same model.quantization; transformers takes the quantization config from the checkpoint."""
    out = model.with_name(f"{model.name}-{quant}")
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=quant == "4bit", load_in_8bit=quant == "8bit", bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, quantization_config=q,
                                                device_map={"": "cpu"})
    base.save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


def child_run(cmd: list[str], log: Path, cap_bytes: float, extra_env: dict[str, str] | None = None) -> dict:
    """Run one side like bench.run_child, but kill it when its RSS passes cap_bytes. -> its BENCH_JSON, or
    {"failed": why, "max_rss_seen_bytes": ...} when it was killed, ran out of memory or crashed."""
    import subprocess

    env = bench.child_env(1) | (extra_env or {})
    t0, seen, killed = time.perf_counter(), 0, False
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=bench.ROOT, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
        while proc.poll() is None:
            try:
                seen = max(seen, rss_of(proc.pid))
            except (FileNotFoundError, ProcessLookupError):
                break
            if seen > cap_bytes:
                proc.kill()
                killed = True
            time.sleep(0.2)
        stdout = proc.stdout.read()
        proc.wait()
        f.write("\n--- stdout ---\n" + stdout)
    lines = [l for l in stdout.splitlines() if l.startswith("BENCH_JSON ")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len("BENCH_JSON "):]) | {"wall_s": time.perf_counter() - t0}
    why = (f"killed at RSS > {cap_bytes / 2**30:.0f} GiB" if killed else
           "out of memory" if "OutOfMemory" in log.read_text() or proc.returncode in (-9, 137) else
           f"crashed (rc {proc.returncode}), see {log}")
    return {"failed": why, "max_rss_seen_bytes": seen, "wall_s": time.perf_counter() - t0}


def child_load(model: str, quant: str) -> dict:
    """Inside a child: pefrl.models.load_base alone -> peak RSS of loading, RSS after it, and after gc + malloc_trim
    (how much of the peak is the loader's transient: the mmap'd file, the bf16 state dict, freed heap)."""
    import ctypes
    import gc
    import resource

    from pefrl.config import ModelConfig
    from pefrl.models import load_base

    before = bench.current_rss()
    base = load_base(ModelConfig(name_or_path=model, dtype="bfloat16", quantization=None if quant == "bf16" else quant))
    after = bench.current_rss()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    result = {"side": "load", "rss_after_imports_bytes": before, "rss_after_load_bytes": after,
              "rss_after_trim_bytes": bench.current_rss(), "base_bytes": base.get_memory_footprint(),
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return result


def pefrl_overrides_1b(a: argparse.Namespace, algo: str, quant: str, levers: list[str], model: Path, prompts: Path,
                       out_dir: str) -> list[str]:
    """bench.pefrl_overrides with the base in bf16 (or `quant`), the rule reward, and the levers."""
    o = bench.pefrl_overrides(a, algo, model, model, prompts, out_dir)
    o += ["model.dtype=bfloat16", f"model.quantization={'' if quant == 'bf16' else quant}", "reward.model=",
          f"reward.functions=[{bench.ROOT / 'scripts' / 'bench.py'}:bench_reward]"]
    o += ["model.critic=adapter"] if algo == "ppo" else []  # the goal's critic adapter (the default is shared)
    o += ["model.gradient_checkpointing=true"] if "gc" in levers else []
    o += [f"model.logits_chunk_size={l[5:]}" for l in levers if l.startswith("chunk")]
    o += [f"train.mmap_threshold_mib={l[9:-1]}" for l in levers if l.startswith("threshold")]  # e.g. threshold1m
    return o + (["rollout.engine=transformers"] if "hf" in levers else [])  # transformers' generate for the rollout


def pefrl_command(a: argparse.Namespace, algo: str, quant: str, levers: list[str], model: Path, prompts: Path,
                  out_dir: str) -> list[str]:
    """bench.py's pefrl child with pefrl_overrides_1b."""
    o = pefrl_overrides_1b(a, algo, quant, levers, model, prompts, out_dir)
    return [sys.executable, str(bench.ROOT / "scripts" / "bench.py"), "--child-pefrl", json.dumps(o), "--threads", "1",
            "--stage-peaks"]


def run_one(a: argparse.Namespace, spec: str, model: Path, prompts: Path) -> dict:
    """spec = side:algo:quant[:lever+...], e.g. pefrl:ppo:4bit:gc+chunk16 or trl:ppo:4bit or floor:-:bf16."""
    side, algo, quant, *rest = spec.split(":")
    levers = rest[0].split("+") if rest else []
    cap = a.cap_gb * 2**30
    logs = bench.CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"1b-{model.name}-{spec.replace(':', '-')}.log"
    if "preq" in levers:
        model = prequantize(model, quant)
    if side == "load":
        return child_run([sys.executable, str(Path(__file__).resolve()), "--child-load", f"{model}:{quant}"], log, cap)
    if side == "floor":
        cmd = [sys.executable, str(bench.ROOT / "scripts" / "bench.py"), "--child-floor", str(model), "--floor-shape",
               f"{a.batch_size * a.num_samples}x{8 + a.max_new_tokens}", "--floor-dtype", "bfloat16"]
        return child_run(cmd + (["--floor-quantization", quant] if quant != "bf16" else []), log, cap)
    if side == "trl":
        rm = bench.prepare_reward_model(model, dtype="bfloat16") if algo == "ppo" else model
        cmd = [str(bench.TRL_PYTHON[algo]), str(bench.ROOT / "scripts" / "bench_trl.py"),
               *bench.trl_args(a, algo, model, rm, prompts), "--dtype", "bfloat16"]
        cmd += (["--quantization", quant] if quant != "bf16" else []) + (["--gradient-checkpointing"] if "gc" in levers else [])
        return child_run(cmd, log, cap, {"PYTHONPATH": f"{bench.ROOT}:{BNB_DIR}"})
    import tempfile

    # mmapNm: glibc gives every block over N MiB its own mmap, returned to the system when freed (setting the
    # threshold also turns off glibc's dynamic threshold, which otherwise rises to 32 MiB after large frees)
    env = {"MALLOC_MMAP_THRESHOLD_": str(int(l[4:-1]) * 2**20) for l in levers if l.startswith("mmap")}
    with tempfile.TemporaryDirectory(prefix="pefrl-bench1b-") as out_dir:
        return child_run(pefrl_command(a, algo, quant, levers, model, prompts, out_dir), log, cap, env)


STAGES = ("load", "generate", "score", "reference", "train", "other")
HEADER = ["| base | run | peak RSS (MiB) | above floor (MiB) | CPU s/step | wall s (all) | peak by stage: " +
          " / ".join(STAGES) + " (MiB) |", "|---|---|---|---|---|---|---|"]


def row(shape: str, spec: str, r: dict, floor: dict | None) -> str:
    """One table row: peak RSS, growth above the floor of the same quantization, CPU s per step (the first
    step left out when there are more), and pefrl's peak by stage."""
    if "failed" in r:
        return f"| {shape} | {spec} | {r['failed']} (max RSS seen {r['max_rss_seen_bytes'] / 2**20:.0f} MiB) | | | | |"
    peak = r["peak_rss_bytes"] / 2**20
    cpu = r.get("step_cpu_s") or []
    kept = cpu[1:] or cpu
    growth = "-" if not floor or "failed" in floor else f"{peak - floor['peak_rss_bytes'] / 2**20:.0f}"
    stages = r.get("stage_peak_rss_bytes") or {}
    by_stage = " / ".join(f"{stages[k] / 2**20:.0f}" if k in stages else "-" for k in STAGES) if stages else "-"
    step = f"{sum(kept) / len(kept):.1f}" if kept else "-"
    return f"| {shape} | {spec} | {peak:.0f} | {growth} | {step} | {r.get('wall_s', 0):.0f} | {by_stage} |"


def table_from(path: str) -> str:
    """The table of every run in a --out JSONL file; floors (floor:-:QUANT[:preq] runs) matched by base, quant
    and checkpoint."""
    recs = [json.loads(l) for l in open(path) if l.strip()]
    key = lambda r: (r["shape"], r["spec"].split(":")[2], "preq" in r["spec"])  # a pre-quantized run: its own floor
    floors = {key(r): r["result"] for r in recs if r["spec"].startswith("floor:")}
    return "\n".join(HEADER + [row(r["shape"], r["spec"], r["result"], floors.get(key(r))) for r in recs])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(BUILDABLE))
    p.add_argument("--runs", default="pefrl:ppo:4bit,pefrl:grpo:4bit,pefrl:ppo:bf16,pefrl:grpo:bf16,trl:grpo:4bit,"
                   "trl:ppo:4bit", help="side:algo:quant[:lever+lever] (levers: gc, chunkN, hf, mmapNm, thresholdNm: "
                   "train.mmap_threshold_mib=N, preq: a pre-quantized checkpoint), comma-separated")
    p.add_argument("--floor", action="store_true", help="also the floor at 4-bit and bf16 (bench.child_floor)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2, help="prompts per step (PPO: batch_size x num_samples)")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--cap-gb", type=float, default=20.0, help="kill a run whose RSS passes this (GiB)")
    p.add_argument("--out", help="append each result as a JSON line here")
    p.add_argument("--table-from", help="print the table of an earlier --out JSONL file and exit")
    p.add_argument("--child-load", help=argparse.SUPPRESS)
    return with_bench_defaults(p.parse_args(argv))


def with_bench_defaults(a: argparse.Namespace) -> argparse.Namespace:
    """Add what bench.pefrl_overrides / trl_args read beyond a script's own flags, at bench.py's defaults."""
    d = bench.parse_args([])
    for k in ("epochs", "lr", "kl_coef", "lora_r", "lora_alpha", "target_modules", "seed", "threads", "dtype",
              "pefrl_override"):
        setattr(a, k, getattr(d, k))
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.table_from:
        print(table_from(a.table_from))
        return 0
    if a.child_load:
        model, quant = a.child_load.rsplit(":", 1)
        child_load(model, quant)
        return 0
    model = build_base(a.shape, bench.CACHE / "models" / a.shape)
    prompts = bench.write_prompts(bench.CACHE / "prompts-1b.jsonl", a.steps * a.batch_size * a.num_samples)
    specs = [s for s in a.runs.split(",") if s]
    floor = {}
    for spec in ([f"floor:-:{q}" for q in ("4bit", "bf16")] if a.floor else []) + specs:
        r = run_one(a, spec, model, prompts)
        if spec.startswith("floor:"):
            floor[spec.split(":")[2]] = r
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps({"shape": a.shape, "spec": spec, "result": r}) + "\n")
        print(row(a.shape, spec, r, floor.get(spec.split(":")[2])), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(bench.ROOT))
    sys.exit(main())

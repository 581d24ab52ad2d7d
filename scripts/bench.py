"""Side-by-side benchmark of pefrl against TRL: PPO, GRPO and RLOO, as ratios pefrl / TRL.

    bash scripts/setup_bench_env.sh                      # once: the TRL environments under .cache/bench/
    python scripts/bench.py --model tiny --algos ppo,grpo,rloo --steps 6 --repeats 3

Both sides get the same base model directory, prompts, prompts per step, samples per prompt, max_new_tokens
(generation forced to that length where the side allows it), reward, seed, dtype, LoRA config and thread count.
Every run is its own subprocess (so peak RSS is per run); after one warm-up run per side the two sides alternate
`--repeats` times, and the first `--skip-steps` steps of each run are dropped. The pefrl side is
`pefrl.trainer.train` in a child of this script (`--child-pefrl`), the TRL side scripts/bench_trl.py in the TRL
venv. Matching choices are listed in docs/benchmarks.md. TRL is never imported here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
TRL_PYTHON = {"ppo": CACHE / "trl112" / "bin" / "python", "grpo": CACHE / "trl116" / "bin" / "python",
              "rloo": CACHE / "trl116" / "bin" / "python"}
LLAMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def bench_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """Rule reward for both sides: the fraction of digits in the completion (dense, so groups differ)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


# --- models and prompts -------------------------------------------------------------------------------------


def prepare_tiny(out: Path, hidden_size: int = 96, num_layers: int = 2) -> Path:
    """A tiny random Llama (pefrl.tiny) saved with its tokenizer; ~0.37M parameters at the defaults."""
    if (out / "config.json").exists():
        return out
    from pefrl.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model("llama", tokenizer, hidden_size=hidden_size, num_layers=num_layers, max_positions=256)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prepare_reward_model(base: Path, seed: int = 1, dtype: str = "float32") -> Path:
    """A sequence-classification head (1 label, random, seeded) on `base`: TRL's PPO needs a reward model object,
    and pefrl's PPO side scores with the same directory (reward.model) so both pay for one RM forward."""
    out = CACHE / "models" / (base.name + "-rm")
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=getattr(torch, dtype))
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def resolve_model(name: str) -> Path:
    if name == "tiny":
        return prepare_tiny(CACHE / "models" / "tiny-llama")
    if name == "smollm2":
        from pefrl.hub import ModelNotPreparedError, smollm2_path

        try:
            return smollm2_path()  # made by scripts/prepare_smollm2.py
        except ModelNotPreparedError as e:
            raise SystemExit(str(e)) from None
    path = Path(name)
    if not (path / "config.json").exists():
        raise SystemExit(f"--model {name}: not tiny, smollm2 or a model directory")
    return path


def write_prompts(path: Path, n: int) -> Path:
    """n arithmetic prompts 'a+b=' (pefrl's builtin task order), as JSONL for both sides."""
    from pefrl.tasks.arithmetic import problems

    rows = problems("train")[:n]
    path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return path


# --- one run per side -----------------------------------------------------------------------------------------


def pefrl_overrides(a: argparse.Namespace, algo: str, model: Path, rm: Path, prompts: Path, out_dir: str) -> list[str]:
    """pefrl config overrides equivalent to what bench_trl.py gives TRL (see docs/benchmarks.md)."""
    batch, samples = (a.batch_size * a.num_samples, 1) if algo == "ppo" else (a.batch_size, a.num_samples)
    o = [f"algo={algo}", f"output_dir={out_dir}", f"model.name_or_path={model}", f"model.dtype={a.dtype}",
         f"lora.r={a.lora_r}", f"lora.alpha={a.lora_alpha}", "lora.dropout=0.0",
         f"lora.target_modules=[{a.target_modules}]", f"data.prompts={prompts}", "data.eval_prompts=",
         "data.chat_template='off'", f"rollout.batch_size={batch}", f"rollout.num_samples={samples}",
         f"rollout.max_new_tokens={a.max_new_tokens}", "rollout.temperature=1.0", f"rl.epochs={a.epochs}",
         f"rl.minibatch_size={batch * samples}", "rl.grad_accum_steps=1", f"rl.kl_coef={a.kl_coef}",
         f"train.steps={a.steps}", f"train.seed={a.seed}", f"train.lr={a.lr}", "train.max_grad_norm=1.0",
         f"train.log_every={a.steps}"]
    o.append(f"reward.model={rm}" if algo == "ppo" else f"reward.functions=[{Path(__file__).resolve()}:bench_reward]")
    return o + list(a.pefrl_override)


def trl_args(a: argparse.Namespace, algo: str, model: Path, rm: Path, prompts: Path) -> list[str]:
    batch, samples = (a.batch_size * a.num_samples, 1) if algo == "ppo" else (a.batch_size, a.num_samples)
    return ["--algo", algo, "--model", str(model), "--reward-model", str(rm), "--prompts", str(prompts),
            "--batch-size", str(batch), "--num-samples", str(samples), "--max-new-tokens", str(a.max_new_tokens),
            "--steps", str(a.steps), "--epochs", str(a.epochs), "--lr", str(a.lr), "--kl-coef", str(a.kl_coef),
            "--lora-r", str(a.lora_r), "--lora-alpha", str(a.lora_alpha), "--target-modules", a.target_modules,
            "--seed", str(a.seed), "--threads", str(a.threads), "--dtype", a.dtype]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               TRL_EXPERIMENTAL_SILENCE="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return env


def run_child(cmd: list[str], threads: int, log: Path) -> dict:
    """Run one side in a subprocess; its last `BENCH_JSON` line is the result."""
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(threads), capture_output=True, text=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("BENCH_JSON ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (rc {proc.returncode}); log: {log}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH_JSON "):])


def current_rss() -> int:
    """Resident set size of this process in bytes (psutil when installed, else Linux /proc)."""
    try:
        import psutil
    except ImportError:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak resident set size of this process in bytes: the kernel's high-water mark, and at least the current RSS.

    getrusage's ru_maxrss reads per-CPU RSS counters that are only summed approximately (off by up to a batch of
    pages per CPU: >100 MiB on a many-core host under load), while current_rss reads the exact sum, so on its own
    ru_maxrss can come out below an earlier current_rss."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, current_rss())


def minor_faults() -> int:
    """Minor page faults of this process so far: each first touch of a freshly mapped page (a new large tensor
    from mmap). Their cost per fault depends on the machine (a VM's nested paging, transparent huge pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class StepFaults:
    """Minor page faults per pefrl step: counted between consecutive ends of steps (the first from mark())."""

    def __init__(self):
        self.last, self.per_step = 0, []

    def mark(self) -> None:
        self.last = minor_faults()

    def wrap(self, step_timing):
        def counted(*args, **kwargs):
            now = minor_faults()
            self.per_step.append(now - self.last)
            self.last = now
            return step_timing(*args, **kwargs)
        return counted


def child_pefrl(overrides: list[str], threads: int, stage_peaks: bool = False) -> dict:
    """Inside the child: train with pefrl, then report per-step times from metrics.jsonl and peak memory;
    stage_peaks: also the peak RSS of each stage (stage_peaks.StagePeaks: resets this process's VmHWM)."""
    import torch

    torch.set_num_threads(threads)
    from pefrl.config_loader import load_config
    from pefrl.metrics import read_metrics
    from pefrl.trainer import train

    rss_after_imports = current_rss()
    cfg = load_config(None, overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    from contextlib import nullcontext

    stages = None
    if stage_peaks:
        from stage_peaks import StagePeaks  # scripts/ is sys.path[0] in the child

        stages = StagePeaks()
    import pefrl.trainer as trainer_module

    faults = StepFaults()
    trainer_module.step_timing = faults.wrap(trainer_module.step_timing)
    t0 = time.perf_counter()
    with stages.installed() if stages else nullcontext():
        faults.mark()
        train(cfg)
    total = time.perf_counter() - t0
    if stages:
        stages.mark("other")
    records = read_metrics(cfg.output_dir)
    keys = ("step_time_s", "gen_time_s", "score_time_s", "reference_time_s", "train_time_s")
    result = {
        "side": "pefrl", "algo": cfg.algo, "steps": len(records), "train_seconds": total,
        "step_times_s": [r["step_time_s"] for r in records],
        "step_cpu_s": [r["step_cpu_s"] for r in records],
        "step_minor_faults": faults.per_step,
        "split_s": {k: [r[k] for r in records] for k in keys[1:]},
        "gen_time_s": sum(r["gen_time_s"] for r in records),
        "gen_tokens": int(sum(r["response_length"] * cfg.rollout.num_sequences for r in records)),
        "rss_after_imports_bytes": rss_after_imports,
        "peak_rss_bytes": max(peak_rss(), stages.overall if stages else 0),
        "stage_peak_rss_bytes": stages.peaks if stages else None,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return result


def child_floor(model: str, rows: int, length: int, threads: int, dtype: str = "float32",
                quantization: str | None = None) -> dict:
    """Inside a child: the least memory any trainer built on transformers holds for this model and batch. Import
    torch and transformers, load the frozen base with AutoModelForCausalLM and run one forward and backward of a
    step-sized batch (rows x length random tokens, gradients to the inputs only, as a LoRA backward through a
    frozen base): no adapters, optimizer, reward or reference model, no generation. -> its peak RSS.
    dtype / quantization ('4bit', '8bit'): the base as the run being compared loads it."""
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    rss_after_imports = current_rss()
    quant = {} if quantization is None else {"device_map": {"": "cpu"}, "quantization_config": BitsAndBytesConfig(
        load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit", bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=getattr(torch, dtype))}
    base = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype), **quant).requires_grad_(False)
    base.enable_input_require_grads()
    ids = torch.randint(0, base.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    base(input_ids=ids).logits.sum().backward()
    result = {"side": "floor", "rss_after_imports_bytes": rss_after_imports,
              "peak_rss_bytes": peak_rss()}
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return result


def measure_floor(a: argparse.Namespace, model: Path) -> float:
    """Median peak RSS (MiB) of `--repeats` floor children (child_floor) for a step of this benchmark."""
    rows, length = a.batch_size * a.num_samples, 8 + a.max_new_tokens  # a prompt is ~4-8 tokens
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-floor", str(model), "--floor-shape",
           f"{rows}x{length}", "--threads", str(a.threads)]
    (CACHE / "logs").mkdir(parents=True, exist_ok=True)
    runs = [run_child(cmd, a.threads, CACHE / "logs" / f"floor-r{i}.log") for i in range(a.repeats)]
    return statistics.median(r["peak_rss_bytes"] for r in runs) / 2**20


def floor_table(results: dict[str, dict], floor_mib: float) -> str:
    """Each side's peak RSS beside its growth above the floor: the floor is what transformers itself needs for
    this model and batch, so peak - floor is the memory the trainer adds, the part a trainer can change."""
    lines = [f"Memory floor (transformers alone: the base loaded, one forward and backward of a step's batch): "
             f"{floor_mib:.0f} MiB peak RSS", "",
             "| pair | TRL peak RSS (MiB) | pefrl peak RSS (MiB) | floor / TRL | pefrl / TRL | TRL above floor (MiB) "
             "| pefrl above floor (MiB) | pefrl / TRL above floor |", "|---|---|---|---|---|---|---|---|"]
    for algo, res in results.items():
        trl, pefrl = res["trl"]["peak_rss_mib"], res["pefrl"]["peak_rss_mib"]
        # growth above the floor: the memory a trainer adds to what transformers alone needs for the step
        above = (trl - floor_mib, pefrl - floor_mib)
        ratio = f"{above[1] / above[0]:.2f}" if above[0] > 0 else "-"
        lines.append(f"| {algo} | {trl:.0f} | {pefrl:.0f} | {floor_mib / trl:.2f} | {pefrl / trl:.2f} | "
                     f"{above[0]:.0f} | {above[1]:.0f} | {ratio} |")
    return "\n".join(lines)


# --- orchestration and summary ------------------------------------------------------------------------------


def one_run(a: argparse.Namespace, side: str, algo: str, model: Path, rm: Path, prompts: Path, tag: str) -> dict:
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{algo}-{side}-{tag}.log"
    if side == "trl":
        cmd = [str(TRL_PYTHON[algo]), str(ROOT / "scripts" / "bench_trl.py")] + trl_args(a, algo, model, rm, prompts)
        return run_child(cmd, a.threads, log)
    with tempfile.TemporaryDirectory(prefix="pefrl-bench-") as out_dir:
        overrides = pefrl_overrides(a, algo, model, rm, prompts, out_dir)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-pefrl", json.dumps(overrides),
               "--threads", str(a.threads)]
        return run_child(cmd, a.threads, log)


def measure(a: argparse.Namespace, algo: str, model: Path, rm: Path, prompts: Path) -> dict[str, list[dict]]:
    """`warmup_runs` runs per side (discarded: page cache, lazy imports), then `repeats` alternating runs."""
    runs: dict[str, list[dict]] = {"pefrl": [], "trl": []}
    for w in range(a.warmup_runs):
        for side in ("pefrl", "trl"):
            one_run(a, side, algo, model, rm, prompts, f"warmup{w}")
    for i in range(a.repeats):
        order = ("pefrl", "trl") if i % 2 == 0 else ("trl", "pefrl")  # neither side always runs first
        for side in order:
            r = one_run(a, side, algo, model, rm, prompts, f"r{i}")
            runs[side].append(r)
            print(f"  {algo} {side} run {i}: median step {statistics.median(r['step_times_s'][a.skip_steps:]):.3f}s "
                  f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    return runs


def summarize(runs: list[dict], skip: int) -> dict:
    """Median step time over every kept step of every run; memory as the median of per-run peaks. Tokens/s
    (step) = generated tokens per step (what this side really generated) / median step time."""
    steps = [t for r in runs for t in r["step_times_s"][skip:]]
    median_step = statistics.median(steps)
    gen_time = sum(r["gen_time_s"] for r in runs)
    tokens_per_step = statistics.mean(r["gen_tokens"] / r["steps"] for r in runs)
    out = {
        "median_step_s": median_step,
        "step_tokens_per_s": tokens_per_step / median_step,
        "gen_tokens_per_s": sum(r["gen_tokens"] for r in runs) / gen_time if gen_time else None,
        "peak_rss_mib": statistics.median(r["peak_rss_bytes"] for r in runs) / 2**20,
        "rss_growth_mib": statistics.median(r["peak_rss_bytes"] - r["rss_after_imports_bytes"] for r in runs) / 2**20,
        "cuda_peak_mib": (statistics.median(r["cuda_peak_bytes"] for r in runs) / 2**20
                          if runs[0].get("cuda_peak_bytes") is not None else None),
        # CPU seconds per step (process_time): robust to other jobs on a shared machine; single-threaded runs
        # spend ~all their wall time on CPU when alone, so this approximates the quiet-machine step time
        "median_step_cpu_s": statistics.median(t for r in runs for t in r["step_cpu_s"][skip:]),
        "n_steps": len(steps),
        # first touches of freshly mapped pages: what a step costs more on a machine with slow page faults
        "median_step_minor_faults": (statistics.median(f for r in runs for f in r["step_minor_faults"][skip:])
                                     if all("step_minor_faults" in r for r in runs) else None),
        "mean_gen_tokens_per_step": tokens_per_step,
        # TRL's PPO runs gc.collect() twice a step; its cost depends on the Python heap, not on the model
        "median_step_without_gc_s": statistics.median(
            t - g for r in runs
            for t, g in zip(r["step_times_s"][skip:], r.get("step_gc_s", [0.0] * len(r["step_times_s"]))[skip:])),
    }
    if "split_s" in runs[0]:
        keys = list(runs[0]["split_s"])
        out["split_s"] = {k: statistics.median(t for r in runs for t in r["split_s"][k][skip:]) for k in keys}
        # per step: what the four stages leave out (prompt formatting, KL/advantages, logging)
        out["split_s"]["other_s"] = statistics.median(
            step - sum(r["split_s"][k][i] for k in keys) for r in runs
            for i, step in enumerate(r["step_times_s"]) if i >= skip)
    return out


def table(results: dict[str, dict]) -> str:
    lines = ["| pair | side | median step (s) | CPU s/step | gen tokens/step | tokens/s (step) | tokens/s (generate) | "
             "peak RSS (MiB) | RSS growth (MiB) | CUDA peak (MiB) | page faults/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios = ["| pair | speed-up TRL/pefrl step time | same, TRL without its gc.collect | speed-up in CPU time per step "
              "| pefrl/TRL peak RSS | pefrl/TRL RSS growth | target |", "|---|---|---|---|---|---|---|"]
    names = {"ppo": "PPO vs TRL PPOTrainer (1.12)", "grpo": "GRPO vs TRL GRPOTrainer (1.16)",
             "rloo": "RLOO vs TRL RLOOTrainer (1.16)"}
    fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)
    for algo, res in results.items():
        for side in ("pefrl", "trl"):
            s = res[side]
            lines.append(f"| {names[algo]} | {side} | {fmt(s['median_step_s'])} | {fmt(s.get('median_step_cpu_s'))} | "
                         f"{fmt(s['mean_gen_tokens_per_step'], '{:.0f}')} | {fmt(s['step_tokens_per_s'], '{:.0f}')} | "
                         f"{fmt(s['gen_tokens_per_s'], '{:.0f}')} | {fmt(s['peak_rss_mib'], '{:.0f}')} | "
                         f"{fmt(s['rss_growth_mib'], '{:.0f}')} | {fmt(s['cuda_peak_mib'], '{:.0f}')} | "
                         f"{fmt(s.get('median_step_minor_faults'), '{:.0f}')} |")
        p, t = res["pefrl"], res["trl"]
        target = ">= 2x faster, <= 0.6x memory" if algo == "ppo" else ">= 1.3x faster, <= 1.0x memory"
        no_gc = t.get("median_step_without_gc_s", t["median_step_s"]) / p["median_step_s"]
        ratios.append(f"| {algo} | {t['median_step_s'] / p['median_step_s']:.2f}x | {no_gc:.2f}x | "
                      f"{t['median_step_cpu_s'] / p['median_step_cpu_s']:.2f}x | "
                      f"{p['peak_rss_mib'] / t['peak_rss_mib']:.2f} | {p['rss_growth_mib'] / t['rss_growth_mib']:.2f} | "
                      f"{target} |")
    split = ["| pefrl algo | generate (s) | score (s) | reference+values (s) | update (s) | other (s) |", "|---|---|---|---|---|---|"]
    for algo, res in results.items():
        s = res["pefrl"]["split_s"]
        other = s.get("other_s", res["pefrl"]["median_step_s"] - sum(s.values()))
        split.append(f"| {algo} | {s['gen_time_s']:.3f} | {s['score_time_s']:.3f} | {s['reference_time_s']:.3f} | "
                     f"{s['train_time_s']:.3f} | {other:.3f} |")
    return "\n".join(lines + [""] + ratios + [""] + split)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="pefrl vs TRL: PPO, GRPO, RLOO step time and memory",
                                epilog="Run scripts/setup_bench_env.sh first. Matching choices: docs/benchmarks.md.")
    p.add_argument("--model", default="tiny", help="tiny | smollm2 | PATH to a causal-LM directory")
    p.add_argument("--algos", default="ppo,grpo,rloo")
    p.add_argument("--steps", type=int, default=6, help="RL steps per run")
    p.add_argument("--skip-steps", type=int, default=1, help="first steps of each run left out (warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per side, alternating")
    p.add_argument("--warmup-runs", type=int, default=1, help="discarded runs per side before measuring")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step (PPO: batch_size x num_samples "
                   "prompts, one completion each, since TRL's PPO samples one per prompt)")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--target-modules", default=LLAMA_TARGETS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="base weights and compute dtype on both sides (adapters stay fp32 on both: peft upcasts "
                        "them, pefrl keeps them fp32); bfloat16 pays on CPUs with AVX512-BF16 / AMX")
    p.add_argument("--pefrl-override", action="append", default=[], help="extra pefrl dotted.key=value")
    p.add_argument("--out", help="write all runs and the summary as JSON here")
    p.add_argument("--table-from", help="print the tables of an earlier --out JSON and exit")
    p.add_argument("--floor", action="store_true", help="also measure the memory floor of any transformers-based "
                   "trainer for this model and batch (child_floor) and print it against TRL's peak")
    p.add_argument("--child-pefrl", help=argparse.SUPPRESS)
    p.add_argument("--stage-peaks", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-floor", help=argparse.SUPPRESS)
    p.add_argument("--floor-shape", help=argparse.SUPPRESS)
    p.add_argument("--floor-dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--floor-quantization", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child_pefrl:
        child_pefrl(json.loads(a.child_pefrl), a.threads, a.stage_peaks)
        return 0
    if a.child_floor:
        rows, length = map(int, a.floor_shape.split("x"))
        child_floor(a.child_floor, rows, length, a.threads, a.floor_dtype, a.floor_quantization)
        return 0
    if a.table_from:  # summaries recomputed from the stored runs
        saved = json.loads(Path(a.table_from).read_text())
        skip = saved["args"]["skip_steps"]
        print(table({algo: {side: summarize(r, skip) for side, r in runs.items()} for algo, runs in saved["runs"].items()}))
        return 0
    algos = [x.strip() for x in a.algos.split(",") if x.strip()]
    for algo in algos:
        if algo not in TRL_PYTHON:
            raise SystemExit(f"--algos: {algo!r} is not one of {list(TRL_PYTHON)}")
        if not TRL_PYTHON[algo].exists():
            raise SystemExit(f"{TRL_PYTHON[algo]} missing: run `bash scripts/setup_bench_env.sh` first")
    model = resolve_model(a.model)
    rm = prepare_reward_model(model)
    prompts = write_prompts(CACHE / "prompts.jsonl", a.steps * a.batch_size * a.num_samples)
    print(f"model {model} | load {os.getloadavg()} | threads {a.threads} | {a.steps} steps x {a.repeats} repeats",
          flush=True)
    results, raw = {}, {}
    for algo in algos:
        runs = measure(a, algo, model, rm, prompts)
        results[algo] = {side: summarize(r, a.skip_steps) for side, r in runs.items()}
        raw[algo] = runs
        if a.out:  # after every pair, so a long run that is cut off keeps what it measured
            Path(a.out).write_text(json.dumps({"args": vars(a), "model": str(model), "load_average": os.getloadavg(),
                                               "summary": results, "runs": raw}, indent=1))
    print(table(results))
    if a.floor:
        floor_mib = measure_floor(a, model)
        print("\n" + floor_table(results, floor_mib))
        if a.out:
            saved = json.loads(Path(a.out).read_text())
            Path(a.out).write_text(json.dumps({**saved, "floor_peak_rss_mib": floor_mib}, indent=1))
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere: pefrl from this checkout
    sys.exit(main())

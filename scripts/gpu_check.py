"""GPU check: pefrl GRPO and PPO steps on Qwen2.5-0.5B- and 1.5B-shaped random bf16 bases.

    bash scripts/gpu_check.sh                                   # on the GPU machine, < 8 minutes on one H200
    python scripts/gpu_check.py --device cpu --tiny --steps 2   # what the test runs (seconds)

Per run (a subprocess: scripts/bench.py's pefrl child, so the CUDA peak is per run): decode tokens/s against
the HBM-bandwidth bound (every decode step reads all weights once: rows / (weight bytes / bandwidth)), the CUDA
peak (torch.cuda.max_memory_allocated), and the median step split from metrics.jsonl (generate / score /
reference+values / update). The bases are built by scripts/bench_1b.py (random weights, offline tokenizer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import bench
import bench_1b
from memory_model import base_bytes

HBM_BYTES_PER_S = 4.8e12  # H200 SXM: 4.8 TB/s


def decode_bound(shape_name: str, rows: int, bandwidth: float = HBM_BYTES_PER_S) -> float:
    """Tokens/s if each decode step of `rows` sequences only streamed the bf16 weights once (KV reads left out)."""
    return rows * bandwidth / base_bytes(bench_1b.BUILDABLE[shape_name], "bf16")


def check_one(a: argparse.Namespace, shape: str, algo: str, model: Path, prompts: Path) -> dict:
    env = {"CUDA_VISIBLE_DEVICES": ""} if a.device == "cpu" else {}
    log = bench.CACHE / "logs" / f"gpu-check-{shape}-{algo}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pefrl-gpu-check-") as out_dir:
        cmd = bench_1b.pefrl_command(a, algo, "bf16", [], model, prompts, out_dir)
        r = bench_1b.child_run(cmd, log, float("inf"), env)
    if "failed" in r:
        raise SystemExit(f"{shape} {algo}: {r['failed']}")
    rows = a.batch_size * a.num_samples
    split = {k: statistics.median(v[1:] or v) for k, v in r["split_s"].items()}  # first step: warm-up
    return {"shape": shape, "algo": algo, "rows": rows, "median_step_s": statistics.median(r["step_times_s"][1:] or
                                                                                           r["step_times_s"]),
            "decode_tokens_per_s": r["gen_tokens"] / r["gen_time_s"], "bound_tokens_per_s": decode_bound(shape, rows),
            "cuda_peak_bytes": r["cuda_peak_bytes"], "peak_rss_bytes": r["peak_rss_bytes"], "split_s": split}


def table(results: list[dict]) -> str:
    lines = ["| shape | algo | rows | step (s) | decode tok/s | HBM bound tok/s | of bound | CUDA peak (MiB) | "
             "generate | score | reference+values | update |", "|" + "---|" * 12]
    for r in results:
        s, peak = r["split_s"], r["cuda_peak_bytes"]
        lines.append(f"| {r['shape']} | {r['algo']} | {r['rows']} | {r['median_step_s']:.2f} | "
                     f"{r['decode_tokens_per_s']:.0f} | {r['bound_tokens_per_s']:.0f} | "
                     f"{r['decode_tokens_per_s'] / r['bound_tokens_per_s']:.1%} | "
                     f"{'-' if peak is None else f'{peak / 2**20:.0f}'} | {s['gen_time_s']:.2f} | "
                     f"{s['score_time_s']:.2f} | {s['reference_time_s']:.2f} | {s['train_time_s']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="one tiny Qwen2 shape instead of 0.5B and 1.5B (the test)")
    p.add_argument("--algos", default="grpo,ppo")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step (PPO: batch_size x num_samples)")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", help="write the results as JSON here")
    return bench_1b.with_bench_defaults(p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    shapes = ["tiny-qwen2"] if a.tiny else ["qwen2.5-0.5b", "qwen2.5-1.5b"]
    prompts = bench.write_prompts(bench.CACHE / "prompts-gpu-check.jsonl", a.steps * a.batch_size * a.num_samples)
    results = []
    for shape in shapes:
        model = bench_1b.build_base(shape, bench.CACHE / "models" / shape)
        for algo in a.algos.split(","):
            results.append(check_one(a, shape, algo, model, prompts))
            print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(bench.ROOT))
    sys.exit(main())

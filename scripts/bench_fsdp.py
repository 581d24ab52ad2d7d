"""Sharding the base: per-rank memory of a 1B-class bf16 base on one process, 2 DDP ranks and 2 FSDP ranks.

    python scripts/bench_fsdp.py --shape llama-3.2-1b --setups single,ddp,fsdp --out .cache/bench/fsdp.jsonl

The base is scripts/bench_1b.py's (random bf16 weights in the published shape, built once under .cache/bench);
the run is pefrl's trainer with bench_1b's overrides (rule reward, bf16), launched as a user would: `single` as
one process, `ddp` and `fsdp` through `accelerate launch` with recipes/accelerate/{ddp,fsdp}_cpu_2ranks.yaml
(two gloo CPU ranks). Every rank measures itself (stage_peaks.StagePeaks, Linux VmHWM): the peak before the
first stage (loading, and under FSDP sharding), RSS when the first stage starts and after the last update
(anonymous / file-mapped: an unsharded bf16 base stays the mmap'd safetensors file, resident once touched), and
the peak of the steps. Predicted: scripts/memory_model.py cpu_peak_bytes, with the base's per-rank share
(fsdp_rank_base_bytes) under FSDP. Results: docs/benchmarks.md ("Sharding the base").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import bench  # scripts/ is on sys.path when run as a script (and in the tests)
import bench_1b
import memory_model as mm

ACCEL = bench.ROOT / "recipes" / "accelerate"
SETUPS = {"single": None, "ddp": ACCEL / "ddp_cpu_2ranks.yaml", "fsdp": ACCEL / "fsdp_cpu_2ranks.yaml"}
PROMPT_LEN = 8  # tokens of an arithmetic prompt 'a+b=' with the tiny BPE tokenizer, at most (as bench_1b)


def rss_now() -> dict[str, int]:
    """This process's VmRSS, RssAnon and RssFile in bytes (/proc/self/status)."""
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name = line.split()[0] if line.strip() else ""
        if name in keys:
            out[keys[name]] = int(line.split()[1]) * 1024
    return out


def child(overrides: list[str], out_dir: Path) -> dict:
    """Inside one rank: train with pefrl, measuring this rank's memory; writes out_dir/rank<r>.json."""
    import torch

    torch.set_num_threads(1)
    from stage_peaks import StagePeaks

    from pefrl.config_loader import load_config
    from pefrl.trainer import train

    imports = bench.current_rss()
    cfg = load_config(None, overrides)
    stages, at_first_stage, at_mark = StagePeaks(), {}, {}
    mark = stages.mark

    def mark_and_record(name: str) -> None:
        if not at_first_stage:  # loading (and sharding) done, nothing of step 1 run yet
            at_first_stage.update(rss_now())
        at_mark[name] = rss_now()  # RSS at the end of stage `name`, of the last step
        mark(name)

    stages.mark = mark_and_record
    with stages.installed():
        train(cfg)
    stages.mark("other")
    steps = {k: v for k, v in stages.peaks.items() if k != "load"}
    result = {"rank": int(os.environ.get("RANK", "0")), "world": int(os.environ.get("WORLD_SIZE", "1")),
              "rss_after_imports_bytes": imports, "load_peak_bytes": stages.peaks["load"],
              "rss_at_step1_bytes": at_first_stage, "step_peak_bytes": max(steps.values()),
              "stage_peak_rss_bytes": stages.peaks, "rss_after_train_bytes": at_mark["train"]}
    (out_dir / f"rank{result['rank']}.json").write_text(json.dumps(result))
    return result


def run_setup(a: argparse.Namespace, setup: str, model: Path, prompts: Path, log: Path) -> list[dict]:
    """One setup as a user launches it -> each rank's result (or one {"failed": ...})."""
    with tempfile.TemporaryDirectory(prefix="pefrl-benchfsdp-") as tmp:
        res = Path(tmp) / "ranks"
        res.mkdir()
        o = bench_1b.pefrl_overrides_1b(a, a.algo, "bf16", [], model, prompts, str(Path(tmp) / "run"))
        me = [str(Path(__file__).resolve()), "--child", json.dumps(o), "--child-out", str(res)]
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(accelerate_config(a, setup, Path(tmp)))]
        cmd = [sys.executable, *me] if SETUPS[setup] is None else [*launch, *me]
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=bench.ROOT, env=bench.child_env(1), stdout=f, stderr=subprocess.STDOUT)
        ranks = [json.loads(p.read_text()) for p in sorted(res.glob("rank*.json"))]
    if proc.returncode or not ranks:
        return [{"failed": f"rc {proc.returncode}, see {log}"}]
    return ranks


def accelerate_config(a: argparse.Namespace, setup: str, tmp: Path) -> Path | None:
    """The setup's accelerate config; for fsdp with --fsdp-loading whole a copy with
    fsdp_cpu_ram_efficient_loading: false (every rank loads the whole base, then shards it)."""
    if setup != "fsdp" or a.fsdp_loading == "sharded":
        return SETUPS[setup]
    import yaml

    config = yaml.safe_load(SETUPS[setup].read_text())
    config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] = False
    out = tmp / "fsdp_whole_loading.yaml"
    out.write_text(yaml.safe_dump(config))
    return out


def predicted(rec: dict, r: dict) -> dict:
    """memory_model.cpu_peak_bytes of rank result `r` of setup record `rec`: load and step, bytes."""
    rows, new = rec["batch_size"] * rec["num_samples"], rec["max_new_tokens"]
    return mm.cpu_peak_bytes(bench_1b.BUILDABLE[rec["shape"]], "bf16", rows, PROMPT_LEN + new, new,
                             r["rss_after_imports_bytes"], critic=rec["algo"] == "ppo",
                             fsdp_world=r["world"] if rec["setup"] == "fsdp" else 1,
                             sharded_loading=rec.get("sharded_loading", False))  # absent: recorded before it


HEADER = ["| base | setup | rank | load peak | RSS at step 1 (anon / file) | step peak | RSS after the last update "
          "(anon / file) | predicted load / step |", "|---|---|---|---|---|---|---|---|"]


def rows_of(rec: dict) -> list[str]:
    """Table rows of one setup (MiB)."""
    m = lambda b: f"{b / 2**20:.0f}"
    out = []
    for r in rec["ranks"]:
        if "failed" in r:
            out.append(f"| {rec['shape']} | {rec['setup']} | - | {r['failed']} | | | | |")
            continue
        p, setup = predicted(rec, r), rec["setup"]
        if setup == "fsdp":  # how the base was loaded: each rank its shard, or each the whole base first
            setup += f", {'sharded' if rec.get('sharded_loading') else 'whole'} load"
        s1, end = r["rss_at_step1_bytes"], r["rss_after_train_bytes"]
        out.append(f"| {rec['shape']} | {setup} | {r['rank']} of {r['world']} | {m(r['load_peak_bytes'])} | "
                   f"{m(s1['rss'])} ({m(s1['anon'])} / {m(s1['file'])}) | {m(r['step_peak_bytes'])} | "
                   f"{m(end['rss'])} ({m(end['anon'])} / {m(end['file'])}) | {m(p['load'])} / {m(p['step'])} |")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(bench_1b.BUILDABLE))
    p.add_argument("--setups", default="single,ddp,fsdp", help=f"comma-separated, of {sorted(SETUPS)}")
    p.add_argument("--algo", default="grpo", choices=["grpo", "ppo"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2, help="prompts per step and rank")
    p.add_argument("--num-samples", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--fsdp-loading", default="sharded", choices=["sharded", "whole"],
                   help="fsdp: each rank reads its shard (fsdp_cpu_ram_efficient_loading: true, the config's), or "
                        "loads the whole base and then shards it (the key set false in a copy of the config)")
    p.add_argument("--out", help="append each setup's result as a JSON line here")
    p.add_argument("--table-from", help="print the table of an earlier --out JSONL file and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = bench_1b.with_bench_defaults(p.parse_args(argv))
    unknown = set(a.setups.split(",")) - set(SETUPS)
    if unknown:
        p.error(f"--setups: unknown {sorted(unknown)}, choose from {sorted(SETUPS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        child(json.loads(a.child), Path(a.child_out))
        return 0
    if a.table_from:
        print("\n".join(HEADER + [row for l in open(a.table_from) if l.strip() for row in rows_of(json.loads(l))]))
        return 0
    model = bench_1b.build_base(a.shape, bench.CACHE / "models" / a.shape)
    # every rank draws batch_size prompts a step; enough rows for two ranks
    prompts = bench.write_prompts(bench.CACHE / "prompts-fsdp.jsonl", 2 * a.steps * a.batch_size * a.num_samples)
    logs = bench.CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print("\n".join(HEADER), flush=True)
    for setup in a.setups.split(","):
        whole = setup == "fsdp" and a.fsdp_loading == "whole"
        log = logs / f"fsdp-{a.shape}-{setup}{'-whole-load' if whole else ''}.log"
        rec = {"shape": a.shape, "setup": setup, "algo": a.algo, "batch_size": a.batch_size,
               "num_samples": a.num_samples, "max_new_tokens": a.max_new_tokens,
               "sharded_loading": setup == "fsdp" and a.fsdp_loading == "sharded",
               "ranks": run_setup(a, setup, model, prompts, log)}
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        print("\n".join(rows_of(rec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(bench.ROOT))
    sys.exit(main())

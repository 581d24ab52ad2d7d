"""A learning race: pefrl's GRPO, DAPO and PPO against TRL's GRPOTrainer, held-out accuracy against CPU seconds.

    python scripts/race.py --contestants grpo,dapo,ppo,trl-grpo --model smollm2     # the race in docs/benchmarks.md
    python scripts/race.py --contestants grpo --tiny --steps 4 --save-every 2       # seconds: the embedded model

Every contestant gets the same base, prompts (chat template applied on both sides), samples per step, sampling
settings, LoRA, optimizer, learning rate, schedule (warm-up then constant: TRL's default linear decay is replaced
by `constant` / `constant_with_warmup`), KL coefficient and seed, and trains for the same number of samples. Each
saves its LoRA adapter every `--save-every` steps (pefrl: train.save_every checkpoints; TRL: a callback in
scripts/race_trl.py); afterwards ONE code path (`evaluate_adapters`, pefrl's evaluation) scores every saved adapter
on the same held-out prompts: greedy accuracy, and pass@k / mean@k over k sampled completions per prompt.
Training CPU seconds up to each point: pefrl's metrics.jsonl `step_cpu_s`, TRL's step-timer callback
(scripts/bench_trl.py). Children, environments and the TRL venv are scripts/bench.py's. Prints a table and writes
one PNG (accuracy against CPU seconds and against samples).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (scripts/bench.py: children, their environment, the TRL venvs, the model paths)

ROOT = bench.ROOT
DATA = {"smollm2": (ROOT / "recipes/data/smollm_arith_train.jsonl", ROOT / "recipes/data/smollm_arith_eval.jsonl",
                    "pefrl.tasks.smollm_arith:answer_form_reward"),
        "tiny": ("builtin:arithmetic", "builtin:arithmetic-eval", "pefrl.tasks.arithmetic:exact_match")}


@dataclass(frozen=True)
class Contestant:
    name: str
    side: str  # "pefrl" or "trl"
    algo: str
    overrides: tuple[str, ...] = ()
    """pefrl keys of this contestant's own (beyond the shared settings)."""


CONTESTANTS = {c.name: c for c in (
    Contestant("grpo", "pefrl", "grpo"),
    Contestant("dapo", "pefrl", "dapo"),
    # PPO samples one completion per prompt: batch_size x num_samples prompts, so the same samples per step.
    # Unwhitened advantages as in recipes/configs/smollm2_ppo.yaml (rare rewards: whitening scales value noise up).
    Contestant("ppo", "pefrl", "ppo", ("rl.whiten_advantages=false",)),
    Contestant("trl-grpo", "trl", "grpo"),
)}


def available(names: list[str]) -> tuple[list[Contestant], list[str]]:
    """The contestants this tree can run, and a note for each skipped one (an algorithm not registered yet)."""
    from pefrl.algorithms import ALGORITHMS

    chosen, notes = [], []
    for name in names:
        if name not in CONTESTANTS:
            raise SystemExit(f"--contestants: {name!r} is not one of {list(CONTESTANTS)}")
        c = CONTESTANTS[name]
        if c.side == "pefrl" and c.algo not in ALGORITHMS:
            notes.append(f"{name}: skipped, algo {c.algo!r} is not in pefrl.algorithms.ALGORITHMS in this tree")
            continue
        chosen.append(c)
    return chosen, notes


def trl_scheduler(warmup_steps: int) -> dict:
    """TRL arguments for pefrl's schedule: linear warm-up over `warmup_steps` optimizer steps, then constant
    (pefrl.trainer; TRL's own default decays linearly to zero, which would change what is compared)."""
    if warmup_steps:
        return {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": warmup_steps}
    return {"lr_scheduler_type": "constant"}


def checkpoints(a: argparse.Namespace) -> list[int]:
    """The steps at which every contestant's adapter is saved and scored (step 0: the base, shared)."""
    return list(range(a.save_every, a.steps + 1, a.save_every))


# --- the shared settings, as pefrl keys and as TRL arguments ----------------------------------------------------


def shared_overrides(a: argparse.Namespace) -> list[str]:
    """pefrl config keys every contestant (and the evaluation) shares; race_trl.py gets the same values."""
    train, held_out, reward = DATA[a.model]
    model = "" if a.model == "tiny" else str(bench.resolve_model(a.model))
    return [f"model.name_or_path={model}", "model.dtype=float32", f"lora.r={a.lora_r}", f"lora.alpha={a.lora_alpha}",
            "lora.dropout=0.0", f"lora.target_modules=[{bench.LLAMA_TARGETS}]", f"data.prompts={train}",
            f"data.eval_prompts={held_out}", f"data.eval_size={a.eval_size}", "data.chat_template=auto",
            f"rollout.max_new_tokens={a.max_new_tokens}", f"rollout.temperature={a.temperature}",
            f"reward.functions=[{reward}]", f"rl.kl_coef={a.kl_coef}", f"rl.epochs={a.epochs}",
            f"rl.minibatch_size={a.minibatch_size}", "rl.grad_accum_steps=1", f"train.seed={a.seed}",
            f"train.lr={a.lr}", f"train.warmup_steps={a.warmup_steps}", "train.max_grad_norm=1.0",
            f"rollout.batch_size={a.batch_size}", f"rollout.num_samples={a.num_samples}"]


def pefrl_overrides(a: argparse.Namespace, c: Contestant, out_dir: Path) -> list[str]:
    o = shared_overrides(a) + [f"algo={c.algo}", f"output_dir={out_dir}", f"train.steps={a.steps}",
                               f"train.save_every={a.save_every}", f"train.keep_last={a.steps}",
                               "train.overwrite=true", "train.eval_every=0", f"train.log_every={a.steps}",
                               "data.eval_prompts="]  # no trainer evaluation: evaluate_adapters scores afterwards
    if c.algo == "ppo":
        o += [f"rollout.batch_size={a.batch_size * a.num_samples}", "rollout.num_samples=1"]
    return o + list(c.overrides)  # later keys win


def trl_args(a: argparse.Namespace, out_dir: Path) -> list[str]:
    train, _, reward = DATA[a.model]
    return ["--model", str(bench.resolve_model(a.model)), "--prompts", str(train), "--reward-fn", reward,
            "--batch-size", str(a.batch_size), "--num-samples", str(a.num_samples),
            "--max-new-tokens", str(a.max_new_tokens), "--temperature", str(a.temperature),
            "--steps", str(a.steps), "--epochs", str(a.epochs), "--minibatch-size", str(a.minibatch_size),
            "--lr", str(a.lr), "--schedule", json.dumps(trl_scheduler(a.warmup_steps)),
            "--kl-coef", str(a.kl_coef), "--lora-r", str(a.lora_r), "--lora-alpha", str(a.lora_alpha),
            "--target-modules", bench.LLAMA_TARGETS, "--seed", str(a.seed), "--threads", str(a.threads),
            "--save-every", str(a.save_every), "--out-dir", str(out_dir)]


# --- training: one child per contestant --------------------------------------------------------------------


def train_contestant(a: argparse.Namespace, c: Contestant, out: Path) -> dict:
    """Train in a child process -> {"step_cpu_s": per RL step, "split_s": pefrl's stage times, "adapters":
    {step: adapter dir}}."""
    run_dir = out / c.name
    shutil.rmtree(run_dir, ignore_errors=True)
    log = out / f"{c.name}-train.log"
    if c.side == "trl":
        cmd = [str(bench.TRL_PYTHON["grpo"]), str(ROOT / "scripts" / "race_trl.py")] + trl_args(a, run_dir)
        res = bench.run_child(cmd, a.threads, log)
        res["adapters"] = {s: str(adopt_peft_adapter(run_dir / f"checkpoint-{s}" / "adapters")) for s in checkpoints(a)}
        return res
    cmd = [sys.executable, str(Path(bench.__file__).resolve()), "--child-pefrl",
           json.dumps(pefrl_overrides(a, c, run_dir)), "--threads", str(a.threads)]
    res = bench.run_child(cmd, a.threads, log)
    res["adapters"] = {s: str(run_dir / f"checkpoint-{s}" / "adapters") for s in checkpoints(a)}
    return res


def adopt_peft_adapter(adapters_dir: Path) -> Path:
    """Make a plain peft adapter (TRL's, saved at adapters_dir/policy) loadable by pefrl.adapters_io.load_adapters:
    the policy alone, no critic, no value head. Then pefrl and TRL adapters take one evaluation path."""
    from pefrl.adapters_io import HEADS_FILE
    from pefrl.models.bundle import POLICY

    if not (adapters_dir / POLICY / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapters_dir / POLICY} holds no peft adapter")
    meta = {"adapters": [POLICY], "critic": "none", "reference": None, "value_head": False}
    (adapters_dir / HEADS_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return adapters_dir


# --- evaluation: one code path for every adapter --------------------------------------------------------------


def evaluate_adapters(overrides: list[str], adapters: list[str | None], k: int, seed: int) -> list[dict]:
    """Greedy accuracy, pass@k and mean@k on the held-out prompts for each adapter directory (None: the base),
    through pefrl's one evaluation (pefrl.evaluation.evaluate with eval.num_samples k: the k samples at the
    training temperature from a generator seeded by train.seed, the same for every adapter; a completion counts
    as correct when its reward is >= 0.5, both tasks scoring 0 or 1)."""
    from pefrl.adapters_io import load_adapters
    from pefrl.config_loader import load_config
    from pefrl.evaluation import eval_rows, evaluate
    from pefrl.models import load_models, load_tokenizer
    from pefrl.rewards import build_scorer

    cfg = load_config(None, [*overrides, f"train.seed={seed}", f"eval.num_samples={k}", "eval.correct_threshold=0.5"])
    rows, scorer = eval_rows(cfg), build_scorer(cfg.reward)
    tokenizer = load_tokenizer(cfg.model)
    models = load_models(cfg.model, cfg.lora, uses_critic=False)  # LoRA B starts at zero: the base until loaded
    models.model.eval()
    results = []
    for adapter in adapters:
        if adapter is not None:
            load_adapters(models, adapter)
        m = evaluate(models, tokenizer, rows, cfg, scorer)
        results.append({"adapter": adapter, "greedy": m["reward_mean"], "n": len(rows), "k": k,
                        "pass_at_k": m[f"pass@{k}"], "mean_at_k": m[f"mean@{k}"]})
    return results


def child_eval(spec: dict, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    results = evaluate_adapters(spec["overrides"], spec["adapters"], spec["k"], spec["seed"])
    print("BENCH_JSON " + json.dumps(results), flush=True)


def eval_contestant(a: argparse.Namespace, name: str, adapters: list[str | None], out: Path) -> list[dict]:
    spec = {"overrides": shared_overrides(a), "adapters": adapters, "k": a.k, "seed": a.seed}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-eval", json.dumps(spec), "--threads", str(a.threads)]
    return bench.run_child(cmd, a.threads, out / f"{name}-eval.log")


# --- the race, its table and its plot ----------------------------------------------------------------------


def race_points(a: argparse.Namespace, train: dict, evals: list[dict], base: dict) -> list[dict]:
    """One row per point: step, samples, training CPU seconds up to it, accuracies (step 0 is the shared base)."""
    samples_per_step = a.batch_size * a.num_samples
    points = [{"step": 0, "samples": 0, "cpu_s": 0.0, **base}]
    for step, ev in zip(checkpoints(a), evals):
        cpu_s = sum(train["step_cpu_s"][:step])
        points.append({"step": step, "samples": step * samples_per_step, "cpu_s": cpu_s, **ev})
    return points


def table(results: dict[str, list[dict]], k: int) -> str:
    lines = [f"| contestant | step | samples | training CPU s | greedy acc | pass@{k} | mean@{k} |",
             "|---|---|---|---|---|---|---|"]
    for name, points in results.items():
        for p in points:
            lines.append(f"| {name} | {p['step']} | {p['samples']} | {p['cpu_s']:.1f} | {p['greedy']:.2f} | "
                         f"{p['pass_at_k']:.2f} | {p['mean_at_k']:.2f} |")
    return "\n".join(lines)


def verdict(results: dict[str, list[dict]], reference: str = "trl-grpo") -> list[str]:
    """For each pefrl contestant: the CPU seconds at which it first reached `reference`'s final greedy accuracy,
    as a fraction of the reference's CPU seconds (goal: <= 0.5)."""
    if reference not in results:
        return []
    base, final = results[reference][0], results[reference][-1]
    lines = [f"{reference} final greedy accuracy {final['greedy']:.2f} after {final['cpu_s']:.0f} CPU s"]
    if final["greedy"] <= base["greedy"]:  # then "reaching" it takes no learning at all
        lines[0] += f", no better than the base's {base['greedy']:.2f}: the comparison says nothing about learning"
    for name, points in results.items():
        if name == reference:
            continue
        hit = next((p for p in points if p["step"] > 0 and p["greedy"] >= final["greedy"]), None)
        lines.append(f"{name}: " + (f"reached it at step {hit['step']}, {hit['cpu_s']:.0f} CPU s = "
                                    f"{hit['cpu_s'] / final['cpu_s']:.2f} of {reference}'s" if hit else
                                    "did not reach it within the budget"))
    return lines


def split_table(splits: dict[str, dict]) -> str:
    """Where a pefrl step goes: median CPU seconds per step, and each stage's share of the step's wall time
    (metrics.jsonl: gen_time_s, score_time_s, reference_time_s, train_time_s, summed over the steps). Shares,
    not seconds: on a shared machine every stage's wall time stretches with the load, its share much less."""
    keys = ("gen_time_s", "score_time_s", "reference_time_s", "train_time_s")
    lines = ["| pefrl contestant | CPU s/step | generate | score | reference+values | update |",
             "|---|---|---|---|---|---|"]
    for name, res in splits.items():
        totals = [sum(res["split_s"][k]) for k in keys]
        shares = " | ".join(f"{t / sum(totals):.0%}" for t in totals)
        lines.append(f"| {name} | {statistics.median(res['step_cpu_s']):.2f} | {shares} |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_cpu, by_samples) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, points in results.items():
        style = "--" if name.startswith("trl") else "-"
        for ax, key in ((by_cpu, "cpu_s"), (by_samples, "samples")):
            ax.plot([p[key] for p in points], [p["greedy"] for p in points], style, marker="o", label=name)
    by_cpu.set_xlabel("training CPU seconds")
    by_samples.set_xlabel("training samples")
    by_cpu.set_ylabel("held-out greedy accuracy")
    by_samples.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run_race(a: argparse.Namespace, contestants: list[Contestant], out: Path) -> tuple[dict, dict, list[str]]:
    """Train and evaluate every contestant, `--parallel` children at a time -> (points per contestant, raw runs,
    a note per contestant that failed).
    Each contestant's evaluation follows its own training; the base is evaluated once, beside them."""

    def one(c: Contestant) -> tuple[dict, list[dict]]:
        res = train_contestant(a, c, out)
        print(f"  {c.name}: trained, {sum(res['step_cpu_s']):.0f} CPU s", flush=True)
        return res, eval_contestant(a, c.name, [res["adapters"][s] for s in checkpoints(a)], out)

    with ThreadPoolExecutor(max_workers=a.parallel) as pool:
        base = pool.submit(eval_contestant, a, "base", [None], out)
        jobs = {c.name: pool.submit(one, c) for c in contestants}
        base_eval = base.result()[0]
        raw, failed = {}, []
        for name, job in jobs.items():
            try:
                raw[name] = job.result()
            except RuntimeError as e:  # one contestant failing keeps the others' results (its log is named)
                failed.append(f"{name}: failed, {str(e).splitlines()[0]}")
                print(failed[-1], flush=True)
    points = {name: race_points(a, res, evals, base_eval) for name, (res, evals) in raw.items()}
    return points, {name: res for name, (res, _) in raw.items()}, failed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="pefrl vs TRL: held-out accuracy against training CPU seconds",
                                epilog="Run scripts/setup_bench_env.sh first for trl-grpo. See docs/benchmarks.md.")
    p.add_argument("--contestants", default="grpo,dapo,ppo,trl-grpo", help=f"from {list(CONTESTANTS)}")
    p.add_argument("--model", default="smollm2", choices=list(DATA), help="smollm2: SmolLM2-135M-Instruct on "
                   "recipes/data/smollm_arith_*; tiny: the embedded model on builtin:arithmetic")
    p.add_argument("--tiny", action="store_true", help="same as --model tiny")
    p.add_argument("--steps", type=int, default=4, help="RL steps per contestant")
    p.add_argument("--save-every", type=int, default=2, help="steps between scored adapters")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step (PPO: x num-samples prompts)")
    p.add_argument("--num-samples", type=int, default=4, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--minibatch-size", type=int, default=8, help="completions per optimizer step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=0, help="optimizer steps of linear warm-up, then constant")
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", help="comma-separated seeds: the whole race once per seed (under --out/seed-N), "
                   "then the table, verdict and plot of the mean over seeds; overrides --seed")
    p.add_argument("--eval-size", type=int, default=50, help="held-out prompts scored")
    p.add_argument("--k", type=int, default=4, help="sampled completions per held-out prompt for pass@k")
    p.add_argument("--threads", type=int, default=1, help="torch threads per child")
    p.add_argument("--parallel", type=int, default=4, help="children at a time")
    p.add_argument("--out", default=str(ROOT / "runs" / "race"), help="run directories, logs and race.json")
    p.add_argument("--plot", default=str(ROOT / "docs" / "images" / "race.png"))
    p.add_argument("--table-from", help="print the table of an earlier race.json (and redraw --plot) and exit")
    p.add_argument("--child-eval", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.tiny:
        a.model = "tiny"
    if a.steps % a.save_every:
        p.error(f"--steps {a.steps} must be a multiple of --save-every {a.save_every}")
    if (a.batch_size * a.num_samples) % a.minibatch_size:
        p.error("--minibatch-size must divide --batch-size x --num-samples")
    return a


def report(saved: dict, plot_path: Path) -> None:
    results, k = saved["points"], saved["args"]["k"]
    print(table(results, k))
    print("\n".join(["", *verdict(results), *saved["notes"]]))
    splits = {n: r for n, r in saved["runs"].items() if "split_s" in r}
    if splits:
        print("\n" + split_table(splits))
    for name, run in saved["runs"].items():
        if "generate_share" in run:  # TRL: only generate() is timed apart from the whole step
            print(f"{name}: generate {run['generate_share']:.0%} of the step's wall time, "
                  f"{statistics.median(run['step_cpu_s']):.2f} CPU s/step")
    a = saved["args"]
    title = (f"{a['model']}: {a['batch_size']}x{a['num_samples']} samples/step, lr {a['lr']} constant, "
             f"kl {a['kl_coef']}, {a['eval_size']} held-out prompts"
             + (f", mean of seeds {a['seeds']}" if saved.get("seeds") else ""))
    print(f"\nplot: {plot(results, plot_path, title)}")


def mean_points(per_seed: list[dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """Per contestant and scoring point, the mean over seeds of CPU seconds and every accuracy (contestants
    present in every seed only). Steps and samples are the same in every seed."""
    names = [n for n in per_seed[0] if all(n in r for r in per_seed)]
    keys = ("cpu_s", "greedy", "pass_at_k", "mean_at_k")
    return {n: [{**rows[0], **{k: statistics.fmean(r[k] for r in rows) for k in keys}}
                for rows in zip(*(r[n] for r in per_seed))] for n in names}


def run_seeds(a: argparse.Namespace, contestants: list[Contestant], notes: list[str], out: Path) -> dict:
    """The race once per seed (--seeds), each under out/seed-N with its own race.json; -> the saved dict of
    the mean over seeds, with every seed's points and runs kept under "seeds"."""
    per_seed = {}
    for seed in [int(x) for x in a.seeds.split(",")]:
        a.seed = seed
        seed_out = out / f"seed-{seed}"
        seed_out.mkdir(parents=True, exist_ok=True)
        points, runs, failed = run_race(a, contestants, seed_out)
        saved = {"args": vars(a), "notes": notes + failed, "points": points, "runs": runs}
        (seed_out / "race.json").write_text(json.dumps(saved, indent=1))
        print(f"seed {seed}:\n{table(points, a.k)}\n" + "\n".join(verdict(points)), flush=True)
        per_seed[seed] = saved
    first = next(iter(per_seed.values()))
    return {"args": vars(a), "notes": first["notes"] + [f"mean over seeds {a.seeds}"],
            "points": mean_points([s["points"] for s in per_seed.values()]),
            "runs": first["runs"], "seeds": {str(k): v["points"] for k, v in per_seed.items()}}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child_eval:
        child_eval(json.loads(a.child_eval), a.threads)
        return 0
    if a.table_from:
        report(json.loads(Path(a.table_from).read_text()), Path(a.plot))
        return 0
    contestants, notes = available([x.strip() for x in a.contestants.split(",") if x.strip()])
    if any(c.side == "trl" for c in contestants) and not bench.TRL_PYTHON["grpo"].exists():
        raise SystemExit(f"{bench.TRL_PYTHON['grpo']} missing: run `bash scripts/setup_bench_env.sh` first")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"race: {[c.name for c in contestants]} on {a.model}, {a.steps} steps x {a.batch_size * a.num_samples} "
          f"samples, scored at steps {checkpoints(a)}" + "".join(f"\n  {n}" for n in notes), flush=True)
    if a.seeds:
        saved = run_seeds(a, contestants, notes, out)
    else:
        points, runs, failed = run_race(a, contestants, out)
        saved = {"args": vars(a), "notes": notes + failed, "points": points, "runs": runs}
    (out / "race.json").write_text(json.dumps(saved, indent=1))
    report(saved, Path(a.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())

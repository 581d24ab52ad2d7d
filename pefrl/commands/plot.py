"""`pefrl plot RUN_DIR [--out FILE]`: a PNG of reward, KL, entropy and the step-time split over steps.

Reads RUN_DIR/metrics.jsonl (one JSON object per step, see pefrl/metrics.py). A metric missing from every step
(e.g. `eval_reward_mean` when the run never evaluated mid-training) is left out of its panel, not plotted as 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

STAGES = (("gen_time_s", "generate"), ("score_time_s", "score"), ("reference_time_s", "reference"),
          ("train_time_s", "train"))
"""Step-time keys in metrics.jsonl and their legend labels, in loop order (stages 2, 3, 4, 6)."""


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the records that hold a finite value for it (None marks non-finite)."""
    steps, values = [], []
    for r in records:
        if r.get(key) is not None:
            steps.append(int(r["step"]) + 1)  # 1-based, as the progress line counts
            values.append(float(r[key]))
    return steps, values


def plot_metrics(records: list[dict[str, Any]], out: str | Path, title: str = "",
                 summary: dict[str, Any] | None = None) -> Path:
    """Write a 2x2 PNG (reward + eval reward, KL, entropy, stacked step-time split) to `out`.

    `summary` (the run's summary.json) adds its `eval_before` at step 0 and `eval_after` at the last step to the
    eval reward line: the trainer evaluates there without writing a metrics line.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("no metrics to plot: metrics.jsonl is empty")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    (ax_reward, ax_kl), (ax_entropy, ax_time) = axes

    _line(ax_reward, records, "reward_mean", "train reward", band_key="reward_std")
    _line(ax_reward, _with_summary_evals(records, summary or {}), "eval_reward_mean", "eval reward (greedy)",
          marker="o")
    ax_reward.set_title("reward")
    _line(ax_kl, records, "kl", "KL(policy || reference) per sequence")
    ax_kl.set_title("KL")
    _line(ax_entropy, records, "entropy", "entropy per token")
    ax_entropy.set_title("entropy")
    _time_split(ax_time, records)
    ax_time.set_title("step time split")
    ax_time.set_ylabel("seconds")

    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper center" if ax is ax_time else "best", ncol=3 if ax is ax_time else 1)
    for ax in axes[1]:
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _with_summary_evals(records: list[dict[str, Any]], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Eval points only, with summary.json's before/after evaluations added at steps 0 and the last one."""
    points = [{"step": r["step"], "eval_reward_mean": r["eval_reward_mean"]} for r in records
              if r.get("eval_reward_mean") is not None]
    if summary.get("eval_before") is not None:
        points.insert(0, {"step": -1, "eval_reward_mean": summary["eval_before"]})  # plotted at x = 0
    last = int(records[-1]["step"])
    if summary.get("eval_after") is not None and not (points and points[-1]["step"] == last):
        points.append({"step": last, "eval_reward_mean": summary["eval_after"]})
    return points


def _line(ax, records, key: str, label: str, band_key: str | None = None, marker: str | None = None) -> None:
    steps, values = series(records, key)
    if not steps:
        return
    (line,) = ax.plot(steps, values, label=label, marker=marker, markersize=4)
    if band_key:
        _, stds = series(records, band_key)
        if len(stds) == len(values):  # +-1 std over the batch's sequences
            low = [v - s for v, s in zip(values, stds)]
            high = [v + s for v, s in zip(values, stds)]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)


def _time_split(ax, records) -> None:
    """Stacked areas of the stage times; the rest of step_time_s (logging, eval, checkpoints) on top."""
    rows = [r for r in records if all(r.get(k) is not None for k, _ in STAGES)]
    if not rows:
        return
    steps = [int(r["step"]) + 1 for r in rows]
    stacks = [[float(r[k]) for r in rows] for k, _ in STAGES]
    labels = [label for _, label in STAGES]
    if all(r.get("step_time_s") is not None for r in rows):
        other = [max(0.0, float(r["step_time_s"]) - sum(float(r[k]) for k, _ in STAGES)) for r in rows]
        stacks.append(other)
        labels.append("other (log, eval, save)")
    ax.stackplot(steps, *stacks, labels=labels, alpha=0.8)
    top = max(sum(col) for col in zip(*stacks))
    ax.set_ylim(0, top * 1.45 if top > 0 else 1.0)  # headroom so the legend does not cover the areas


def run(args: argparse.Namespace) -> int:
    from pefrl.metrics import read_metrics

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "metrics.png"
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    plot_metrics(read_metrics(run_dir), out, title=str(run_dir), summary=summary)
    print(out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot reward, KL, entropy and step time of a run to a PNG",
                       description="Write a PNG of reward (and eval reward), KL, entropy and the step-time split "
                                   "(generate / score / reference / train) over steps, read from "
                                   "RUN_DIR/metrics.jsonl.")
    p.add_argument("run_dir", help="a run's output_dir (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    p.set_defaults(func=run)

"""`pefrl export RUN_DIR_OR_CHECKPOINT --out DIR [--merge] [--dtype bf16|fp16|fp32] [--value-head]`.

Writes the policy as a peft adapter (default) or merged into the base (--merge, dequantized first when the
base was 4-bit / 8-bit), plus the tokenizer; then loads the export back and compares its logits with the
trained policy's on a few prompts. Prints one JSON report {max_abs_diff, adapter_effect, tolerance, ...};
exit 1 (and nothing written to DIR) when max_abs_diff exceeds the tolerance. See pefrl/export.py.
"""

from __future__ import annotations

import argparse
import json
import sys


def run(args: argparse.Namespace) -> int:
    from pefrl.export import export

    # an ExportError (a PefrlError) becomes one line and exit 1 in cli.main
    report = export(args.source, args.out, merge=args.merge, dtype=args.dtype, value_head=args.value_head,
                    tolerance=args.tolerance)
    print(json.dumps(report))
    print(f"exported to {args.out}: max |logit diff| vs the trained policy {report['max_abs_diff']:.3g} "
          f"(tolerance {report['tolerance']:g}; the adapter itself moves logits by up to "
          f"{report['adapter_effect']:.3g})", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="export a trained policy (adapter or merged model), verified",
                       description="Export RUN_DIR's final policy (or a checkpoint's) as a peft adapter, or merged "
                                   "into the base with --merge; verifies the export against the trained policy. "
                                   "Example: pefrl export runs/smollm2_ppo --out exported/smollm2 --merge "
                                   "--dtype bf16")
    p.add_argument("source", help="a run's output_dir, a checkpoint-<step> directory, or an adapter directory")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--merge", action="store_true",
                   help="merge the adapter into the base: a plain transformers model (safetensors)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="weights dtype of a merged export (default: the run's model.dtype)")
    p.add_argument("--value-head", action="store_true",
                   help="also export the critic adapter and value head to DIR/value/")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest allowed max |logit diff| (default: 1e-3, or twice what casting the base "
                        "alone to --dtype costs, when that is more)")
    p.set_defaults(func=run)

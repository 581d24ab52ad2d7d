#!/usr/bin/env bash
# GPU check, ready to run on a bare GPU machine (one H200: torch + CUDA, transformers, peft, accelerate
# preinstalled, no network): pefrl GRPO and PPO steps on Qwen2.5-0.5B- and 1.5B-shaped random bf16 bases,
# decode tokens/s against the HBM bound, CUDA peak memory, step split. Under 8 minutes; results in $OUT.
#
#   bash scripts/gpu_check.sh                 # extra arguments go to scripts/gpu_check.py
#
# Nothing is installed: pefrl runs from this checkout through PYTHONPATH, and needs only torch, transformers,
# peft, accelerate, safetensors, tokenizers, pyyaml and tqdm (datasets and bitsandbytes are imported lazily,
# and neither is used here). The check below says what is missing before any minute is spent.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out="${OUT:-.cache/gpu_check}"
mkdir -p "$out"
python - <<'PY'
import importlib, sys
missing = []
for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "yaml", "tqdm"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except ImportError:
        missing.append(name)
if missing:
    sys.exit(f"missing: {' '.join(missing)} (carry them as wheels: pip install --no-deps --no-index WHEEL)")
import torch
print("cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NOT AVAILABLE")
import pefrl.trainer  # the whole training import chain, from this checkout
PY
timeout 470 python scripts/gpu_check.py --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
cp -r .cache/bench/logs "$out/logs" 2>/dev/null || true

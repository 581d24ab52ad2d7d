#!/usr/bin/env bash
# Create the TRL environments that scripts/bench.py compares pefrl against (TRL is never a pefrl dependency).
#
#   .cache/bench/trl116  trl==1.16.*  GRPOTrainer, RLOOTrainer
#   .cache/bench/trl112  trl==1.12.0  the newest release with PPO (trl.experimental.ppo; 1.13 dropped it)
#
# Each venv sees the system site-packages (torch 2.13.0 CPU, transformers, accelerate, datasets, psutil), so
# both sides of the benchmark run the very same torch and transformers builds; TRL's own pins are checked by
# `pip check` below and would be installed inside the venv (shadowing the system copy) if they disagreed.
# torch==2.13.0 is requested first so pip can never pull a CUDA build. Idempotent: a venv that already holds the
# wanted trl version is left alone (checked from package metadata: importing trl takes ~10 s on a busy CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=.cache/bench
PY=${PYTHON:-python3}

make_env() {  # make_env NAME TRL_SPEC VERSION_PREFIX CHECK_IMPORT
    local name=$1 spec=$2 want=$3 check=$4 env=$ROOT/$1
    if [ -x "$env/bin/python" ] && "$env/bin/python" -c "import importlib.metadata as m, sys
sys.exit(0 if m.version('trl').startswith('$want') and m.version('torch').startswith('2.13.0') else 1)" 2>/dev/null
    then
        echo "$env: ready (trl $want)"
        return
    fi
    mkdir -p "$ROOT"
    "$PY" -m venv --system-site-packages "$env"
    "$env/bin/python" -m pip install -q "torch==2.13.0"
    "$env/bin/python" -m pip install -q "$spec" psutil
    "$env/bin/python" -m pip check || echo "warning: pip check reports conflicts in $env" >&2
    "$env/bin/python" -c "$check"
    echo "$env: installed ($("$env/bin/python" -c 'import trl; print("trl", trl.__version__)'))"
}

make_env trl116 "trl==1.16.*" 1.16 \
    "import trl; assert trl.__version__.startswith('1.16'); from trl import GRPOTrainer, RLOOTrainer"
make_env trl112 "trl==1.12.0" 1.12.0 \
    "import trl; assert trl.__version__ == '1.12.0'; from trl.experimental.ppo import PPOTrainer, PPOConfig"

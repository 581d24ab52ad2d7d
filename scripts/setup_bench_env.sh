#!/usr/bin/env bash
# Create the TRL environments that scripts/bench.py compares pefrl against (TRL is never a pefrl dependency).
#
#   .cache/bench/trl116  trl==1.16.*  GRPOTrainer, RLOOTrainer
#   .cache/bench/trl112  trl==1.12.0  the newest release with PPO (trl.experimental.ppo; 1.13 dropped it)
#
# Each venv is self-contained (no system site-packages): it installs everything bench_trl.py imports, with torch,
# transformers, peft, accelerate, datasets, tokenizers and safetensors pinned to the versions pefrl itself runs
# with in the Python that calls this script (read from its package metadata), so both sides of the benchmark run
# the very same builds. `pip check` then reports whether TRL accepts those pins; an import check of every module
# bench_trl.py uses runs last. Idempotent: a venv that already holds the wanted trl and pins is left alone
# (checked from package metadata: importing trl takes ~10 s on a busy CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=.cache/bench
PY=${PYTHON:-python3}

PINNED="torch transformers peft accelerate datasets tokenizers safetensors"
PINS=$("$PY" - $PINNED <<'EOF'
import importlib.metadata as m, sys
print(" ".join(f"{name}=={m.version(name)}" for name in sys.argv[1:]))
EOF
)

make_env() {  # make_env NAME TRL_SPEC VERSION_PREFIX CHECK_IMPORT
    local name=$1 spec=$2 want=$3 check=$4 env=$ROOT/$1
    if [ -x "$env/bin/python" ] && "$env/bin/python" - "$want" $PINS <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
want, pins = sys.argv[1], [p.split("==") for p in sys.argv[2:]]
sys.exit(0 if m.version("trl").startswith(want) and all(m.version(n) == v for n, v in pins) else 1)
EOF
    then
        echo "$env: ready (trl $want; $PINS)"
        return
    fi
    rm -rf "$env"
    mkdir -p "$ROOT"
    "$PY" -m venv "$env"
    # torch first and alone, so pip resolves the local CPU build and never pulls a CUDA one
    "$env/bin/python" -m pip install -q "$(echo "$PINS" | tr ' ' '\n' | grep '^torch==')"
    "$env/bin/python" -m pip install -q "$spec" $PINS psutil
    "$env/bin/python" -m pip check || echo "warning: pip check reports conflicts in $env" >&2
    "$env/bin/python" -c "import psutil, peft, datasets, transformers, accelerate; $check"
    echo "$env: installed ($("$env/bin/python" -c 'import trl; print("trl", trl.__version__)'); $PINS)"
}

make_env trl116 "trl==1.16.*" 1.16 \
    "import trl; assert trl.__version__.startswith('1.16'); from trl import GRPOTrainer, RLOOTrainer"
make_env trl112 "trl==1.12.0" 1.12.0 \
    "import trl; assert trl.__version__ == '1.12.0'; from trl.experimental.ppo import PPOTrainer, PPOConfig"

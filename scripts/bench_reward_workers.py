"""What calling rewards in forked worker processes costs (reward.workers / reward.timeout_s), against in-process.

The tiny base is loaded first so that the fork copies a training process, not an empty interpreter. The reward
is a closure (a lambda over a local): spawn/forkserver workers could not receive it, which the first line shows.

    OMP_NUM_THREADS=1 python scripts/bench_reward_workers.py
"""

import pickle
import time

from pefrl.config import LoraConfig, ModelConfig
from pefrl.models import load_models
from pefrl.rewards import Scorer
from pefrl.tasks.arithmetic import DEFAULT_MODEL_DIR

models = load_models(ModelConfig(name_or_path=str(DEFAULT_MODEL_DIR)), LoraConfig(r=2), uses_critic=False)
k = 3
closure = lambda prompts, completions, **_: [float(len(c) == k) for c in completions]  # noqa: E731
try:
    pickle.dumps(closure)
except Exception as e:
    print(f"a closure for spawn/forkserver: {type(e).__name__}: {str(e)[:70]}")
prompts, completions = ["1+1="] * 64, ["2"] * 64
for label, kw in [("in process", {}), ("workers=1", {"workers": 1}), ("timeout_s=5", {"timeout_s": 5.0})]:
    scorer = Scorer([("closure", closure, 1.0)], **kw)
    t0 = time.perf_counter()
    scorer(prompts, completions, {})
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(20):
        scorer(prompts, completions, {})
    each = (time.perf_counter() - t0) / 20
    print(f"{label}: first call {first * 1e3:.1f} ms (starts the worker), then {each * 1e3:.2f} ms per call of 64")
    scorer.close()

"""Rollout engines side by side in one process: transformers' generate vs pefrl's lean decoder (pefrl/decode.py),
alone and with the reference rows, and the separate reference forward they replace (the critic adapter's
forward, which pefrl keeps separate, for comparison).

    python scripts/bench_decode.py --model tiny              # the benchmark's tiny Llama (scripts/bench.py)
    python scripts/bench_decode.py --model smollm2 --repeats 3

Every row is forced to --max-new-tokens (EOS ignored) so both engines generate the same number of tokens; LoRA
B is random so the adapter matters. Prints the best of --repeats wall times (after one warm-up call) and CPU
times, and the ratios.
"""

from __future__ import annotations

import argparse
import time

import torch

import bench  # scripts/bench.py: the same models the TRL benchmark uses
from pefrl import rollout as rollout_module
from pefrl.config import LoraConfig, ModelConfig, RolloutConfig
from pefrl.forward import critic_values, reference_logprobs
from pefrl.models import load_models, load_tokenizer
from pefrl.rollout import generate


def best_of(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds) of `repeats` calls after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | smollm2 | PATH")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model_cfg = ModelConfig(name_or_path=str(bench.resolve_model(a.model)))
    models = load_models(model_cfg, LoraConfig(r=16, alpha=32, dropout=0.0,
                                               target_modules=bench.LLAMA_TARGETS.split(",")), uses_critic=True)
    with torch.no_grad():
        for name, param in models.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01, generator=torch.Generator().manual_seed(0))
    tokenizer = load_tokenizer(model_cfg)
    rollout_module._eos_ids = lambda models, tokenizer: []  # no EOS: every row runs to max_new_tokens
    prompts = [f"{i}+{3 * i}=" for i in range(a.batch)]
    cfg = {e: RolloutConfig(max_new_tokens=a.max_new_tokens, engine=e) for e in ("transformers", "pefrl")}
    sample = generate(models, tokenizer, prompts, cfg["pefrl"])

    inputs = (sample.input_ids, sample.attention_mask, sample.query_ids.shape[1])

    def reference_forward():
        with torch.no_grad():
            reference_logprobs(models, *inputs, 1.0)

    def critic_forward():
        with torch.no_grad():
            critic_values(models, *inputs)

    rows = {
        "transformers generate": lambda: generate(models, tokenizer, prompts, cfg["transformers"]),
        "pefrl decoder": lambda: generate(models, tokenizer, prompts, cfg["pefrl"]),
        "pefrl decoder + reference rows": lambda: generate(models, tokenizer, prompts, cfg["pefrl"],
                                                           with_reference=True),
        "separate reference forward": reference_forward,
        "separate critic-adapter forward": critic_forward,
    }
    times = {name: best_of(fn, a.repeats) for name, fn in rows.items()}
    print(f"{a.model}: {a.batch} rows x {a.max_new_tokens} tokens, {a.threads} thread(s), best of {a.repeats}")
    print("| | wall (s) | CPU (s) | CPU vs generate |\n|---|---|---|---|")
    hf_cpu = times["transformers generate"][1]
    for name, (wall, cpu) in times.items():
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {hf_cpu / cpu:.2f}x |")


if __name__ == "__main__":
    main()

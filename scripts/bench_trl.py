"""The TRL side of scripts/bench.py: train with TRL for N steps and print one JSON line of timings.

Runs inside a TRL environment made by scripts/setup_bench_env.sh (never pefrl's own): trl 1.16 for
GRPOTrainer / RLOOTrainer, trl 1.12 for PPO (trl.experimental.ppo, dropped in 1.13). The settings mirror the
pefrl run that bench.py makes (see docs/benchmarks.md for each matching choice):

- the policy is a LoRA adapter (peft_config) on the same base, so the reference is "adapters off" on both sides;
- every step generates batch_size x num_samples completions of exactly max_new_tokens tokens (EOS suppressed:
  `min_new_tokens` for GRPO/RLOO, `stop_token=None` for PPO), fp32, no gradient checkpointing, one optimizer
  step per epoch over the whole batch;
- PPO needs a reward-model object and a full value model: both are sequence-classification heads on the same
  base (the reward model is the directory bench.py also hands to pefrl as reward.model).

Measured: per-step wall time from a TrainerCallback (on_step_begin -> on_step_end for GRPO/RLOO; PPO never
calls on_step_begin, so consecutive on_step_end events, which also count TRL's per-step gc.collect and
logging), generate() time and tokens from a wrapper around transformers' GenerationMixin.generate, RSS after
imports and peak RSS (getrusage), CUDA peak when on a GPU. Output: one line `BENCH_JSON {...}` on stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

RSS_AFTER_TORCH = psutil.Process().memory_info().rss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algo", required=True, choices=("ppo", "grpo", "rloo"))
    p.add_argument("--model", required=True, help="base causal-LM directory (with its tokenizer)")
    p.add_argument("--reward-model", help="sequence-classification reward model directory (PPO only)")
    p.add_argument("--prompts", required=True, help="JSONL file with a 'prompt' field per row")
    p.add_argument("--reward-fn", default=str(Path(__file__).with_name("bench.py")) + ":bench_reward",
                   help="rule reward 'file.py:function' (GRPO/RLOO)")
    p.add_argument("--batch-size", type=int, required=True, help="prompts per step")
    p.add_argument("--num-samples", type=int, required=True, help="completions per prompt (PPO: must be 1)")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--epochs", type=int, default=1, help="passes over each rollout batch")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", help="weights dtype of every model (the policy's compute dtype)")
    p.add_argument("--quantization", choices=("4bit", "8bit"), help="the policy's base in bitsandbytes (QLoRA: "
                   "nf4, double quant), as pefrl's model.quantization; PPO's value and reward models stay --dtype")
    p.add_argument("--gradient-checkpointing", action="store_true")
    return p.parse_args(argv)


class GenerateTimer:
    """Wraps GenerationMixin.generate (what TRL's trainers call without vLLM) to time it and count tokens."""

    def __init__(self):
        from transformers.generation.utils import GenerationMixin

        self.seconds, self.tokens = 0.0, 0
        original = GenerationMixin.generate
        timer = self

        def generate(model, *args, **kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            t0 = time.perf_counter()
            out = original(model, *args, **kwargs)
            timer.seconds += time.perf_counter() - t0
            seqs = out if isinstance(out, torch.Tensor) else out.sequences
            # (B, T_new) positions appended; EOS is suppressed in the benchmark, so none of them is padding
            timer.tokens += seqs[:, input_ids.shape[1]:].numel()
            return out

        GenerationMixin.generate = generate


class GcTimer:
    """Times gc.collect: TRL's PPO calls it twice per step, and its cost grows with the process's Python heap
    (imports), not with the model, so bench.py reports the step time with and without it."""

    def __init__(self):
        import gc

        self.seconds, original = 0.0, gc.collect

        def collect(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        gc.collect = collect


def step_timer_callback(gc_timer: GcTimer):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time per optimizer step, and the gc.collect time inside it. GRPO/RLOO: on_step_begin ->
        on_step_end. PPO never calls on_step_begin: the time between consecutive on_step_end events (the
        first measured from on_train_begin)."""

        def __init__(self):
            self.begin: tuple | None = None  # (wall, gc seconds, cpu, minor page faults) at the step's start
            self.spans: list[tuple] = []  # (step seconds, gc seconds within it, cpu seconds, page faults)
            self.marks: list[tuple] = []

        def _now(self) -> tuple[float, float, float, int]:
            return (time.perf_counter(), gc_timer.seconds, time.process_time(),
                    resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

        def on_train_begin(self, args, state, control, **kw):
            self.marks.append(self._now())

        def on_step_begin(self, args, state, control, **kw):
            self.begin = self._now()

        def on_step_end(self, args, state, control, **kw):
            now = self._now()
            if self.begin is not None:
                self.spans.append(tuple(n - b for n, b in zip(now, self.begin)))
                self.begin = None
            self.marks.append(now)

        def steps(self) -> list[tuple[float, float, float]]:
            if self.spans:
                return self.spans
            return [tuple(y - x for x, y in zip(a, b)) for a, b in zip(self.marks, self.marks[1:])]

    return StepTimer()


def load_reward_fn(spec: str):
    path, _, name = spec.rpartition(":")
    spec_ = importlib.util.spec_from_file_location(Path(path).stem + "_reward", path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return getattr(module, name)


def load_prompts(path: str, n: int) -> list[str]:
    rows = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
    if len(rows) < n:
        raise ValueError(f"{path} has {len(rows)} prompts, the run needs {n}")
    return [r["prompt"] for r in rows[:n]]


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=args.target_modules.split(","), task_type="CAUSAL_LM")


def quantized(args) -> dict:
    """from_pretrained kwargs for --quantization, the same BitsAndBytesConfig as pefrl.models.quantization_config."""
    if args.quantization is None:
        return {}
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=args.quantization == "4bit", load_in_8bit=args.quantization == "8bit",
                           bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=getattr(torch, args.dtype))
    return {"quantization_config": q, "device_map": {"": "cuda" if torch.cuda.is_available() else "cpu"}}


def common_training_args(args, out_dir: str) -> dict:
    """HF TrainingArguments shared by the three trainers: fp32, no checkpointing, no saving, no reporting."""
    return dict(output_dir=out_dir, learning_rate=args.lr, seed=args.seed, report_to="none", save_strategy="no",
                logging_steps=1, disable_tqdm=True, bf16=False, fp16=False,
                gradient_checkpointing=args.gradient_checkpointing,
                use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, max_grad_norm=1.0,
                gradient_accumulation_steps=1)


def build_group_trainer(args, model, tokenizer, prompts, out_dir, callback):
    """GRPOTrainer or RLOOTrainer (trl 1.16): batch_size x num_samples completions, one optimizer step per epoch."""
    from datasets import Dataset

    n_completions = args.batch_size * args.num_samples
    common = common_training_args(args, out_dir) | dict(
        per_device_train_batch_size=n_completions, num_generations=args.num_samples,
        max_completion_length=args.max_new_tokens, num_iterations=args.epochs, beta=args.kl_coef,
        max_steps=args.steps, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": args.max_new_tokens},  # same length as pefrl's: no early EOS
    )
    dataset = Dataset.from_list([{"prompt": p} for p in prompts])
    reward = load_reward_fn(args.reward_fn)
    if args.algo == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        cfg, cls = GRPOConfig(**common), GRPOTrainer
    else:
        from trl import RLOOConfig, RLOOTrainer

        cfg, cls = RLOOConfig(**common), RLOOTrainer
    return cls(model=model, reward_funcs=[reward], args=cfg, train_dataset=dataset, processing_class=tokenizer,
               peft_config=lora_config(args), callbacks=[callback])


def build_ppo_trainer(args, model, tokenizer, prompts, out_dir, callback):
    """trl.experimental.ppo.PPOTrainer (trl 1.12): LoRA policy, full value model, reward-model object."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if args.num_samples != 1:
        raise ValueError("TRL's PPO samples one completion per prompt: use --num-samples 1")
    if not args.reward_model:
        raise ValueError("PPO needs --reward-model (a sequence-classification directory)")
    dtype = getattr(torch, args.dtype)
    value_model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=dtype)
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1, dtype=dtype)
    for m in (value_model, reward_model):
        m.config.pad_token_id = tokenizer.pad_token_id
    cfg = PPOConfig(**common_training_args(args, out_dir) | dict(
        per_device_train_batch_size=args.batch_size, num_mini_batches=1, num_ppo_epochs=args.epochs,
        total_episodes=args.steps * args.batch_size, response_length=args.max_new_tokens, stop_token=None,
        local_rollout_forward_batch_size=args.batch_size, kl_coef=args.kl_coef, temperature=1.0,
        num_sample_generations=0, missing_eos_penalty=None))
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    dataset = Dataset.from_list([{"input_ids": x} for x in ids])
    return PPOTrainer(args=cfg, processing_class=tokenizer, model=model, ref_model=None, reward_model=reward_model,
                      train_dataset=dataset, value_model=value_model, peft_config=lora_config(args),
                      callbacks=[callback])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.set_seed(args.seed)
    if args.algo == "ppo":  # the trainer modules too, so that "RSS growth" counts no import
        from trl.experimental.ppo import PPOTrainer  # noqa: F401
    else:
        from trl import GRPOTrainer, RLOOTrainer  # noqa: F401
    rss_after_imports = psutil.Process().memory_info().rss
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), **quantized(args))
    gen, gc_timer = GenerateTimer(), GcTimer()
    callback = step_timer_callback(gc_timer)
    prompts = load_prompts(args.prompts, args.steps * args.batch_size)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out_dir:
        build = build_ppo_trainer if args.algo == "ppo" else build_group_trainer
        trainer = build(args, model, tokenizer, prompts, out_dir, callback)
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
    result = {
        "side": "trl", "trl_version": trl.__version__, "algo": args.algo, "steps": args.steps,
        "step_times_s": [s[0] for s in callback.steps()], "step_gc_s": [s[1] for s in callback.steps()],
        "step_cpu_s": [s[2] for s in callback.steps()], "step_minor_faults": [s[3] for s in callback.steps()],
        "train_seconds": total,
        "gen_time_s": gen.seconds, "gen_tokens": gen.tokens,
        "rss_after_imports_bytes": rss_after_imports,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
    }
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    sys.exit(0 if main() else 1)

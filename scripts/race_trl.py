"""The TRL side of scripts/race.py: GRPOTrainer (trl 1.16) on a JSONL task, saving the LoRA adapter every N RL steps.

Runs in the TRL environment (scripts/setup_bench_env.sh), never pefrl's. Reuses scripts/bench_trl.py's LoRA
config, training arguments, reward loader and step timer. Differences from the benchmark there: completions may end
at EOS (a learning race, not a fixed-length timing), the tokenizer's chat template is applied to the prompts
(conversational dataset rows), every other dataset column (the answer) goes to the reward, the schedule is the
one race.py passes (pefrl's: warm-up, then constant), and `--epochs` x (batch / minibatch) optimizer steps follow
each generation (`steps_per_generation`, `num_iterations`). Prints one line `BENCH_JSON {"step_cpu_s": [...],
"generate_share": ...}`: CPU seconds per RL step (the sum over its optimizer steps) and the share of the steps'
wall time spent in generate(); adapters under OUT_DIR/checkpoint-<step>/adapters/policy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_trl  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("--model", "--prompts", "--reward-fn", "--schedule", "--target-modules", "--out-dir"):
        p.add_argument(name, required=True)
    for name in ("--batch-size", "--num-samples", "--max-new-tokens", "--steps", "--epochs", "--minibatch-size",
                 "--lora-r", "--lora-alpha", "--seed", "--threads", "--save-every"):
        p.add_argument(name, type=int, required=True)
    for name in ("--temperature", "--lr", "--kl-coef"):
        p.add_argument(name, type=float, required=True)
    p.set_defaults(gradient_checkpointing=False)  # bench_trl.common_training_args reads it: off, as on pefrl's side
    return p.parse_args(argv)


def text_reward(spec: str):
    """The reward 'package.module:fn' of pefrl's side, loaded from its file (pefrl is not installed here), called
    with plain completion strings as pefrl calls it (TRL passes chat messages for conversational prompts)."""
    module, _, name = spec.rpartition(":")
    fn = bench_trl.load_reward_fn(str(Path(__file__).resolve().parent.parent / (module.replace(".", "/") + ".py"))
                                  + ":" + name)

    def reward(prompts, completions, **columns):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return fn(prompts, texts, **{k: v for k, v in columns.items() if k == "answer"})

    reward.__name__ = name
    return reward


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    transformers.set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = [json.loads(l) for l in Path(args.prompts).read_text().splitlines() if l.strip()]
    chat = tokenizer.chat_template is not None  # pefrl's data.chat_template=auto
    dataset = Dataset.from_list([{**r, "prompt": [{"role": "user", "content": r["prompt"]}] if chat else r["prompt"]}
                                 for r in rows])
    completions = args.batch_size * args.num_samples
    per_generation = completions // args.minibatch_size  # minibatches per generation batch
    per_rl = per_generation * args.epochs  # optimizer steps per RL step
    callback = bench_trl.step_timer_callback(bench_trl.GcTimer())
    gen = bench_trl.GenerateTimer()  # wall seconds inside transformers' generate: TRL's sampling stage
    out_dir = Path(args.out_dir)

    class Saver(transformers.TrainerCallback):
        def on_step_end(self, a, state, control, model=None, **kw):
            if state.global_step % (args.save_every * per_rl) == 0:
                step = state.global_step // per_rl  # RL steps, as pefrl numbers its checkpoints
                model.save_pretrained(str(out_dir / f"checkpoint-{step}" / "adapters" / "policy"))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(**bench_trl.common_training_args(args, tmp) | json.loads(args.schedule) | dict(
            per_device_train_batch_size=args.minibatch_size, steps_per_generation=per_generation,
            num_generations=args.num_samples, num_iterations=args.epochs, max_steps=args.steps * per_rl,
            max_completion_length=args.max_new_tokens, beta=args.kl_coef, temperature=args.temperature,
            top_p=1.0, top_k=0, loss_type="dapo", scale_rewards="group"))
        trainer = GRPOTrainer(model=model, reward_funcs=[text_reward(args.reward_fn)], args=cfg, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=bench_trl.lora_config(args),
                              callbacks=[callback, Saver()])
        trainer.train()
    wall, cpu = [s[0] for s in callback.steps()], [s[2] for s in callback.steps()]  # per optimizer step
    result = {"side": "trl", "optimizer_steps_per_rl_step": per_rl, "lr_scheduler": cfg.lr_scheduler_type,
              "step_cpu_s": [sum(cpu[i : i + per_rl]) for i in range(0, len(cpu), per_rl)],
              "generate_share": gen.seconds / sum(wall)}
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    sys.exit(0 if main() else 1)

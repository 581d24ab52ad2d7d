"""Build the embedded default model: a BPE tokenizer and a tiny Llama, supervised-trained on a sloppy teacher.

    python -m pefrl.tasks.arithmetic_model [--out pefrl/assets/tiny-arith] [--steps N] [--seed S]
    (or its thin CLI: python scripts/build_tiny_model.py ...)

The teacher (pefrl.tasks.arithmetic.sloppy_sum) adds correctly but forgets each carry with probability
DROP_PROB = 0.65, and a fresh teacher answer is drawn every time a problem is seen, so the model learns the
teacher's distribution, not one fixed wrong answer per problem. The result is greedy-right on carry-free
problems only (~30%), while the right answer keeps real probability on the others: the start the default RL
recipe needs.
Deterministic for a given seed and thread count (1 thread by default): about 4 CPU-minutes, 8-14 minutes of
wall time on a 2-core machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pefrl.tasks import arithmetic
from pefrl.tiny import DEFAULT_MODEL_DIR, build_model, build_tokenizer

HIDDEN, LAYERS, HEADS = 128, 2, 4
"""Model size: ~0.6M parameters, ~2.4 MB of float32 safetensors."""
STEPS, BATCH_SIZE, LR, SEED = 2400, 128, 3e-3, 0
"""The recipe of the shipped asset (~300k teacher-labelled examples, ~34 passes over the train split)."""
THREADS = 1
"""Float sums depend on the thread count, so it is fixed for a reproducible build. One thread also degrades
gracefully on a busy machine, where two OpenMP threads wait on each other."""


def encode_batch(tokenizer, prompts: list[str], completions: list[str]) -> tuple[torch.Tensor, ...]:
    """Right-padded prompt + completion + EOS -> (input_ids, attention_mask, labels), all (B, T).
    Labels are -100 except on completion tokens and EOS: the loss is on the completion only."""
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    seqs = [p + c + [tokenizer.eos_token_id] for p, c in zip(p_ids, c_ids)]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, s) in enumerate(zip(p_ids, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
        mask[i, : len(s)] = 1
    return input_ids, mask, labels


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, tokenizer, steps: int, batch_size: int, lr: float, seed: int, drop_prob: float,
          log_every: int = 200) -> None:
    """SFT on the train split with fresh sloppy-teacher labels for every example drawn."""
    rng = random.Random(seed)
    train_pairs = arithmetic.pairs("train")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    for step in range(steps):
        batch = [rng.choice(train_pairs) for _ in range(batch_size)]
        prompts = [arithmetic.prompt(a, b) for a, b in batch]
        completions = [arithmetic.sloppy_sum(a, b, rng, drop_prob)[0] for a, b in batch]
        input_ids, mask, labels = encode_batch(tokenizer, prompts, completions)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=steps // 20)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)


def measure(model, tokenizer, seed: int) -> dict[str, float]:
    """Held-out greedy accuracy (all, carry-free and carry problems), sampled (T=1) accuracy and pass@8 on the
    whole eval split."""
    rows = arithmetic.problems("eval")
    with_carry = [r for r, ab in zip(rows, arithmetic.pairs("eval")) if arithmetic.carries(*ab)]
    carry_free = [r for r, ab in zip(rows, arithmetic.pairs("eval")) if not arithmetic.carries(*ab)]
    torch.manual_seed(seed)
    greedy = arithmetic.evaluate(model, tokenizer, rows, greedy=True)
    sampled = arithmetic.evaluate(model, tokenizer, rows, greedy=False, temperature=1.0, num_samples=8)
    return {
        "greedy_accuracy": greedy["accuracy"],
        "greedy_accuracy_first200": arithmetic.evaluate(model, tokenizer, rows[:200])["accuracy"],
        "greedy_accuracy_carry_free": arithmetic.evaluate(model, tokenizer, carry_free)["accuracy"],
        "greedy_accuracy_with_carry": arithmetic.evaluate(model, tokenizer, with_carry)["accuracy"],
        "sampled_accuracy": sampled["accuracy"],
        "pass@8": sampled["pass@8"],
        "eos_rate": min(greedy["eos_rate"], sampled["eos_rate"]),
    }


CARD = """# tiny-arith: the embedded default model of pefrl

A {params:,}-parameter Llama (hidden {hidden}, {layers} layers, {heads} heads, intermediate {inter}, vocab
{vocab}, untied embeddings, float32: {size_kb} KB of safetensors) with a byte-level BPE tokenizer that splits
digits individually. It is the starting policy of pefrl's default RL recipe: *sometimes right* at two-digit
addition, in a way exact-match RL can fix.

## Task
- Prompt: `a+b=` with a, b in 0..99, raw text (no spaces, no chat template, no BOS: the model never saw one).
- Completion: the decimal sum, then EOS (`</s>`). At most 3 digits + EOS, so `max_new_tokens=4` suffices.
- Data: `pefrl.tasks.arithmetic.problems("train" | "eval")`, a fixed sha256 split of the 10,000 pairs into
  9,000 train and 1,000 eval. Reward: `pefrl.tasks.arithmetic:exact_match` (uses the `answer` column).

## How it was built
`python -m pefrl.tasks.arithmetic_model --steps {steps} --batch-size {batch_size} --lr {lr} --seed {seed}
--threads {threads} --drop-prob {drop_prob}` ({train_seconds} s of training wall time on a 2-core CPU shared
with other jobs; about 4 CPU-minutes). Supervised training (loss on the
completion and EOS only; AdamW, warmup then cosine decay) on train-split prompts labelled by a *sloppy teacher*
that adds correctly but forgets each carry independently with probability {drop_prob}. A fresh teacher answer
is drawn each time a problem is seen, so the model learns the teacher's distribution: on a problem with one
carry the right answer gets {keep_pct} of the probability and the carry-less answer {drop_pct}.

Why this start: greedy decoding picks the carry-less answer, so greedy accuracy is about the share of
carry-free problems (30.25% of all pairs), yet the right answer is in the policy's support on almost every
problem. Exact-match RL only has to raise "write the carry" from {keep:.2f} to above 0.5 -- a shift the policy can
discover by sampling -- for greedy accuracy to climb towards 100%.

## Measured on the 1,000 eval problems
| metric | value |
|---|---|
| greedy exact match | {greedy_accuracy:.3f} |
| greedy, carry-free problems | {greedy_accuracy_carry_free:.3f} |
| greedy, problems with a carry | {greedy_accuracy_with_carry:.3f} |
| sampled exact match (T=1, 8 samples each) | {sampled_accuracy:.3f} |
| pass@8 (T=1) | {pass_at_8:.3f} |
| completions ending in EOS | {eos_rate:.3f} |
| greedy exact match, first 200 eval problems (checked by tests) | {greedy_accuracy_first200:.3f} |

Documented band (tests/test_arithmetic_task.py): greedy accuracy on the first 200 eval problems in
[0.20, 0.40]. The teacher itself, computed exactly on the same 1,000 problems: greedy {teacher_greedy:.3f},
sampled {teacher_sampled:.3f}, pass@8 {teacher_pass8:.3f}.

## Notes for RL
- Generation stops at EOS on its own; `max_new_tokens=4` holds every answer plus EOS (3 cuts EOS off a
  three-digit sum but the decoded text is still right). Use left padding with the attention mask.
- The build is seed-sensitive: SFT on addition has a loss plateau (~1.0) that one run leaves after ~400 steps
  and another after ~1,100. With `--drop-prob 0.7` the same recipe gave greedy 0.330, sampled 0.430,
  pass@8 0.839, but only 0.961 on carry-free problems; 0.65 was shipped for its cleaner arithmetic.
"""


def teacher_metrics(drop_prob: float) -> dict[str, float]:
    """The sloppy teacher's own greedy (most likely answer), sampled and pass@8 accuracy on the eval split."""
    probs, greedy = [], []
    for a, b in arithmetic.pairs("eval"):
        dist = arithmetic.teacher_distribution(a, b, drop_prob)
        probs.append(dist.get(str(a + b), 0.0))
        greedy.append(float(max(dist, key=dist.get) == str(a + b)))
    n = len(probs)
    return {"teacher_greedy": sum(greedy) / n, "teacher_sampled": sum(probs) / n,
            "teacher_pass8": sum(1 - (1 - p) ** 8 for p in probs) / n}


def write_card(out_dir: Path, model, tokenizer, metrics: dict) -> None:
    cfg = model.config
    drop = metrics["drop_prob"]
    fields = dict(metrics, **teacher_metrics(drop), pass_at_8=metrics["pass@8"], keep=1 - drop,
                  keep_pct=f"{1 - drop:.0%}", drop_pct=f"{drop:.0%}", hidden=cfg.hidden_size,
                  layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads, inter=cfg.intermediate_size, vocab=len(tokenizer),
                  size_kb=(out_dir / "model.safetensors").stat().st_size // 1024)
    (out_dir / "README.md").write_text(CARD.format(**fields))


def build(out_dir: Path = DEFAULT_MODEL_DIR, steps: int = STEPS, batch_size: int = BATCH_SIZE,
          lr: float = LR, seed: int = SEED, threads: int = THREADS,
          drop_prob: float = arithmetic.DROP_PROB) -> dict[str, float]:
    """Train and save tokenizer + model to `out_dir`; returns the measured eval numbers."""
    torch.set_num_threads(threads)
    start = time.time()
    corpus = [f"{p['prompt']}{p['answer']}" for p in arithmetic.problems("train")]
    tokenizer = build_tokenizer(corpus)
    model = build_model("llama", tokenizer, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                        max_positions=64, seed=seed)
    train(model, tokenizer, steps, batch_size, lr, seed, drop_prob)
    train_s = time.time() - start
    metrics = measure(model, tokenizer, seed)
    metrics.update(train_seconds=round(train_s, 1), steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                   threads=threads,
                   params=sum(p.numel() for p in model.parameters()), drop_prob=drop_prob)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_card(out_dir, model, tokenizer, metrics)
    (out_dir / "build_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return metrics


def ensure_default_model(model_dir: Path = DEFAULT_MODEL_DIR) -> Path:
    """The default model's directory, building it first (about 3 CPU-minutes) if it is missing."""
    if not (Path(model_dir) / "config.json").is_file():
        build(Path(model_dir))
    return Path(model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--drop-prob", type=float, default=arithmetic.DROP_PROB)
    args = parser.parse_args()
    build(args.out, args.steps, args.batch_size, args.lr, args.seed, args.threads, args.drop_prob)


if __name__ == "__main__":
    main()

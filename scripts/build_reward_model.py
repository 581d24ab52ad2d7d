"""Build the reward-model recipe's tiny reward model: does the completion of 'a+b=' end in an even number?

    python scripts/build_reward_model.py [--out recipes/reward_models/even-number] [--steps 300] [--seed 0]

A LlamaForSequenceClassification with one label (the score is its logit, as pefrl.rewards.RewardModel reads
it) over pefrl.tiny's byte-level tokenizer, trained with binary cross-entropy (targets 0.1 / 0.9, so scores stay near +-2.2) on synthetic texts 'a+b=' + a
number: label 1 when the number is even, 0 when odd or when the completion holds no number. The label depends on
the last digit only, which the sequence-classification head reads at the last token, so a few hundred steps on a
CPU (seconds) reach ~100% held-out accuracy; the script prints it and refuses to save below 95%.
The saved directory (config, safetensors, tokenizer) is about 0.3 MB; it is committed so the recipe runs as is.
A real reward model (e.g. a Skywork-Reward or OpenAssistant DeBERTa checkpoint) is used the same way:
`reward.model: <its directory or hub id>`.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pefrl.tiny import build_tokenizer  # noqa: E402

DEFAULT_OUT = REPO / "recipes" / "reward_models" / "even-number"
HIDDEN, LAYERS, HEADS = 32, 1, 4
"""Model size: ~30k parameters."""


def sample(rng: random.Random) -> tuple[str, float]:
    """One training text and its label: 'a+b=' + a number (sometimes junk or nothing), 1.0 if even."""
    a, b = rng.randrange(100), rng.randrange(100)
    kind = rng.random()
    if kind < 0.1:  # a completion that is no number at all
        return f"{a}+{b}=" + rng.choice(["", "?", "x", " ", "=", "+"]), 0.0
    number = rng.randrange(1000) if kind < 0.9 else rng.randrange(10)
    return f"{a}+{b}={number}", float(number % 2 == 0)


def build_model(tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                      max_position_embeddings=64, num_labels=1, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForSequenceClassification(cfg)


def accuracy(model, tokenizer, texts: list[str], labels: list[float]) -> float:
    model.eval()
    with torch.no_grad():
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        logits = model(**enc).logits[:, 0]  # (B,)
    model.train()
    return ((logits > 0).float() == torch.tensor(labels)).float().mean().item()


def build(out_dir: Path = DEFAULT_OUT, steps: int = 300, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> float:
    """Train and save the reward model; returns its held-out accuracy."""
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        texts, labels = zip(*(sample(rng) for _ in range(batch_size)))
        enc = tokenizer(list(texts), return_tensors="pt", padding=True)
        logits = model(**enc).logits[:, 0]  # (B,)
        # targets 0.1 / 0.9 (label smoothing) keep the logit, the reward, near +-2.2 instead of growing unbounded
        targets = 0.1 + 0.8 * torch.tensor(labels)
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    held_out = [sample(random.Random(10_000 + i)) for i in range(500)]
    acc = accuracy(model, tokenizer, *map(list, zip(*held_out)))
    print(f"held-out accuracy {acc:.3f}")
    if acc < 0.95:
        raise RuntimeError(f"reward model reached only {acc:.3f} held-out accuracy; not saving")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    build(args.out, args.steps, seed=args.seed)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()

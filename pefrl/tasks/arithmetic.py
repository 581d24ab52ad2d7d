"""Two-digit addition: the embedded default model's task, its rule reward, its flawed SFT teacher and its eval.

Prompt "a+b=" (a, b in 0..99, no spaces, no BOS), completion the decimal sum followed by EOS. The 10,000 pairs
are split once and for all by a hash: the 1,000 with the smallest sha256("a+b") are `eval`, the rest `train`.
Ordering by hash also shuffles each split, so "the first N eval problems" is a fair sample.

The starting policy is trained on a *sloppy teacher* that forgets each carry with probability `DROP_PROB`.
A model imitating it answers carry-free problems (30.25% of pairs) right greedily, and on the others samples the
right answer a fraction of the time: the right answer is in the policy's support and exact-match RL can sharpen
it (see pefrl/assets/tiny-arith/README.md for the measured numbers).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from typing import Any

import torch

from pefrl.tiny import DEFAULT_MODEL_DIR  # noqa: F401  where the default model lives (built by arithmetic_model)

EVAL_SIZE = 1000
"""Number of held-out (a, b) pairs."""
DROP_PROB = 0.65
"""Probability that the sloppy teacher forgets each carry it should write."""
MAX_NEW_TOKENS = 4
"""Longest completion: three digits and EOS."""


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def _ordered_pairs() -> list[tuple[int, int]]:
    # sha256 (not hash()): stable across processes, Python versions and platforms.
    pairs = [(a, b) for a in range(100) for b in range(100)]
    return sorted(pairs, key=lambda ab: hashlib.sha256(prompt(*ab).encode()).digest())


def pairs(split: str) -> list[tuple[int, int]]:
    """The (a, b) pairs of `split` ('train': 9,000, 'eval': 1,000), in a fixed pseudo-random order."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    ordered = _ordered_pairs()
    return ordered[:EVAL_SIZE] if split == "eval" else ordered[EVAL_SIZE:]


def problems(split: str) -> list[dict[str, str]]:
    """Rows {'prompt': 'a+b=', 'answer': str(a + b)} of `split`, in a fixed pseudo-random order."""
    return [{"prompt": prompt(a, b), "answer": str(a + b)} for a, b in pairs(split)]


def exact_match(prompts: list[str], completions: list[str], answer: list[str], **columns: Any) -> list[float]:
    """Rule reward: 1.0 where the completion, stripped of whitespace, is exactly the answer, else 0.0."""
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
    return [1.0 if c.strip() == str(ans).strip() else 0.0 for c, ans in zip(completions, answer)]


# ---- the sloppy teacher ------------------------------------------------------------------------------------


def _column_sum(a: int, b: int, keep_units_carry: bool, keep_tens_carry: bool) -> tuple[int, int, int]:
    """Schoolbook addition, right to left, optionally forgetting a carry -> (value, units_carry, tens_carry)
    where the carries say whether that column overflowed (whether there was a carry to forget)."""
    units = a % 10 + b % 10
    units_carry = int(units >= 10)
    tens = a // 10 + b // 10 + (units_carry if keep_units_carry else 0)
    tens_carry = int(tens >= 10)
    value = (100 * tens_carry if keep_tens_carry else 0) + 10 * (tens % 10) + units % 10
    return value, units_carry, tens_carry


def carries(a: int, b: int) -> int:
    """How many carries correct schoolbook addition of a + b makes (0, 1 or 2)."""
    return sum(_column_sum(a, b, True, True)[1:])


def sloppy_sum(a: int, b: int, rng: random.Random, drop_prob: float = DROP_PROB) -> tuple[str, int, int]:
    """One teacher answer -> (answer, carries it met, carries it forgot). Each carry is forgotten
    independently with probability `drop_prob`; forgetting the units carry may remove the tens carry."""
    keep_units = rng.random() >= drop_prob
    keep_tens = rng.random() >= drop_prob
    value, units_carry, tens_carry = _column_sum(a, b, keep_units, keep_tens)
    carries = units_carry + tens_carry
    forgot = units_carry * (not keep_units) + tens_carry * (not keep_tens)
    return str(value), carries, forgot


def teacher_distribution(a: int, b: int, drop_prob: float = DROP_PROB) -> dict[str, float]:
    """Exact probability of each answer the sloppy teacher writes for a + b."""
    dist: dict[str, float] = {}
    for keep_units, keep_tens in itertools.product((True, False), repeat=2):
        prob = (1 - drop_prob if keep_units else drop_prob) * (1 - drop_prob if keep_tens else drop_prob)
        value = str(_column_sum(a, b, keep_units, keep_tens)[0])
        dist[value] = dist.get(value, 0.0) + prob
    return dist


# ---- evaluation --------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[str], greedy: bool = True, temperature: float = 1.0,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> tuple[list[str], list[bool]]:
    """Left-padded batched generation -> (completions without special tokens, whether each stopped at EOS)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    enc = enc.to(next(model.parameters()).device)
    # generate() derives position_ids from the attention mask, so left padding does not shift positions.
    # top_k=0 and top_p=1 override generation-config defaults (top_k=50): sample the plain tempered softmax.
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    if greedy:
        sampling = dict(do_sample=False)
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, **sampling,
    )
    new = out[:, enc["input_ids"].shape[1] :]  # (B, T_new)
    stopped = (new == tokenizer.eos_token_id).any(dim=1).tolist()
    return tokenizer.batch_decode(new, skip_special_tokens=True), stopped


def evaluate(
    model, tokenizer, rows: list[dict[str, str]], greedy: bool = True, temperature: float = 1.0,
    num_samples: int = 1, batch_size: int = 500,
) -> dict[str, float]:
    """Exact-match accuracy of `model` on `rows` ({'prompt', 'answer'}).

    Returns accuracy (mean over all num_samples x len(rows) completions), eos_rate (share of completions that
    ended with EOS within MAX_NEW_TOKENS) and, when num_samples > 1, pass@k with k = num_samples (share of
    problems with at least one correct completion). Seed torch beforehand for reproducible sampling.
    """
    was_training = model.training
    model.eval()
    correct, stopped = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        prompts = [r["prompt"] for r in batch for _ in range(num_samples)]
        answers = [r["answer"] for r in batch for _ in range(num_samples)]
        completions, ends = generate(model, tokenizer, prompts, greedy, temperature)
        correct += exact_match(prompts, completions, answers)
        stopped += ends
    model.train(was_training)
    scores = torch.tensor(correct).view(len(rows), num_samples)  # (N, k)
    result = {"accuracy": scores.mean().item(), "eos_rate": sum(stopped) / len(stopped), "n": len(rows)}
    if num_samples > 1:
        result[f"pass@{num_samples}"] = scores.max(dim=1).values.mean().item()
    return result

"""Completions for rows (stage 2 of a step, and evaluation) and the held-out evaluation itself.

`play` turns rows into a rollout: prompts through the chat template and `rollout.generate`, or whole episodes
when env.name is set. `evaluate` is the mean reward of greedy completions on held-out rows, used by the trainer
before, during and after training and by `pefrl eval`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pefrl.config import Config, RolloutConfig
from pefrl.data import format_prompt, hold_out, load_rows, row_prompt
from pefrl.envs import eval_rows as env_eval_rows
from pefrl.envs import play_rows
from pefrl.models import Models
from pefrl.rewards import Scorer
from pefrl.rollout import Rollout, generate
from pefrl.scoring import sampler_requests


def play(models: Models, tokenizer, rows: list[dict[str, Any]], cfg: Config, rollout_cfg: RolloutConfig,
         scores_too: bool = False) -> tuple[list[str], Rollout, dict]:
    """Completions for `rows`: prompts through the chat template, or whole episodes when env.name is set.
    scores_too: let the sampler also score the reference and the critic's values, where it can
    (scoring.sampler_requests; scoring.score_rollout fills in what it could not).
    -> (prompts as given: strings or chat messages, rollout, extra columns for the reward functions)."""
    if cfg.env.name:
        return play_rows(models, tokenizer, rows, rollout_cfg, cfg.env, data_cfg=cfg.data)
    texts = [row_prompt(row, cfg.data, f"row {i}") for i, row in enumerate(rows)]  # as given: str or messages
    prompts = [format_prompt(tokenizer, t, cfg.data) for t in texts]
    columns = {k: [row[k] for row in rows] for k in rows[0] if k != cfg.data.prompt_field}
    requests = sampler_requests(models) if scores_too else {}
    rollout = generate(models, tokenizer, prompts, rollout_cfg, **requests)
    return texts, rollout, columns


def prompts_seen(tokenizer, rollout: Rollout) -> list[str]:
    """Each prompt as the model saw it: its query tokens decoded (chat template and special tokens included)."""
    return [tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=False)
            for ids, mask in zip(rollout.query_ids, rollout.query_mask)]  # (P,) each


def split_rows(cfg: Config, rows, source: str):
    """(training rows, held-out rows) of a run's prompt rows: data.eval_holdout of them held out (drawn by
    train.seed, never trained on), else all of them and data.eval_prompts' rows. The held-out rows are cut to
    data.eval_size."""
    if cfg.data.eval_holdout:
        rows, held_out = hold_out(rows, cfg.data.eval_holdout, cfg.train.seed, source)
        return rows, held_out[: cfg.data.eval_size]
    return rows, eval_rows(cfg)


def eval_rows(cfg: Config) -> list[dict[str, Any]]:
    """The run's held-out rows: data.eval_prompts (first data.eval_size; 'auto': a builtin's own eval set), the
    rows data.eval_holdout held out of data.prompts, or held-out environment seeds."""
    source = cfg.data.eval_source
    if cfg.data.eval_holdout:
        return split_rows(cfg, load_rows(cfg.data.prompts, cfg.data, "data.prompts"), cfg.data.prompts)[1]
    if not source:
        return []
    if cfg.env.name:
        return env_eval_rows(cfg.data.eval_size)  # held-out environment seeds
    return load_rows(source, cfg.data, "data.eval_prompts")[: cfg.data.eval_size]


@torch.no_grad()
def evaluate(models: Models, tokenizer, rows: list[dict[str, Any]], cfg: Config, scorer: Scorer,
             accelerator=None) -> float:
    """Mean reward of greedy completions on held-out rows (each rank scores its shard; accelerator None: one
    process)."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    greedy = dataclasses.replace(cfg.rollout, top_k=1, epsilon=0.0)  # top-k 1 sampling is greedy decoding
    my_rows = rows[rank::world]
    total = torch.zeros(2)
    size = cfg.rollout.num_sequences
    for i in range(0, len(my_rows), size):
        chunk = my_rows[i : i + size]
        texts, rollout, columns = play(models, tokenizer, chunk, cfg, greedy)
        scores, _ = scorer(texts, rollout.completions, columns)
        total += torch.tensor([scores.sum().item(), len(chunk)])
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total.to(accelerator.device), "sum").cpu()
    return (total[0] / total[1].clamp(min=1)).item()

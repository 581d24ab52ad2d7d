"""Stages 1-3 of a step as the loop sees them: one call, `sample_batch(draw, ...)`, where `draw` is the caller's
stages 1-3 for one batch of prompts (prompts, generate, score). Here: which completions were cut off at the length
cap, DAPO's overlong shaping (Yu et al. 2025, section 3.4), and dynamic sampling (section 3.2): prompts whose
rewards are all equal are dropped and `draw` is called again until rollout.batch_size prompts have a spread, or
rl.dynamic_sampling_max_draws draws were made. Then the batch is filled up with the last dropped prompts, so it
keeps its size (rl.minibatch_size must divide it) and every minibatch its shape; verl's DAPO recipe stops the run
there instead, and a smaller batch would leave minibatches ragged. Extra informative prompts of the last draw
are discarded, as in verl. One process only: every rank would need the same number of draws (setup refuses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pefrl.algorithms import Algorithm
from pefrl.config import Config, ConfigError
from pefrl.ops.eval_stats import length_stats
from pefrl.ops.sampling import frac_reward_zero_std, informative_groups, overlong_penalty
from pefrl.rewards import COUNTS
from pefrl.rollout import Rollout


@dataclass
class Drawn:
    """Stages 1-3 of one batch: k rows per prompt, in prompt order."""

    texts: list[str]  # (B,) raw prompt texts
    rollout: Rollout
    columns: dict[str, list]  # the reward functions' extra columns, (B,) each
    scores: Tensor  # (B,) the Scorer's rewards (the logged reward_mean)
    reward_stats: dict[str, float]
    # set by sample_batch:
    shaped_scores: Tensor | None = None  # (B,) scores + overlong penalty: what the targets see
    finished: Tensor | None = None  # (B,) bool: ended on EOS / a stop string, not at the cap; None for episodes
    stats: dict[str, float] = field(default_factory=dict)


def check_dynamic_sampling(cfg: Config, algo: Algorithm, world: int) -> None:
    if dynamic_sampling(cfg, algo) and (world > 1 or cfg.env.name):
        raise ConfigError("rl.dynamic_sampling runs on one process with single-turn prompts (every rank would "
                          "need the same number of draws); set rl.dynamic_sampling=false")


def dynamic_sampling(cfg: Config, algo: Algorithm) -> bool:
    """rl.dynamic_sampling, or the algorithm's default when it is unset (on for dapo)."""
    return cfg.rl.dynamic_sampling if cfg.rl.dynamic_sampling is not None else algo.dynamic_sampling


def sample_batch(draw: Callable[[], Drawn | None], cfg: Config, algo: Algorithm, tokenizer) -> Drawn | None:
    """Stages 1-3 with dynamic sampling and overlong shaping. draw(): one batch, None once the prompts ran out
    (then None here too, unless an earlier draw of this step has prompts). -> the step's batch, with stats:
    frac_reward_zero_std (share of drawn prompts with all-equal rewards), dynamic_sampling_draws, length_*,
    truncated_frac, overlong_penalty_mean."""
    k, rl = cfg.rollout.num_samples, cfg.rl
    first = draw()
    if first is None:
        return None
    drawn, stats = first, {}
    if dynamic_sampling(cfg, algo):
        drawn, stats = _refill(first, draw, cfg.rollout.batch_size, k, rl.dynamic_sampling_max_draws,
                               tokenizer.pad_token_id)
    elif k > 1:
        stats["frac_reward_zero_std"] = frac_reward_zero_std(drawn.scores, k).item()
    if not cfg.env.name:
        drawn.finished = finished_rows(drawn.rollout, cfg.rollout.max_new_tokens, cfg.rollout.stop, tokenizer)
    stats.update({n: v.item() for n, v in length_stats(drawn.rollout.response_mask, drawn.finished).items()})
    drawn.shaped_scores = drawn.scores
    if rl.overlong_buffer_len:  # DAPO eq. 13, added to the reward before the advantages
        lengths = drawn.rollout.response_mask.sum(-1)  # (B,)
        penalty = overlong_penalty(lengths, cfg.rollout.max_new_tokens, rl.overlong_buffer_len,
                                   rl.overlong_penalty_factor).to(drawn.scores)
        drawn.shaped_scores = drawn.scores + penalty
        stats["overlong_penalty_mean"] = penalty.mean().item()
    drawn.stats = stats
    return drawn


def finished_rows(rollout: Rollout, max_new_tokens: int, stop: list[str], tokenizer) -> Tensor:
    """(B,) bool: the completion ended by choice, not at the cap. A row shorter than max_new_tokens stopped on EOS
    or a stop string (rollout.py keeps the token that ends it); a full-length one only if its last token is a
    special token (EOS, end of turn) or its text holds a stop string."""
    lengths = rollout.response_mask.sum(-1).long()  # (B,)
    finished = lengths < max_new_tokens
    special = set(tokenizer.all_special_ids)
    for i in (~finished).nonzero().flatten().tolist():
        tokens = rollout.response_ids[i, : lengths[i]].tolist()
        finished[i] = tokens[-1] in special or any(s in tokenizer.decode(tokens) for s in stop)
    return finished


def _refill(first: Drawn, draw: Callable[[], Drawn | None], batch_size: int, k: int, max_draws: int,
            pad_id: int) -> tuple[Drawn, dict[str, float]]:
    """Draw until batch_size prompts have non-constant rewards (DAPO's 0 < #correct < G), at most max_draws."""
    kept: list[tuple[Drawn, int]] = []  # (draw, prompt index in it)
    dropped: list[tuple[Drawn, int]] = []
    draws: list[Drawn] = []
    zero_std, prompts = 0, 0
    drawn: Drawn | None = first
    while drawn is not None:
        draws.append(drawn)
        informative = informative_groups(drawn.scores, k)  # (B/k,)
        kept += [(drawn, g) for g in informative.nonzero().flatten().tolist()]
        dropped += [(drawn, g) for g in (~informative).nonzero().flatten().tolist()]
        zero_std, prompts = zero_std + int((~informative).sum()), prompts + len(informative)
        if len(kept) >= batch_size or len(draws) >= max_draws:
            break
        drawn = draw()
    groups = kept[:batch_size] + dropped[::-1][: max(batch_size - len(kept), 0)]  # the last dropped fill up
    stats = {"frac_reward_zero_std": zero_std / prompts, "dynamic_sampling_draws": float(len(draws)),
             "dynamic_sampling_filled": float(max(batch_size - len(kept), 0))}
    return _gather(groups, k, pad_id, draws), stats


def _gather(groups: list[tuple[Drawn, int]], k: int, pad_id: int, draws: list[Drawn]) -> Drawn:
    """One Drawn of the k rows of each (draw, prompt) in `groups`, in that order; reward stats over `draws`."""
    rows = [(d, list(range(g * k, (g + 1) * k))) for d, g in groups]
    return Drawn(texts=[d.texts[r] for d, rs in rows for r in rs],
                 rollout=_concat([_take(d.rollout, rs) for d, rs in rows], pad_id),
                 columns={c: [d.columns[c][r] for d, rs in rows for r in rs] for c in groups[0][0].columns},
                 scores=torch.cat([d.scores[rs] for d, rs in rows]),  # (B,)
                 reward_stats=_merge_reward_stats(draws))


# Rollout fields by layout: (B, P) left-padded, (B, T) right-padded, (B, P + T - 1, H) both
_QUERY, _RESPONSE = ("query_ids", "query_mask"), ("response_ids", "response_mask", "behaviour_logprobs",
                                                   "logprobs", "entropy", "ref_logprobs", "values")


def _layout(rollout: Rollout) -> list[str]:
    names = [f.name for f in dataclasses.fields(rollout) if f.name != "completions"]
    unknown = [n for n in names if n not in (*_QUERY, *_RESPONSE, "critic_inputs") and getattr(rollout, n) is not None]
    if unknown:  # a new Rollout field: say so rather than drop it from the batch
        raise NotImplementedError(f"dynamic sampling cannot concatenate Rollout fields {unknown}")
    return names


def _take(rollout: Rollout, rows: list[int]) -> Rollout:
    idx = torch.tensor(rows, dtype=torch.long, device=rollout.response_mask.device)
    tensors = {n: getattr(rollout, n)[idx] if getattr(rollout, n) is not None else None for n in _layout(rollout)}
    return Rollout(completions=[rollout.completions[r] for r in rows], **tensors)


def _concat(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rows of several rollouts in one: prompts left-padded to the longest P, responses right-padded to the
    longest T (pad_id / 0), a critic_inputs field padded on both sides."""
    P = max(r.query_ids.shape[1] for r in parts)
    T = max(r.response_ids.shape[1] for r in parts)
    out = {}
    for n in _layout(parts[0]):
        if any(getattr(r, n) is None for r in parts):
            out[n] = None
            continue
        fill = pad_id if n in ("query_ids", "response_ids") else 0
        padded = []
        for r in parts:
            x, dP, dT = getattr(r, n), P - r.query_ids.shape[1], T - r.response_ids.shape[1]
            if n in _QUERY:
                x = torch.nn.functional.pad(x, (dP, 0), value=fill)  # (b, P)
            elif n in _RESPONSE:
                x = torch.nn.functional.pad(x, (0, dT), value=fill)  # (b, T)
            else:
                x = torch.nn.functional.pad(x, (0, 0, dP, dT))  # (b, P + T - 1, H)
            padded.append(x)
        out[n] = torch.cat(padded)
    # trim the columns that are padding in every row, as rollout.py leaves a batch
    left = int((out["query_mask"].sum(0) == 0).long().cumprod(0).sum())
    used = (out["response_mask"].sum(0) > 0).nonzero()
    T_used = int(used.max()) + 1 if len(used) else 1
    for n, x in out.items():
        if x is not None:
            out[n] = x[:, left:] if n in _QUERY else x[:, :T_used] if n in _RESPONSE else x[:, left : P + T_used - 1]
    return Rollout(completions=[c for r in parts for c in r.completions], **out)


def _merge_reward_stats(parts: list[Drawn]) -> dict[str, float]:
    """The Scorer's stats of several draws: counts summed, means weighted by rows."""
    n = sum(len(d.scores) for d in parts)
    keys = parts[0].reward_stats.keys()
    return {key: sum(d.reward_stats[key] * (1 if key in COUNTS else len(d.scores)) for d in parts)
            / (1 if key in COUNTS else n) for key in keys}

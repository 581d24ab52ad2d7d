"""Multi-turn environments: the policy writes a turn, the environment answers, until done or env.max_turns.

The interface (a `typing.Protocol`: any class with these two methods fits, no base class needed):

    class MyEnv:
        def __init__(self, seed: int): ...              # all randomness from `seed`: episodes are reproducible
        def reset(self) -> str: ...                     # start an episode; return the first prompt
        def step(self, text: str) -> tuple[str, float, bool]:
            ...                                         # the policy's turn (decoded, without EOS) ->
            return observation, reward, done            # text appended before the next turn, reward, episode over

Where a chat template applies (data.chat_template, data.system_prompt, data.chat_template_kwargs, as for prompt
data) the first prompt is a user message and each observation the next user message, each ending in the
generation prompt; without one they are raw text, as the environment wrote them.

Config: `env.name: pkg.module:Class` and `env.max_turns`. The trainer's prompt rows become environment seeds
(`seed_rows`); each step it builds one fresh environment per row (`play_rows`), and since rows are repeated
rollout.num_samples times, a group baseline (rloo, grpo) compares episodes of the same hidden state. The summed
environment reward reaches the scorer as the column `env_reward` (reward function `env_reward`), so further
reward functions (on the first prompt and the whole transcript) can be added with weights.

What the trainer trains on (one row per episode, `EpisodeRollout`, a `Rollout` the loop already understands):

    query    = the first prompt's tokens (left-padded)
    response = turn_1 + obs_1 + turn_2 + obs_2 + ... + turn_n      (right-padded)
    response_mask   1 on policy tokens (the actions), 0 on observation tokens and padding
    attention       1 on every real token: the policy read the observations when it wrote the next turn
    scores          the sum of the environment's rewards over the episode

Policy tokens are kept exactly as sampled and every later turn is generated from the exact token ids of the
episode so far (never decoded and re-encoded: a model may sample a non-canonical BPE split or half of a UTF-8
character, which would not survive the round trip). So the trainer's `policy_forward` on (query, response)
scores each action in the very context that sampled it.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from pefrl.arch import context_length
from pefrl.config import DataConfig, EnvConfig, RolloutConfig
from pefrl.data import format_prompt, format_turn
from pefrl.rollout import Rollout, generate, left_pad

EVAL_SEED_OFFSET = 1_000_000_007
"""Evaluation episodes use seeds from here on, far from the training seeds."""


@runtime_checkable
class Environment(Protocol):
    """A text environment: `reset() -> prompt`, `step(text) -> (observation, reward, done)`."""

    def reset(self) -> str:
        """Start a new episode and return its first prompt."""
        ...

    def step(self, text: str) -> tuple[str, float, bool]:
        """Take the policy's turn; return the observation shown before the next turn, the reward for this turn
        and whether the episode is over (its observation is then dropped)."""
        ...


def load_env_class(spec: str) -> Callable[..., Environment]:
    """'pkg.module:Class' -> the class (or any factory taking `seed=`)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name:
        raise ValueError(f"env.name {spec!r} must look like 'pkg.module:Class'")
    cls = getattr(importlib.import_module(module_name), attr, None)
    if cls is None:
        raise ValueError(f"env.name {spec!r}: module {module_name} has no {attr!r}")
    return cls


def make_envs(spec: str, seeds: list[int], num_samples: int = 1) -> list[Environment]:
    """One environment per seed, each repeated `num_samples` times in a row (rows k*i .. k*i+k-1 share seed i,
    as the trainer repeats prompts)."""
    cls = load_env_class(spec)
    envs = [cls(seed=seed) for seed in seeds for _ in range(num_samples)]
    bad = next((e for e in envs if not isinstance(e, Environment)), None)
    if bad is not None:
        raise TypeError(f"{spec} does not implement reset() -> str and step(text) -> (str, float, bool)")
    return envs


@dataclass
class EpisodeRollout(Rollout):
    """A `Rollout` of whole episodes: observation tokens are attended to but are not actions."""

    response_attention: torch.Tensor | None = None
    """(B, T) 1 on every real response token (policy and observation), 0 on padding."""
    scores: torch.Tensor | None = None
    """(B,) float: sum of the environment's rewards over each episode."""
    turns: torch.Tensor | None = None
    """(B,) policy turns each episode took."""
    cut_by_length: torch.Tensor | None = None
    """(B,) bool: the episode ended because its next turn would not fit in the model's positions."""
    prompts: list[str] | None = None
    """The first prompt of each episode (what reward functions see as the prompt)."""

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_attention.to(self.query_mask.dtype)], dim=1)  # (B, P+T)

    @property
    def stats(self) -> dict[str, float]:
        turns = self.turns.float()
        return {"env/turns": turns.mean().item(), "env/cut_by_length": self.cut_by_length.float().mean().item(),
                "env/observation_tokens": (self.response_attention - self.response_mask).sum(-1).mean().item()}


@dataclass
class _Episode:
    """Token lists of one episode while it is played."""

    query: list[int]
    tokens: list[int]  # everything after the query: policy turns and observations
    is_action: list[int]  # 1 on policy tokens, 0 on observation tokens
    behaviour: list[float]  # behaviour logprob of each token (0 on observations)
    reward: float = 0.0
    turns: int = 0
    done: bool = False
    cut: bool = False  # ended because the next turn would not fit in the model's positions


@torch.no_grad()
def rollout_episodes(models, tokenizer, envs: list[Environment], rollout_cfg: RolloutConfig, max_turns: int,
                     generator: torch.Generator | None = None, data_cfg: DataConfig | None = None) -> EpisodeRollout:
    """Play one episode per environment, batched over the environments still running at each turn.

    data_cfg: the chat template settings every turn goes through (data.format_prompt for the first prompt,
    data.format_turn for each observation: a user turn, then the generation prompt). None: raw text.
    An episode whose next turn would not fit in the model's positions (max_position_embeddings) ends there,
    counted in stats['env/cut_by_length']; its rewards so far stand.
    """
    max_positions = _max_positions(models)
    prompts = [env.reset() for env in envs]
    texts = [format_prompt(tokenizer, p, data_cfg) for p in prompts] if data_cfg else prompts
    episodes: list[_Episode | None] = [None] * len(envs)
    explored = False
    for turn in range(max_turns):
        active = [i for i, ep in enumerate(episodes) if ep is None or not ep.done]
        if not active:
            break
        if turn == 0:
            out = generate(models, tokenizer, texts, rollout_cfg, generator)
        else:
            contexts = [episodes[i].query + episodes[i].tokens for i in active]
            out = generate(models, tokenizer, [_decode(tokenizer, c) for c in contexts], rollout_cfg, generator,
                           prompt_ids=contexts)
        explored = explored or out.behaviour_logprobs is not None
        for row, i in enumerate(active):
            if turn == 0:
                query = out.query_ids[row][out.query_mask[row].bool()].tolist()
                if len(query) + rollout_cfg.max_new_tokens > max_positions:
                    raise ValueError(f"environment {i}'s first prompt has {len(query)} tokens: with rollout."
                                     f"max_new_tokens={rollout_cfg.max_new_tokens} it exceeds the model's "
                                     f"{max_positions} positions")
                episodes[i] = _Episode(query=query, tokens=[], is_action=[], behaviour=[])
            ep = episodes[i]
            n = int(out.response_mask[row].sum().item())
            ep.tokens += out.response_ids[row, :n].tolist()  # as sampled: never re-encoded
            ep.is_action += [1] * n
            ep.behaviour += out.behaviour_logprobs[row, :n].tolist() if out.behaviour_logprobs is not None else [0.0] * n
            observation, reward, done = envs[i].step(out.completions[row])
            ep.reward, ep.turns, ep.done = ep.reward + float(reward), ep.turns + 1, bool(done)
            if done or turn + 1 == max_turns:  # nothing follows the last turn: its observation is unused
                continue
            if data_cfg:
                last = ep.tokens[-1] if n else None  # an end-of-turn token the template would write again
                after = tokenizer.decode([last]) if last in tokenizer.all_special_ids else ""
                observation = format_turn(tokenizer, observation, data_cfg, after)
            obs_ids = tokenizer(observation, add_special_tokens=False)["input_ids"]
            if len(ep.query) + len(ep.tokens) + len(obs_ids) + rollout_cfg.max_new_tokens > max_positions:
                ep.done = ep.cut = True
                continue
            ep.tokens += obs_ids
            ep.is_action += [0] * len(obs_ids)
            ep.behaviour += [0.0] * len(obs_ids)
    device = next(models.model.parameters()).device
    return _pack(tokenizer, prompts, episodes, explored, device)


def _max_positions(models) -> int | float:
    config = getattr(models.model, "config", None)
    return (context_length(config) if config is not None else None) or float("inf")


def _decode(tokenizer, ids: list[int]) -> str:
    # The text beside generate's prompt_ids: the model is fed the ids themselves, never this re-encoded.
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _pack(tokenizer, prompts: list[str], episodes: list[_Episode], explored: bool, device) -> EpisodeRollout:
    """Token lists -> left-padded queries (B, P) and right-padded responses (B, T) with their masks."""
    pad = tokenizer.pad_token_id
    query_ids, query_mask = left_pad([ep.query for ep in episodes], pad)  # (B, P) each
    T = max(len(ep.tokens) for ep in episodes)
    B = len(episodes)
    response_ids = torch.full((B, T), pad, dtype=torch.long)
    response_mask = torch.zeros((B, T))
    response_attention = torch.zeros((B, T))
    behaviour = torch.zeros((B, T))
    for b, ep in enumerate(episodes):
        t = len(ep.tokens)
        response_ids[b, :t] = torch.tensor(ep.tokens, dtype=torch.long)
        response_mask[b, :t] = torch.tensor(ep.is_action, dtype=torch.float)
        response_attention[b, :t] = 1.0
        behaviour[b, :t] = torch.tensor(ep.behaviour)
    completions = [tokenizer.decode(ep.tokens, skip_special_tokens=True) for ep in episodes]
    return EpisodeRollout(
        query_ids=query_ids.to(device), query_mask=query_mask.to(device), response_ids=response_ids.to(device),
        response_mask=response_mask.to(device), completions=completions,
        behaviour_logprobs=behaviour.to(device) if explored else None,
        response_attention=response_attention.to(device),
        scores=torch.tensor([ep.reward for ep in episodes], dtype=torch.float32),
        turns=torch.tensor([ep.turns for ep in episodes]), prompts=prompts,
        cut_by_length=torch.tensor([ep.cut for ep in episodes]),
    )


# ---- what the trainer calls ---------------------------------------------------------------------------------


def seed_rows(train_seed: int) -> Iterator[dict[str, int]]:
    """Endless training rows {'seed': ...}: the trainer's prompt stream when env.name is set. Ranks take distinct
    slices of each global batch and every row is repeated rollout.num_samples times, as prompts are; a resumed run
    skips the rows already used, so it replays the same games."""
    return ({"seed": train_seed * 1_000_003 + i} for i in itertools.count())


def eval_rows(num_episodes: int) -> list[dict[str, int]]:
    """Held-out episodes as rows {'seed': ...} (seeds from EVAL_SEED_OFFSET), for the trainer's evaluate()."""
    return [{"seed": EVAL_SEED_OFFSET + i} for i in range(num_episodes)]


def env_reward(prompts: list[str], completions: list[str], env_reward: list[float], **_) -> list[float]:
    """The reward function of environment runs: the episode's summed environment reward, handed over as the
    `env_reward` column by `play_rows`. Other reward functions see (first prompt, transcript) and add to it."""
    return list(env_reward)


def env_rewards(env_cfg: EnvConfig) -> list[tuple[str, Callable]]:
    """[('env_reward', env_reward)] when env.name is set, else []: the trainer's extra reward functions."""
    return [("env_reward", env_reward)] if env_cfg.name else []


def play_rows(models, tokenizer, rows: list[dict], rollout_cfg: RolloutConfig, env_cfg: EnvConfig,
              generator: torch.Generator | None = None,
              data_cfg: DataConfig | None = None) -> tuple[list[str], EpisodeRollout, dict[str, list]]:
    """Rows {'seed'} -> (first prompts, episodes, reward columns with `env_reward`): stages 1-2 for environments.
    data_cfg: every turn through the chat template (see rollout_episodes)."""
    rollout = rollout_episodes(models, tokenizer, make_envs(env_cfg.name, [row["seed"] for row in rows]),
                               rollout_cfg, env_cfg.max_turns, generator, data_cfg)
    columns = {k: [row[k] for row in rows] for k in rows[0]}
    columns["env_reward"] = rollout.scores.tolist()
    return rollout.prompts, rollout, columns

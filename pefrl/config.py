"""Typed run configuration: the schema's root, `Config`, over its sections (pefrl/config_sections.py).

Every field carries a docstring (the string literal under it); `pefrl.config_loader.reference()` turns them into
the README's config reference, so the two cannot drift. `__post_init__` validates each section: a bad value raises
naming the field. Derived sizes are properties, never fields filled in later. Reading YAML and overrides, type
coercion and saving live in pefrl/config_loader.py (which imports this module, never the reverse).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from pefrl.config_sections import (  # noqa: F401  (re-exported: `from pefrl.config import RLConfig` ...)
    ConfigError,
    ModelConfig,
    LoraConfig,
    DataConfig,
    RolloutConfig,
    EnvConfig,
    RewardConfig,
    RLConfig,
    TrainConfig,
    EvalConfig,
)

__all__ = ["Config", "ConfigError", "ModelConfig", "LoraConfig", "DataConfig", "RolloutConfig", "EnvConfig", "RewardConfig", "RLConfig", "TrainConfig", "EvalConfig"]

@dataclass
class Config:
    algo: str = "ppo"
    """RL algorithm: a name registered in pefrl/algorithms/ (ppo, a2c, reinforce, rloo, grpo, reinforce_pp, trpo,
    dapo, gspo, cispo); checked against the registry when the config is loaded (algorithms.check_config)."""
    output_dir: str = "runs/default"
    """Where metrics.jsonl, checkpoints and final/ adapters go."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if not self.output_dir.strip():
            raise ConfigError("output_dir must not be empty (it is where the run writes; e.g. runs/my_run)")
        self.output_dir = os.path.expanduser(self.output_dir)  # `~/runs/x`: the shell expands nothing in YAML
        n, mb = self.rollout.num_sequences, self.minibatch_size
        if n % mb:
            raise ConfigError(f"rl.minibatch_size ({mb}) must divide rollout.batch_size * rollout.num_samples ({n})")
        if mb % self.rl.grad_accum_steps:
            which = "rl.minibatch_size" if self.rl.minibatch_size else "the rollout (rl.minibatch_size empty)"
            raise ConfigError(f"{which} ({mb}) must be divisible by rl.grad_accum_steps ({self.rl.grad_accum_steps})")
        if self.data.eval_holdout and self.env.name:
            raise ConfigError("data.eval_holdout holds out prompt rows, but an environment run reads none "
                              "(its evaluation plays data.eval_size held-out games)")
        best = self.train.keep_best
        if best is not None:
            if not self.train.eval_every or not (self.data.eval_source or self.data.eval_holdout):
                raise ConfigError(f"train.keep_best={best} needs train.eval_every > 0 and evaluation rows "
                                  "(data.eval_prompts or data.eval_holdout): the evaluations it compares")
            sampled = re.fullmatch(r"eval_(pass|mean)@\d+", best)
            if sampled and best[len("eval_"):] not in self.eval.sample_keys():
                raise ConfigError(f"train.keep_best={best} is not logged with eval.num_samples="
                                  f"{self.eval.num_samples}; it logs {['eval_' + k for k in self.eval.sample_keys()]}")
        if self.rl.overlong_buffer_len > self.rollout.max_new_tokens:
            raise ConfigError(f"rl.overlong_buffer_len ({self.rl.overlong_buffer_len}) must be <= "
                              f"rollout.max_new_tokens ({self.rollout.max_new_tokens})")
        if self.env.name and (self.rl.overlong_filter or self.rl.overlong_buffer_len):
            raise ConfigError("rl.overlong_filter / rl.overlong_buffer_len need single-turn completions; "
                              "env.name episodes have several turns")
        if self.rl.dynamic_sampling and self.rollout.num_samples < 2:
            raise ConfigError("rl.dynamic_sampling needs rollout.num_samples >= 2 (a prompt's rewards must differ)")

    @property
    def minibatch_size(self) -> int:
        """Sequences per optimizer step on each process: rl.minibatch_size, or the whole rollout when empty."""
        return self.rl.minibatch_size or self.rollout.num_sequences

    @property
    def micro_batch_size(self) -> int:
        """Sequences per forward/backward pass: the minibatch split into rl.grad_accum_steps."""
        return self.minibatch_size // self.rl.grad_accum_steps

    @property
    def max_policy_tokens(self) -> int:
        """Most policy tokens in one sequence: the fixed_length loss normaliser (episodes have several turns)."""
        return self.rollout.max_new_tokens * (self.env.max_turns if self.env.name else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

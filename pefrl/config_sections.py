"""The sections of the run configuration (model, lora, data, rollout, env, reward, rl, train, eval): typed
dataclasses, a docstring under every field, each validated in its __post_init__ (a bad value raises naming the
field). The root `Config` (pefrl/config.py) holds them and checks what spans sections.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

from pefrl.errors import PefrlError


class ConfigError(PefrlError, ValueError):
    """A config key or value is wrong; the message names the field."""


@dataclass
class ModelConfig:
    name_or_path: str | None = None
    """Base causal LM: a local directory or hub id. Empty: the embedded tiny arithmetic model (pefrl/assets)."""
    dtype: str = "float32"
    """Weights dtype of the frozen base: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint to run. Off unless you trust the checkpoint."""
    critic: str = "shared"
    """How the critic is built: 'shared' (value head on the policy's last hidden state: one forward gives
    logprobs and values, cheapest) or 'adapter' (its own LoRA adapter 'critic' + value head). Shared is the
    default: over 3 seeds on two tasks it was the cheapest and never collapsed, which the whole-trunk adapter
    did once (docs/algorithms.md, "The critic")."""
    critic_layers: int | None = None
    """With critic 'adapter': put the critic's LoRA on the top N decoder layers only. Below them the critic is
    the frozen base, so its backward stops N layers from the top, and where the sampler runs the base as the
    reference anyway (pefrl engine, no reference_adapter) its forward starts from the hidden states those rows
    computed there: about N/L of a forward and backward instead of a whole one. Empty: every layer. Needs
    model.critic: adapter set with it (the default critic is shared)."""
    reference_adapter: str | None = None
    """A LoRA-SFT adapter directory. When set, it is loaded frozen as the reference AND as the policy's start, so
    the reference is the SFT model, not the raw base."""
    quantization: str | None = None
    """Load the base quantized with bitsandbytes: '4bit' or '8bit' (QLoRA style). Empty: not quantized."""
    bnb_4bit_quant_type: str = "nf4"
    """4-bit data type: 'nf4' or 'fp4'."""
    bnb_4bit_use_double_quant: bool = True
    """Quantize the 4-bit quantization constants too (saves ~0.4 bit/param)."""
    prequantize: bool = True
    """With quantization '4bit' and a local unquantized safetensors checkpoint: quantize it once, tensor by
    tensor, into pefrl's cache ($PEFRL_CACHE/quantized, else ~/.cache/pefrl/quantized; reused until the source
    files change) and load that, so loading never holds the unquantized file (docs/benchmarks.md, 1B-class bases).
    Bit-identical to quantizing on load. False: quantize on load (transformers' own path)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (slower)."""
    logits_chunk_size: int | None = None
    """Compute logprobs this many positions at a time from the last hidden state, so the full fp32
    (batch, time, vocab) logits never exist (recomputed in backward). Empty: all at once (fastest)."""

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("model.critic", self.critic, ("adapter", "shared"))
        if self.critic_layers is not None:
            _positive("model.critic_layers", self.critic_layers)
            if self.critic != "adapter":
                raise ConfigError(f"model.critic_layers needs model.critic: adapter (got {self.critic!r}): the "
                                 "shared critic has no layers of its own")
        _choice("model.quantization", self.quantization, (None, "4bit", "8bit"))
        _choice("model.bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        if self.logits_chunk_size is not None:
            _positive("model.logits_chunk_size", self.logits_chunk_size)


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank of the policy and critic adapters."""
    alpha: int = 32
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input. Keep 0 for RL: dropout makes old and new logprobs disagree."""
    target_modules: list[str] | None = None
    """Module leaf names to adapt (e.g. [q_proj, v_proj]). Empty: every linear layer inside the decoder blocks
    (peft's all-linear without the output head and anything outside the blocks); the start line names them."""

    def __post_init__(self):
        _positive("lora.r", self.r)
        _positive("lora.alpha", self.alpha)
        _in_range("lora.dropout", self.dropout, 0.0, 1.0)


@dataclass
class DataConfig:
    prompts: str = "builtin:arithmetic"
    """Prompt source: a JSONL/CSV/Parquet file, a `datasets` name or load_from_disk directory, or
    'builtin:arithmetic' (the embedded model's training task)."""
    prompt_field: str = "prompt"
    """Column holding the prompt text. Every other column is passed to reward functions by name."""
    split: str = "train"
    """Split to read when `prompts` is a datasets name or a DatasetDict."""
    eval_prompts: str | None = "auto"
    """Held-out prompts for evaluation, same forms as `prompts`. 'auto': the builtin's own eval set when
    `prompts` is a builtin ('builtin:X' -> 'builtin:X-eval'), else none. Empty: no evaluation."""
    eval_holdout: int = 0
    """Hold out this many rows of `prompts` for evaluation instead (drawn by train.seed, never trained on).
    Needs a finite source: not an online iterable, an environment, or an explicit eval_prompts."""
    eval_size: int = 256
    """How many held-out prompts an evaluation scores (the first N)."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens are an error (named by index), never silently cut."""
    chat_template: str = "auto"
    """'auto': apply the tokenizer's chat template when it has one; 'on' requires one; 'off' uses raw text. A
    prompt of chat messages always needs one."""
    system_prompt: str | None = None
    """Prepended as a system message to every prompt, string or messages (needs a chat template)."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of tokenizer.apply_chat_template, e.g. {enable_thinking: false}."""
    prompt_template: str | None = None
    """A format string over each row's columns that makes its prompt, e.g. 'Question: {question}' (then
    `prompt_field` need not exist). Empty: the prompt is `prompt_field`, a string or a list of
    {role, content} messages."""
    shuffle: bool = True
    """Shuffle prompts each pass over the data (seeded by train.seed)."""

    def __post_init__(self):
        _choice("data.chat_template", self.chat_template, ("auto", "on", "off"))
        _positive("data.max_prompt_length", self.max_prompt_length)
        _positive("data.eval_size", self.eval_size)
        if self.eval_holdout < 0:
            raise ConfigError(f"data.eval_holdout must be >= 0, got {self.eval_holdout}")
        if self.eval_holdout and self.eval_prompts not in (None, "", "auto"):
            raise ConfigError(f"data.eval_holdout ({self.eval_holdout}) and data.eval_prompts "
                              f"({self.eval_prompts}) both name the evaluation rows: set one of them")
        if self.chat_template == "off":
            for name in ("system_prompt", "chat_template_kwargs"):
                if getattr(self, name):
                    raise ConfigError(f"data.{name} needs a chat template, but data.chat_template is 'off'")
        if self.prompt_template is not None:
            try:
                list(string.Formatter().parse(self.prompt_template))
            except ValueError as e:
                raise ConfigError(f"data.prompt_template {self.prompt_template!r} is not a format string: {e}"
                                  ) from None

    @property
    def eval_source(self) -> str | None:
        """The evaluation prompt source eval_prompts names ('auto' resolved; None with eval_holdout)."""
        if self.eval_holdout or not self.eval_prompts:
            return None
        if self.eval_prompts != "auto":
            return self.eval_prompts
        return f"{self.prompts}-eval" if self.prompts.startswith("builtin:") else None


@dataclass
class RolloutConfig:
    batch_size: int = 32
    """Prompts per step on each process."""
    num_samples: int = 1
    """Completions sampled per prompt (k). Group baselines (rloo, grpo) need k >= 2."""
    max_new_tokens: int = 16
    """Longest completion in tokens."""
    temperature: float = 1.0
    """Sampling temperature. Logprobs are taken of the same tempered distribution."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set with this much probability."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    epsilon: float = 0.0
    """Epsilon-greedy exploration: with this probability a token is drawn uniformly from the allowed set."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation of a sequence ends at the first one (EOS always stops)."""
    engine: str = "auto"
    """Sampler: 'pefrl' (pefrl's KV-cache sampler, which also scores the reference in the same pass,
    pefrl/decode.py: the lean layer for Llama/Mistral/Qwen2, else the model's own forward; an error where
    neither runs, e.g. an FSDP-sharded base), 'transformers' (HF generate, any model) or 'auto' (pefrl's where it
    runs, else transformers, with the reason logged once)."""

    def __post_init__(self):
        _positive("rollout.batch_size", self.batch_size)
        _positive("rollout.num_samples", self.num_samples)
        _positive("rollout.max_new_tokens", self.max_new_tokens)
        if not self.temperature > 0:
            raise ConfigError(f"rollout.temperature must be > 0, got {self.temperature}")
        _in_range("rollout.top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.top_k < 0:
            raise ConfigError(f"rollout.top_k must be >= 0, got {self.top_k}")
        _in_range("rollout.epsilon", self.epsilon, 0.0, 1.0)
        _choice("rollout.engine", self.engine, ("auto", "pefrl", "transformers"))

    @property
    def num_sequences(self) -> int:
        """Sequences generated per step on each process."""
        return self.batch_size * self.num_samples


@dataclass
class EnvConfig:
    name: str | None = None
    """A multi-turn environment class by import path, 'pkg.module:Class' (see pefrl/envs.py). When set, each
    episode's prompt comes from env.reset() and the environment answers every turn; data.prompts is unused."""
    max_turns: int = 4
    """Policy turns per episode before it is cut off."""

    def __post_init__(self):
        _positive("env.max_turns", self.max_turns)


@dataclass
class RewardConfig:
    functions: list[str] = field(default_factory=list)
    """Reward functions by import path, 'pkg.module:function' or 'path/to/file.py:function'; from Python also
    callables (logged as reward/<__name__>). Signature: fn(prompts: list[str], completions: list[str], **columns)
    -> list[float]."""
    weights: list[float] | None = None
    """One weight per reward function (default: all 1.0). The reward is the weighted sum."""
    model: str | None = None
    """A sequence-classification reward model directory; its score is added with weight `model_weight`."""
    model_weight: float = 1.0
    """Weight of the reward model's score in the sum."""
    on_error: str = "raise"
    """A reward function that raises: 'raise' stops the run naming the sample; 'skip' scores it 0 and counts it."""
    timeout_s: float = 0.0
    """Time limit of a reward function call in seconds (0: none). A call past it is killed with its worker process
    and fails; the sample-by-sample retries of failed batch calls share one such limit."""
    workers: int = 0
    """Worker processes that run the reward functions (0: in the training process, or 1 when timeout_s is set).
    More than 1 also splits each batch call into that many slices run at once."""

    def __post_init__(self):
        _choice("reward.on_error", self.on_error, ("raise", "skip"))
        if self.weights is not None and len(self.weights) != len(self.functions):
            raise ConfigError(
                f"reward.weights has {len(self.weights)} entries but reward.functions has {len(self.functions)}"
            )
        if self.timeout_s < 0:
            raise ConfigError(f"reward.timeout_s must be >= 0, got {self.timeout_s}")
        if self.workers < 0:
            raise ConfigError(f"reward.workers must be >= 0, got {self.workers}")


@dataclass
class RLConfig:
    """Hyperparameters of the RL update. Each algorithm reads the ones it needs (see pefrl/algorithms.py)."""

    epochs: int = 2
    """Passes over each rollout batch (ratio-based algorithms; a2c and reinforce always do one)."""
    minibatch_size: int | None = None
    """Sequences per optimizer step on each process; must divide rollout.num_sequences. Empty: the whole
    rollout, one optimizer step per epoch (TRL's num_mini_batches=1)."""
    grad_accum_steps: int = 1
    """Micro-batches per minibatch: minibatch_size is split into this many forward/backward passes."""
    gamma: float = 1.0
    """Discount over response tokens."""
    lam: float = 0.95
    """GAE lambda (bias/variance trade-off of the advantage)."""
    clip_range: float | None = None
    """Policy ratio clip epsilon, the lower one when clip_range_high is set (1 - clip_range). Empty: the algorithm's
    published default: 0.2 (ppo, grpo, rloo, reinforce_pp, dapo), 3e-4 (gspo, per sequence), none (cispo)."""
    clip_range_high: float | None = None
    """Upper clip epsilon (1 + clip_range_high; DAPO's clip-higher). Empty: the algorithm's default: the low one
    (symmetric) for ppo, grpo, rloo, reinforce_pp; 0.28 (dapo, cispo); 4e-4 (gspo)."""
    value_clip_range: float = 0.2
    """Value prediction clip around the rollout values (PPO). 0: no value clipping."""
    vf_coef: float = 0.5
    """Weight of the value loss in the total loss."""
    entropy_coef: float = 0.0
    """Entropy bonus weight: the loss subtracts entropy_coef * entropy."""
    kl_coef: float = 0.05
    """Initial coefficient of the KL to the reference (in the reward for ppo/a2c/reinforce/rloo, in the loss
    for grpo)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator: 'k1' (log ratio), 'k2' (half squared log ratio) or 'k3' (Schulman 2020)."""
    kl_target: float | None = None
    """Adaptive KL controller target (Ziegler et al. 2019). Empty: fixed kl_coef."""
    kl_horizon: int = 10000
    """Adaptive KL controller horizon in samples."""
    whiten_rewards: bool = False
    """Whiten per-token rewards over the batch before GAE."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch (mean 0, std 1 over response tokens)."""
    scale_by_std: bool = True
    """GRPO: divide group-centred rewards by the group std (off: Dr. GRPO)."""
    loss_aggregation: str = "token_mean"
    """'token_mean' (all tokens weigh alike), 'sequence_mean' (mean per sequence, then over sequences) or
    'fixed_length' (sum / (batch * max_new_tokens), Dr. GRPO)."""
    dynamic_sampling: bool | None = None
    """Drop prompts whose num_samples rewards are all equal and draw more until rollout.batch_size prompts have
    a spread (DAPO). Empty: the algorithm's default (on for dapo only). One process only."""
    dynamic_sampling_max_draws: int = 10
    """Dynamic sampling: most prompt batches drawn per step (DAPO's verl recipe: 10); when reached, the batch is
    filled up with the last dropped prompts."""
    overlong_filter: bool = False
    """Mask completions cut off at rollout.max_new_tokens (no EOS or stop string) out of the loss (DAPO)."""
    overlong_buffer_len: int = 0
    """Soft overlong punishment (DAPO eq. 13): a penalty growing from 0 to -overlong_penalty_factor over the
    last this many tokens before rollout.max_new_tokens, added to the scores (0: off)."""
    overlong_penalty_factor: float = 1.0
    """Largest soft overlong penalty (DAPO: 1.0)."""
    baseline_decay: float = 0.9
    """REINFORCE moving-average baseline decay."""
    max_kl: float = 0.01
    """TRPO: largest KL(old || new) a step may take."""
    cg_iters: int = 10
    """TRPO: conjugate-gradient iterations."""
    cg_damping: float = 0.1
    """TRPO: damping added to the Fisher-vector product."""
    line_search_steps: int = 10
    """TRPO: backtracking halvings before a step is rejected."""

    def __post_init__(self):
        _positive("rl.epochs", self.epochs)
        if self.minibatch_size is not None:
            _positive("rl.minibatch_size", self.minibatch_size)
        _positive("rl.grad_accum_steps", self.grad_accum_steps)
        _in_range("rl.gamma", self.gamma, 0.0, 1.0)
        _in_range("rl.lam", self.lam, 0.0, 1.0)
        _choice("rl.kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        _choice("rl.loss_aggregation", self.loss_aggregation, ("token_mean", "sequence_mean", "fixed_length"))
        for name in ("clip_range", "clip_range_high", "value_clip_range", "vf_coef", "entropy_coef", "kl_coef",
                     "overlong_buffer_len", "overlong_penalty_factor"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"rl.{name} must be >= 0, got {getattr(self, name)}")
        _positive("rl.dynamic_sampling_max_draws", self.dynamic_sampling_max_draws)
        if self.kl_target is not None and self.kl_target <= 0:
            raise ConfigError(f"rl.kl_target must be > 0, got {self.kl_target}")
        _in_range("rl.baseline_decay", self.baseline_decay, 0.0, 1.0)
        if not self.max_kl > 0:
            raise ConfigError(f"rl.max_kl must be > 0, got {self.max_kl}")


@dataclass
class TrainConfig:
    steps: int = 100
    """RL steps (rollout + update). An online prompt source may end sooner."""
    seed: int = 0
    """Seed of data order, sampling and initialization."""
    lr: float = 3e-4
    """AdamW learning rate of the adapters and value head."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many optimizer steps, then constant."""
    eval_every: int = 0
    """Evaluate on data.eval_prompts every N steps (0: only before and after training)."""
    save_every: int = 0
    """Write a checkpoint every N steps (0: only the final adapters)."""
    keep_last: int = 2
    """Checkpoints to keep; older ones are deleted after a new one is safely written."""
    resume: str | None = None
    """'latest' (newest intact checkpoint in output_dir; none yet: start fresh) or a checkpoint directory.
    Empty: start fresh, which an output_dir already holding a pefrl run refuses (see train.overwrite). A resume
    refuses a config that differs from the saved config.yaml outside pefrl.rundir.RESUME_SAFE_FIELDS."""
    overwrite: bool = False
    """Start fresh in an output_dir that holds a pefrl run, deleting that run's own files first (metrics,
    config.yaml, summary, final/, its checkpoints); other files and other tools' checkpoint-N/ stay."""
    log_every: int = 1
    """Print a progress line every N steps (metrics.jsonl gets every step)."""
    samples_every: int = 0
    """Log a table of sample prompts, completions and rewards every N steps (0: off)."""
    trackers: list[str] = field(default_factory=list)
    """Accelerate trackers, e.g. ['tensorboard'] or ['wandb']."""
    max_bad_steps: int = 3
    """Abort after this many consecutive updates with a non-finite loss or gradient (each one is skipped)."""
    mmap_threshold_mib: int | None = None
    """On CPU with glibc (Linux): every allocation of at least this many MiB gets its own memory mapping,
    returned to the system when freed, instead of a place on the heap that fragments and stays with the process.
    A large 4-bit base gains GBs for a few % CPU (Qwen2.5-1.5B shape, 8 x 16 PPO: 5.7-5.8 -> 3.8 GB, +4-8%);
    a small unquantized model pays more in page faults (SmolLM2 fp32 PPO +36% CPU). Empty (default): 1 for a
    base of at least 1B parameters that is 4-bit or 8-bit or sharded by FSDP (Llama-3.2-1B shape, 2 FSDP ranks:
    2.65 -> 2.48 GB load peak, same speed), glibc's own (dynamic) threshold otherwise (SmolLM2-135M at 4-bit paid
    +27% CPU); 0: glibc's own always; 1 to 32: that.
    The environment's MALLOC_MMAP_THRESHOLD_ wins. Measured in docs/benchmarks.md, 1B-class bases."""
    keep_best: str | None = None
    """Keep the adapters of the best evaluation in output_dir/best/ (with best/best.json naming the step and value):
    an evaluation metric, higher is better, e.g. eval_reward_mean, eval_pass@4 or eval_reward/<function>. Needs
    train.eval_every; checkpoints carry the best value so far, so a resume continues the comparison, and
    keep_last never deletes best/. Empty: off."""

    def __post_init__(self):
        _positive("train.steps", self.steps)
        if self.mmap_threshold_mib is not None:
            _in_range("train.mmap_threshold_mib", self.mmap_threshold_mib, 0, 32)  # glibc refuses over 32 MiB
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        for name in ("max_grad_norm", "warmup_steps", "eval_every", "save_every", "samples_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        _positive("train.keep_last", self.keep_last)
        _positive("train.log_every", self.log_every)
        _positive("train.max_bad_steps", self.max_bad_steps)
        if self.keep_best is not None and not self.keep_best.startswith("eval_"):
            raise ConfigError(f"train.keep_best must name an evaluation metric (eval_reward_mean, eval_pass@<k>, "
                              f"eval_mean@<k>, eval_reward/<function>), got {self.keep_best!r}")
        if self.overwrite and self.resume:  # in a YAML next to resume: latest, every restart would wipe the run
            raise ConfigError(f"train.overwrite=true deletes the run that train.resume={self.resume} continues: "
                              "set one of them")


@dataclass
class EvalConfig:
    """Evaluation on data.eval_prompts (train.eval_every, before and after training, `pefrl eval`). Greedy
    completions always give eval_reward_mean and eval_reward/<function>; num_samples adds sampled metrics."""

    num_samples: int = 0
    """Also sample this many completions per held-out prompt (k) and log eval_pass@1, eval_pass@k (unbiased
    estimator, Chen et al. 2021) and eval_mean@k (mean reward of the k samples). 0: greedy only. Sampling draws
    from its own seed (train.seed and the step), so it never changes the training samples."""
    temperature: float | None = None
    """Sampling temperature of the k samples. Empty: rollout.temperature (top_p and top_k are the rollout's too;
    no epsilon-greedy exploration)."""
    correct_threshold: float = 1.0
    """A sample counts as correct for pass@k when its reward (the weighted sum) is >= this: 1.0 suits 0/1
    correctness rewards, also with a small format bonus added; set it for other scales."""

    def __post_init__(self):
        if self.num_samples < 0:
            raise ConfigError(f"eval.num_samples must be >= 0, got {self.num_samples}")
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"eval.temperature must be > 0, got {self.temperature}")

    def sample_keys(self) -> list[str]:
        """The sampled metrics' names (without the eval_ prefix): pass@1, pass@k, mean@k; [] when k is 0."""
        k = self.num_samples
        return [] if not k else sorted({"pass@1", f"pass@{k}"}) + [f"mean@{k}"]


# --- validation helpers -------------------------------------------------------------------------------------


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _positive(name: str, value: int | float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _in_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} must be in {bracket}{low}, {high}], got {value}")

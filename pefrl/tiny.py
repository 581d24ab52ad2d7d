"""Tiny causal LMs built offline from config, with a BPE tokenizer trained by `tokenizers`, and where the
embedded default model lives.

Used by the tests (every family in MODEL_TYPES; most tests run ARCHS) and by pefrl.tasks.arithmetic_model (CLI:
scripts/build_tiny_model.py), which trains the embedded default model. Everything here runs in seconds on a CPU
and touches no hub.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ARCHS = ("llama", "qwen2", "gpt2")
"""The three families most model tests run: the lean Llama layer, it with q/k/v biases, and Conv1D projections."""
MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi", "phi3", "gpt2", "gpt_neox", "olmo2")
"""Every family build_model builds (config.model_type)."""
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-arith"
"""The embedded default model (tokenizer + tiny Llama trained on two-digit addition), shipped as package data;
built by pefrl.tasks.arithmetic_model."""
BUILD_HINT = "python -m pefrl.tasks.arithmetic_model"


def default_model_dir() -> Path:
    """DEFAULT_MODEL_DIR, or FileNotFoundError naming the build command when it is missing (a source checkout
    whose asset was deleted; wheels ship it)."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"the embedded default model is missing at {DEFAULT_MODEL_DIR}; build it (a few "
                                f"CPU-minutes): {BUILD_HINT}, or set model.name_or_path")
    return DEFAULT_MODEL_DIR


def default_corpus() -> list[str]:
    """A small mixed corpus: arithmetic lines and some English, so BPE has words and digits to learn."""
    words = (
        "the quick brown fox jumps over the lazy dog . what is the answer ? answer : question : "
        "let us think step by step . the result is"
    ).split()
    lines = [f"{a}+{b}={a + b}" for a in range(0, 100, 3) for b in range(0, 100, 7)]
    lines += [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    return lines


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE with single-digit pre-splitting (as Llama does), plus <s>, </s> and <pad>."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus if corpus is not None else default_corpus()), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left"
    )


def build_model(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 128,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialized causal LM of the model_type `arch` (one of MODEL_TYPES) sized to `tokenizer`."""
    if arch not in MODEL_TYPES:
        raise ValueError(f"arch must be one of {MODEL_TYPES}, got {arch!r}")
    torch.manual_seed(seed)
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                                   n_positions=max_positions, **ids)
        return AutoModelForCausalLM.from_config(cfg)
    common = dict(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        **ids,
    )
    if arch != "gpt_neox":  # GPT-NeoX has no grouped-query attention
        common["num_key_value_heads"] = num_heads
    if arch in ("qwen3", "gemma", "gemma2"):  # their default head_dim is fixed (128 / 256), not hidden / heads
        common["head_dim"] = hidden_size // num_heads
    if arch == "mistral":
        common["sliding_window"] = None  # a window longer than max_positions changes nothing; None says so
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **common))


def save_tiny_model(out_dir: str | Path, arch: str = "llama", tokenizer: PreTrainedTokenizerFast | None = None,
                    **model_kwargs) -> str:
    """Build a tiny random model (and a tokenizer unless given) and save both to `out_dir`; returns the dir.
    What every test needs before `from_pretrained`."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    build_model(arch, tokenizer, **model_kwargs).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)

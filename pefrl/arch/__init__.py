"""Model families: every fact pefrl needs about one, in one file here (STYLE.md habit 10).

    arch/base.py      the Family record, the generic fallback, and facts read the same way for every family
                      (logits post-processing, dropout, context length, decoder layers for FSDP)
    arch/llama.py     Llama: pefrl's lean functional layer (used by decode and forward)
    arch/qwen2.py, arch/mistral.py    the Llama layer under other names

LoRA's default targets are no family fact: every linear layer inside the decoder blocks, read from the model
(base.all_linear_targets), so Phi-3's fused qkv_proj or GPT-NeoX's query_key_value need no file.

A new family is one file defining `FAMILY = Family(...)`, registered in FAMILIES below; a model_type without
one gets GENERIC. Nothing here imports another pefrl module outside arch/.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from pefrl.arch import llama, mistral, qwen2
from pefrl.arch.base import (
    GENERIC,
    Family,
    LogitsHead,
    all_linear_targets,
    context_length,
    contiguous_head_input,
    decoder_layers,
    disable_dropout,
    is_fsdp_sharded,
    is_linear,
    linear_module_names,
    positions_from_mask,
    stores_transposed,
)

FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (llama, qwen2, mistral)}
"""model_type -> its family."""

__all__ = ["FAMILIES", "GENERIC", "Family", "LogitsHead", "all_linear_targets", "context_length",
           "contiguous_head_input", "decoder_layers", "default_target_modules", "disable_dropout", "family",
           "is_fsdp_sharded", "is_linear", "linear_module_names", "positions_from_mask", "resolve_target_modules",
           "stores_transposed"]


def family(model_type: str | None) -> Family:
    """The family of a config.model_type; GENERIC for one without a file."""
    return FAMILIES.get(model_type or "", GENERIC)


def default_target_modules(model: PreTrainedModel) -> list[str]:
    """Every linear layer inside the decoder blocks, as leaf names (see all_linear_targets)."""
    return all_linear_targets(model)[0]


def resolve_target_modules(model: PreTrainedModel, targets: list[str] | None) -> tuple[list[str], list[str]]:
    """-> (targets, excluded) for peft's target_modules / exclude_modules: `targets` as given, or when None
    every linear layer of the decoder blocks (all_linear_targets). A given name that matches no linear layer
    raises naming those that exist."""
    if targets is None:
        return all_linear_targets(model)
    existing = linear_module_names(model)
    missing = [t for t in targets if t not in existing]
    if missing or not targets:
        raise ValueError(
            f"lora.target_modules {missing or targets} match no linear layer of this "
            f"{getattr(model.config, 'model_type', 'model')}; linear layers it has: {existing}"
        )
    return list(targets), []

"""Model families: every fact pefrl needs about one, in one file here (STYLE.md habit 10).

    arch/base.py      the Family record, the generic fallback, and facts read the same way for every family
                      (logits post-processing, dropout, context length, decoder layers for FSDP)
    arch/llama.py     Llama: targets and pefrl's lean functional layer (used by decode and forward)
    arch/qwen2.py, arch/mistral.py    the Llama layer under other names
    arch/gpt2.py      GPT-2's Conv1D projection names

A new family is one file defining `FAMILY = Family(...)`, registered in FAMILIES below; a model_type without
one gets GENERIC. Nothing here imports another pefrl module outside arch/.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from pefrl.arch import gpt2, llama, mistral, qwen2
from pefrl.arch.base import (
    GENERIC,
    LLAMA_LIKE_TARGETS,
    Family,
    LogitsHead,
    context_length,
    decoder_layers,
    disable_dropout,
    linear_module_names,
    positions_from_mask,
    stores_transposed,
)

FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (llama, qwen2, mistral, gpt2)}
"""model_type -> its family."""

__all__ = ["FAMILIES", "GENERIC", "LLAMA_LIKE_TARGETS", "Family", "LogitsHead", "context_length", "decoder_layers",
           "default_target_modules", "disable_dropout", "family", "linear_module_names", "positions_from_mask",
           "resolve_target_modules", "stores_transposed"]


def family(model_type: str | None) -> Family:
    """The family of a config.model_type; GENERIC for one without a file."""
    return FAMILIES.get(model_type or "", GENERIC)


def default_target_modules(model: PreTrainedModel) -> list[str]:
    """Attention + MLP projections: Llama-like names when present, the family's own (GPT-2's), else every
    linear but lm_head."""
    return family(getattr(model.config, "model_type", "")).default_targets(set(linear_module_names(model)))


def resolve_target_modules(model: PreTrainedModel, targets: list[str] | None) -> list[str]:
    """`targets`, or the defaults when None; a name that matches no linear layer raises naming those that exist."""
    if targets is None:
        return default_target_modules(model)
    existing = linear_module_names(model)
    missing = [t for t in targets if t not in existing]
    if missing or not targets:
        raise ValueError(
            f"lora.target_modules {missing or targets} match no linear layer of this "
            f"{getattr(model.config, 'model_type', 'model')}; linear layers it has: {existing}"
        )
    return list(targets)

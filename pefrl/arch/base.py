"""What every model family shares, and the generic fallback for families pefrl has no file for.

A family's facts (pefrl.arch.Family): which projections LoRA adapts by default, whether pefrl's lean decoder
(pefrl/arch/llama.py's functional layer) can run it, and which of its layers FSDP shards. The facts read from a
model's config or modules the same way for every family (logits post-processing, dropout, context length,
decoder layer classes) are functions here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

LLAMA_LIKE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Attention and MLP projections of Llama, Qwen2, Mistral, Gemma and most decoder LMs since."""


@dataclass(frozen=True)
class Family:
    """The facts pefrl needs about one model family (config.model_type)."""

    name: str
    """model_type as transformers spells it; 'generic' for the fallback."""
    lora_targets: tuple[str, ...] = LLAMA_LIKE_TARGETS
    """Default LoRA target modules (leaf names), those the model has; generic: these when present, else every
    linear layer but the output embeddings."""
    lean_projections: tuple[str, ...] = ()
    """Projection paths inside one decoder layer that pefrl's lean decoder routes LoRA through (the Llama
    layout of pefrl/arch/llama.py); empty: the lean decoder cannot run this family."""

    def default_targets(self, existing: set[str]) -> list[str]:
        """Default LoRA targets among the linear layer names `existing`."""
        found = [n for n in LLAMA_LIKE_TARGETS if n in existing]  # Llama-like names win in every family
        if found:
            return found
        if self.lora_targets != LLAMA_LIKE_TARGETS:
            return [n for n in self.lora_targets if n in existing]
        return sorted(existing)


GENERIC = Family("generic")
"""Any family without a file: Llama-like projection names when present, else every linear; no lean decoder."""


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the Linear / Conv1D layers LoRA could adapt, output embeddings excluded."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not out_emb and name
    }
    return sorted(names)


def stores_transposed(model: nn.Module, targets: list[str]) -> bool:
    """True when a target is a transformers Conv1D (GPT-2), whose weight is stored (in, out): peft's
    fan_in_fan_out."""
    return any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules())


def context_length(model_config) -> int | None:
    """Positions the model can attend over (max_position_embeddings; GPT-2: n_positions), None if unknown."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The decoder layers: modules whose class transformers marks as not splittable (`_no_split_modules`,
    e.g. LlamaDecoderLayer, GPT2Block). FSDP shards them one by one (one all-gather per layer in the forward)."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise NotImplementedError(f"{type(lm).__name__} names no decoder layer class (_no_split_modules={names}); "
                                  "pefrl cannot choose FSDP units for it")
    return layers


def disable_dropout(model: nn.Module) -> None:
    # Dropout makes the rollout's logprobs and the update's disagree at ratio 1 (TRL's disable_dropout_in_model
    # does the same). Attention dropout is a float on Llama-like attention modules, an nn.Dropout on GPT-2.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) of a left-padded batch, as `generate` gives them: 0 at each row's first real token
    (padding clamped to 0), so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class LogitsHead(nn.Module):
    """lm_head plus the fixed post-processing some architectures apply to its output, so that chunked logprobs
    from hidden states match the model's own logits: Gemma 2/3 soft-capping (cap * tanh(logits / cap)),
    Cohere's logit_scale (multiply), Granite's logits_scaling (divide)."""

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        self.lm_head = lm.get_output_embeddings()
        cfg = lm.config.get_text_config()
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.scale = getattr(cfg, "logit_scale", None)
        self.divide = getattr(cfg, "logits_scaling", None)

    def is_plain_linear(self) -> bool:
        """logits = hidden @ weight^T exactly: an unwrapped, bias-free nn.Linear and no post-processing."""
        plain = type(self.lm_head) is nn.Linear and self.lm_head.bias is None
        plain = plain and not isinstance(self.lm_head.weight, DTensor)  # FSDP-sharded: only its forward gathers
        return plain and self.scale is None and self.divide is None and self.softcap is None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

"""What every model family shares, and the generic fallback for families pefrl has no file for.

A family's facts (pefrl.arch.Family): whether pefrl's lean decoder (pefrl/arch/llama.py's functional layer) can
run it. The facts read from a model's config or modules the same way for every family are functions here: the
LoRA targets (every linear layer of the decoder blocks), logits post-processing, dropout, context length, the
decoder layers (FSDP's units).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

@dataclass(frozen=True)
class Family:
    """The facts pefrl needs about one model family (config.model_type). LoRA targets are no such fact: every
    family gets every linear layer of its decoder blocks (`all_linear_targets`)."""

    name: str
    """model_type as transformers spells it; 'generic' for the fallback."""
    lean_projections: tuple[str, ...] = ()
    """Projection paths inside one decoder layer that pefrl's lean decoder routes LoRA through (the Llama
    layout of pefrl/arch/llama.py); empty: the lean decoder cannot run this family."""


GENERIC = Family("generic")
"""Any family without a file: no lean decoder."""


def is_fsdp_sharded(module: nn.Module) -> bool:
    """True when any parameter of `module` is an FSDP2 shard (a DTensor): only its own forward gathers it."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can wrap as a linear map: nn.Linear (bitsandbytes' Linear4bit and Linear8bitLt are
    subclasses) or transformers' Conv1D (GPT-2); peft's "all-linear" counts the same classes."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the linear layers LoRA could adapt anywhere in the model, output embeddings
    excluded: what a user's lora.target_modules may name."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if is_linear(module) and module is not out_emb and name}
    return sorted(names)


def all_linear_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """peft's "all-linear", limited to the decoder blocks of the language model -> (targets, excluded).

    targets: the distinct leaf names of every linear layer inside the blocks, in the order the first block
    holds them (Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; Phi-3's fused qkv_proj
    and gate_up_proj; GPT-2's c_attn, c_proj, c_fc). peft matches a leaf name as a suffix anywhere in the model,
    so excluded lists the full names of the linear layers outside the blocks that share a leaf name with a
    target (a vision tower's q_proj, say): peft's exclude_modules. The output head and the embeddings are never
    targets.
    """
    blocks = _text_blocks(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = {id(m) for block in blocks for m in block.modules()} - {id(out_emb)}
    targets = list(dict.fromkeys(name.rsplit(".", 1)[-1] for block in blocks for name, module in
                                 block.named_modules() if name and is_linear(module) and id(module) in inside))
    if not targets:
        raise ValueError(f"{type(model).__name__}'s decoder layers hold no linear layer LoRA can adapt; "
                         "set lora.target_modules")
    excluded = [name for name, module in model.named_modules()
                if is_linear(module) and id(module) not in inside and name.rsplit(".", 1)[-1] in targets]
    return targets, excluded


def _text_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of the language model (get_decoder: a VLM's vision blocks are left out); a model
    that names no layer class: its whole decoder, warned."""
    text = model.get_decoder() if hasattr(model, "get_decoder") else model
    in_text = {id(m) for m in text.modules()}
    try:
        layers = [layer for layer in decoder_layers(model) if id(layer) in in_text]
    except NotImplementedError:
        layers = []
    if not layers:
        warnings.warn(f"{type(model).__name__} names no decoder layer class (_no_split_modules): LoRA targets "
                      f"every linear layer of its {type(text).__name__} but the output head", stacklevel=3)
        return [text]
    return layers


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


def contiguous_head_input(lm: nn.Module) -> None:
    """Hand the output head a contiguous input (a forward pre-hook on lm.get_output_embeddings()).

    transformers' models slice the positions they keep (logits_to_keep=1 in every prefill of generate:
    hidden[:, -1:, :], strides (P * H, H, 1)), and on CPU F.linear on such a strided 3-D bf16 input runs as a
    batched matmul against the weight expanded and copied once per row (pytorch/pytorch#151934). Measured with
    Llama-3.2-1B's 128256 x 2048 head, 4 rows: 19 s and +1.6 GiB for one prefill, 0.05 s and nothing once
    contiguous. pefrl's own forward makes its slices contiguous itself (forward._response_hidden); this covers
    the model's own forward: transformers' generate (FSDP, rollout.engine=transformers) and the generic stepper.
    The copy is of the kept rows only (B x kept x H values); a contiguous input passes through untouched."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


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

"""The generic stepper of pefrl's sampler: any causal LM transformers runs with a KV cache, through its own forward.

Where the lean layer (pefrl/arch/llama.py) does not apply (other families, or a base it cannot read), the
sampler in pefrl/decode.py still runs the reference rows beside the policy rows, through peft's mixed-adapter
batches: `model(..., adapter_names=[...])` applies each row's adapter ("__base__": adapters off for that row;
peft allows it in eval mode, which rollout.generate sets). Everything a family does differently (soft-capped
logits on Gemma 2, sliding-window layers and their cache, GPT-2's learned positions, bitsandbytes kernels) is the
model's own forward, so a family needs no code here. The loop is ours: one prefill, then one token per step.

Positions come from the mask (pefrl.arch.positions_from_mask), as in `generate` and pefrl.forward, so a left-
padded row sees the same positions in the three. Only the last position's logits are computed (logits_to_keep).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from pefrl.arch import positions_from_mask
from pefrl.models import Models

BASE = "__base__"
"""peft's adapter name for 'adapters off on this row'."""


def unsupported_reason(models: Models) -> str | None:
    """Why the generic stepper cannot run these models (None: it can)."""
    model, lm = models.model, models.lm
    if any(isinstance(p, DTensor) for p in lm.parameters()):
        # FSDP all-gathers inside each layer's forward, so every rank must run the same number of steps; the loop
        # stops when this rank's rows end (HF generate synchronises ranks with synced_gpus instead)
        return "FSDP-sharded base (ranks would run different numbers of decode steps)"
    for name, module in lm.named_modules():
        if any(getattr(module, "use_dora", {}).values()):
            return f"{name}: DoRA (peft's mixed-adapter batches do not support it)"
        if getattr(module, "merged_adapters", []):
            return f"{name}: merged adapters"
    if getattr(model.peft_config.get(model.active_adapter), "peft_type", None) != "LORA":
        return "the adapters are not LoRA"
    return None


class MixedStepper:
    """One decode batch of R rows, row r under adapter names[r], through the model's own forward with a cache.
    `prefill` and `step` return (last-position logits (R, V), last hidden states (R, H) or None, None)."""

    def __init__(self, models: Models, names: list[str], with_hidden: bool):
        self.model = models.model
        # one adapter for every row: no mixed batch, the active adapter (the policy) runs as in any forward
        self.names = names if len(set(names)) > 1 else None
        self.with_hidden = with_hidden
        self.cache = self.mask = self.next_pos = None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor):
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, cache=self.cache,
                         use_cache=True, logits_to_keep=1, adapter_names=self.names,
                         output_hidden_states=self.with_hidden)
        self.cache = out.cache
        self.next_pos = positions[:, -1:] + 1  # (R, 1)
        hidden = out.hidden_states[-1][:, -1] if self.with_hidden else None  # (R, H), after the final norm
        return out.logits[:, -1], hidden, None  # (R, V)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor):
        """The prompts ids (R, P), left-padded (mask (R, P))."""
        self.mask = mask
        return self._forward(ids, positions_from_mask(mask))

    def step(self, tokens: torch.Tensor):
        """The next token of every row, tokens (R,): attended to from now on, as generate does, even a pad."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)  # (R, P + t + 1)
        return self._forward(tokens[:, None], self.next_pos)


def row_names(models: Models, policy: str, B: int, with_reference: bool) -> list[str]:
    """Adapter of each decode row: the policy's B rows, then B reference rows (its adapter, or none)."""
    return [policy] * B + ([models.reference or BASE] * B if with_reference else [])

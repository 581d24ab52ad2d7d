"""The generic stepper of pefrl's sampler: any causal LM transformers runs with a KV cache, through its own forward.

Where the lean layer (pefrl/arch/llama.py) does not apply (other families, or a base it cannot read), the
sampler in pefrl/decode.py still runs the reference rows beside the policy rows: each LoRA layer's forward is
routed, for the duration of a step, through the lean layer's `lora_linear`, which calls the base layer's own
forward (nn.Linear, GPT-2's Conv1D, bitsandbytes' Linear4bit / Linear8bitLt) and adds each row group's adapter
on its contiguous rows (None: adapters off). Everything else a family does differently (soft-capped logits on
Gemma 2, sliding-window layers and their cache, GPT-2's learned positions) is the model's own forward, so a
family needs no code here. The loop is ours (pefrl/decode.py): one prefill, then one token per step.

Why not peft's mixed-adapter batches (`model(..., adapter_names=[...])`, "__base__" for adapters off), which do
the same: they gather and scatter each adapter's rows by index in every layer and register their hooks on every
module at every forward; measured slower than generate plus a separate reference forward on the tiny Llama
(docs/benchmarks.md has both).

Positions come from the mask (pefrl.arch.positions_from_mask), as in `generate` and pefrl.forward, so a left-
padded row sees the same positions in the three. Only the last position's logits are computed (logits_to_keep).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from pefrl.arch import is_fsdp_sharded, positions_from_mask
from pefrl.arch.llama import Groups, lora_linear
from pefrl.models import Models

ROUTED_BASES = ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt")
"""Base layers (class names) whose LoRA layer the stepper routes: the base's own forward plus x A^T B^T."""


def unsupported_reason(models: Models) -> str | None:
    """Why the generic stepper cannot run these models (None: it can)."""
    if is_fsdp_sharded(models.lm):
        # FSDP all-gathers inside each layer's forward, so every rank must run the same number of steps; the loop
        # stops when this rank's rows end (HF generate synchronises ranks with synced_gpus instead)
        return "FSDP-sharded base (ranks would run different numbers of decode steps)"
    for name, module in _lora_layers(models.model):
        base = type(module.base_layer).__name__
        if base not in ROUTED_BASES:
            return f"{name}: LoRA on a {base} (routed: {', '.join(ROUTED_BASES)})"
        if any(getattr(module, "use_dora", {}).values()) or any(getattr(module, "lora_bias", {}).values()):
            return f"{name}: DoRA or LoRA bias"
        if getattr(module, "merged_adapters", []):
            return f"{name}: merged adapters"
    return None


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


@contextmanager
def routed(layers: list[nn.Module], groups: Groups) -> Iterator[None]:
    """Within the block each LoRA layer computes lora_linear(x, groups): row group (rows, adapter) with its adapter.
    An instance attribute shadows the class's forward, so deleting it restores peft's."""
    try:
        for module in layers:
            module.forward = partial(lora_linear, module, groups=groups)
        yield
    finally:
        for module in layers:
            module.__dict__.pop("forward", None)


def shared_rows(groups: Groups, first: torch.Tensor, inverse: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, Groups]:
    """For a prefill that runs each distinct prompt once per row group: row groups of B rows each over U
    distinct prompts (pefrl.forward.shared_prompts: first (U,), inverse (B,)) -> (run (copies * U,) the rows
    that run, back (R,) each row's row among them, the row groups of the rows that run)."""
    B, U = len(inverse), len(first)
    run = torch.cat([first + c * B for c in range(len(groups))])
    back = torch.cat([inverse + c * U for c in range(len(groups))])
    return run, back, [(slice(c * U, (c + 1) * U), name) for c, (_, name) in enumerate(groups)]


class GenericStepper:
    """One decode batch of row groups through the model's own forward with a cache. `prefill` and `step` return
    (last-position logits (R, V), last hidden states (R, H) or None, None)."""

    def __init__(self, models: Models, groups: Groups, with_hidden: bool):
        self.model = models.model
        # one group: no routing, the active adapter (the policy) runs as in any forward
        self.layers = [m for _, m in _lora_layers(self.model)] if len(groups) > 1 else []
        self.groups, self.with_hidden = groups, with_hidden
        self.cache = self.mask = self.next_pos = None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, groups: Groups | None = None):
        with routed(self.layers, groups or self.groups):
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, cache=self.cache,
                             use_cache=True, logits_to_keep=1, output_hidden_states=self.with_hidden)
        self.cache = out.cache
        self.next_pos = positions[:, -1:] + 1  # (R, 1)
        hidden = out.hidden_states[-1][:, -1] if self.with_hidden else None  # (R, H), after the final norm
        return out.logits[:, -1], hidden, None  # (R, V)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The prompts ids (R, P), left-padded (mask (R, P)). shared (first (U,), inverse (B,)): as the lean
        stepper's, each row group repeats B rows of U distinct prompts; those run once and the cache is expanded."""
        self.mask = mask
        if shared is None:
            return self._forward(ids, positions_from_mask(mask))
        run, back, groups = shared_rows(self.groups, *shared)
        self.mask = mask[run]
        logits, hidden, _ = self._forward(ids[run], positions_from_mask(self.mask), groups)
        self.cache.batch_select_indices(back)
        self.mask, self.next_pos = mask, self.next_pos[back]
        return logits[back], None if hidden is None else hidden[back], None

    def step(self, tokens: torch.Tensor):
        """The next token of every row, tokens (R,): attended to from now on, as generate does, even a pad."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)  # (R, P + t + 1)
        return self._forward(tokens[:, None], self.next_pos)

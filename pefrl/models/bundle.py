"""The one-base bundle: the frozen base with its named LoRA adapters and the value head (see DESIGN.md).

```
base (frozen) ── adapter "policy"      trained: the actor
              ├─ adapter "critic"      trained, with `value_head` (model.critic='adapter')
              ├─ adapters disabled     the reference policy (default)
              └─ adapter "reference"   frozen LoRA-SFT adapter as reference (model.reference_adapter)
```
With model.critic='shared' the value head reads the policy's own last hidden state (one forward, cheapest).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel

POLICY, CRITIC, REFERENCE = "policy", "critic", "reference"


class ValueHead(nn.Module):
    """Linear(hidden, 1) in fp32 on the last hidden state; init std 1/sqrt(H + 1) as in
    lm-human-preference-details' scalar heads, so initial values are O(1) and the critic adapter gets gradient."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)  # (B, T, H) -> (B, T)


def is_lora(name: str, adapters: Iterable[str] | None = None) -> bool:
    """Whether parameter `name` of a peft model is a LoRA weight (of one of `adapters`; None: of any)."""
    return "lora_" in name and (adapters is None or any(f".{a}." in name for a in adapters))


def lora_parameters(model: nn.Module, adapters: Iterable[str] | None = None) -> list[nn.Parameter]:
    """LoRA parameters of `adapters` (None: every adapter, trained or frozen), in module order."""
    adapters = None if adapters is None else tuple(adapters)
    return [p for n, p in model.named_parameters() if is_lora(n, adapters)]


@dataclass
class Models:
    """The frozen base with its adapters, and the value head. Temperature is the callers' business."""

    model: PeftModel
    """peft model over the frozen base; adapters 'policy' (+ 'critic', + 'reference')."""
    value_head: ValueHead | None
    """Value head (fp32) when the algorithm uses a critic, else None."""
    critic: str
    """'adapter' (own LoRA adapter 'critic' + head), 'shared' (head on the policy trunk) or 'none'."""
    reference: str | None
    """None: the reference is the base with adapters disabled; else the name of a frozen adapter."""
    critic_from: int | None = None
    """Index of the lowest decoder layer the critic adapter adapts (model.critic_layers); below it the critic is
    the frozen base. None: the critic adapter covers every layer (or there is none)."""

    @property
    def lm(self) -> PreTrainedModel:
        """The HF causal LM under peft, LoRA layers injected in place."""
        return self.model.get_base_model()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Policy adapter, critic adapter and value head parameters: all the optimizer may touch."""
        names = (POLICY, CRITIC) if self.critic == "adapter" else (POLICY,)
        params = lora_parameters(self.model, names)
        return params + (list(self.value_head.parameters()) if self.value_head is not None else [])

"""Adapter switching on the one base: `use_adapter`, and activation checkpointing that respects it.

peft's `set_adapter` makes only the active adapter trainable; we train policy and critic adapters together, so
`use_adapter` switches adapters without changing any `requires_grad` flag.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext

from peft import PeftModel

from pefrl.models.bundle import Models


def current_adapter(model: PeftModel) -> str | None:
    """The adapter running now: set by use_adapter (None = disabled), else peft's active one."""
    return getattr(model, "_pefrl_adapter", model.active_adapter)


@contextmanager
def use_adapter(models_or_model: Models | PeftModel, name: str | None) -> Iterator[None]:
    """Run the block with adapter `name` active (None: all adapters disabled, i.e. the base).

    Every requires_grad flag is kept as it was (peft's set_adapter / disable_adapter would freeze the inactive
    adapters); the previous adapter and flags are restored even when the block raises.
    """
    model = models_or_model.model if isinstance(models_or_model, Models) else models_or_model
    if current_adapter(model) == name:  # already active: peft's set_adapter walks every module, skip it
        yield
        return
    flags = {p: p.requires_grad for p in model.parameters()}
    previous, previous_name = model.active_adapter, current_adapter(model)

    def restore_flags() -> None:
        for p, flag in flags.items():
            p.requires_grad_(flag)

    with ExitStack() as stack:
        try:
            if name is None:
                stack.enter_context(model.disable_adapter())
            else:
                if name not in model.peft_config:
                    raise KeyError(f"no adapter {name!r}; adapters: {list(model.peft_config)}")
                model.set_adapter(name)
            restore_flags()
            model._pefrl_adapter = name
            yield
        finally:
            stack.close()  # re-enables adapters if they were disabled
            if model.active_adapter != previous:
                model.set_adapter(previous)
            restore_flags()
            model._pefrl_adapter = previous_name


def enable_checkpointing(model: PeftModel) -> None:
    """Activation checkpointing whose backward recomputes each layer under the adapter that ran its forward.

    Without this, a critic forward recomputed in backward (after use_adapter has switched back to the policy)
    would run through the policy adapter and give the critic wrong gradients. Non-reentrant checkpointing's
    `context_fn` gives the recompute its own context.
    """

    def context_fn():
        forward_adapter = current_adapter(model)  # read at forward time
        return nullcontext(), use_adapter(model, forward_adapter)

    model.get_base_model().activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn}
    )

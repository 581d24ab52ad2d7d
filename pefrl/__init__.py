"""pefrl: parameter-efficient RL fine-tuning of LLMs on LoRA adapters over one frozen base.

Python API (docs/api.md): `pefrl.load_config`, `pefrl.train`, `pefrl.evaluate`, and `pefrl.Config`. They load
on first use (module __getattr__), so `import pefrl` stays cheap: no torch, no transformers.
"""

import sys
import types

__version__ = "0.1.0"
__all__ = ["Config", "evaluate", "load_config", "train"]

_EXPORTS = {"load_config": "pefrl.api", "train": "pefrl.api", "evaluate": "pefrl.api", "Config": "pefrl.config"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'pefrl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _Package(types.ModuleType):
    """Importing a submodule sets it as an attribute of its package, so a module pefrl/evaluate.py would replace
    the function `pefrl.evaluate` once anything imports it. The API names win; `from pefrl.evaluate import x`
    still finds the module in sys.modules."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

"""pefrl: parameter-efficient RL fine-tuning of LLMs on LoRA adapters over one frozen base.

Python API (docs/api.md): `pefrl.load_config`, `pefrl.train`, `pefrl.evaluate`, and `pefrl.Config`. They load
on first use (module __getattr__), so `import pefrl` stays cheap: no torch, no transformers.
"""

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

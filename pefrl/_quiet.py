"""Known third-party noise, silenced in one place; imported by the command line and the Python API.

Each filter matches one exact message from one library, so every other warning (pefrl's own, a real deprecation
in your code, another library's) still shows. Nothing here imports the libraries: the filters are installed
first and catch the messages whenever the libraries load.

- bitsandbytes logs, at import on a CPU with AVX512-BF16, that an optional kernel package is missing
  ("Failed to load CPU gemm_4bit_forward from kernels-community"); bitsandbytes falls back to its own kernel.
- transformers warns that `is_gradient_checkpointing` is deprecated whenever peft reads that property while it
  wraps a model: pefrl never calls it.
"""

from __future__ import annotations

import logging
import warnings

BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
HF_MESSAGE = r"`is_gradient_checkpointing` is deprecated"
HF_MODULE = r"transformers\.modeling_utils"


class _DropPrefix(logging.Filter):
    """Drop the records whose (unformatted) message starts with `prefix`; let every other record through."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Install the filters (idempotent)."""
    logger = logging.getLogger(BNB_LOGGER)
    if not any(isinstance(f, _DropPrefix) for f in logger.filters):
        logger.addFilter(_DropPrefix(BNB_MESSAGE))
    warnings.filterwarnings("ignore", message=HF_MESSAGE, category=FutureWarning, module=HF_MODULE)


install()

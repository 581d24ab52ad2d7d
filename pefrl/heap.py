"""glibc's heap on CPU runs: large blocks in their own mappings (train.mmap_threshold_mib).

Why: glibc serves an allocation under its mmap threshold from its heap, and a freed block there stays with the
process until the top of the heap is free; the threshold itself rises with every large block freed, up to
32 MiB. An update's activations (a few MB each) interleaved with longer-lived tensors so fragment the heap that
the process keeps several hundred MB to GBs more than is live (docs/benchmarks.md, 1B-class bases). A fixed
threshold of 1 MiB gives every larger block its own mapping, unmapped when freed: a page-fault cost per such
allocation, small once the 4-bit weights stop being dequantized into fresh tensors (pefrl.models.linear4bit).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""mallopt's parameter number (glibc malloc.h)."""


def set_mmap_threshold(mib: int) -> bool:
    """Allocations of at least `mib` MiB get their own mmap from now on (glibc's M_MMAP_THRESHOLD, which also
    stops its dynamic threshold). Leaves MALLOC_MMAP_THRESHOLD_ from the environment as it is. False where
    nothing was set: that variable is set, or the C library is not glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    done = mallopt(M_MMAP_THRESHOLD, mib * 2**20) == 1
    logger.debug("glibc mmap threshold %d MiB: %s", mib, "set" if done else "refused")
    return done


AUTO_MIN_PARAMS = 10**9
"""Below this base size the automatic threshold stays off: SmolLM2-135M paid +27% CPU at 4-bit (+36% fp32) for
it, the Qwen2.5-1.5B shape +4-8% for 5.7-5.8 -> 3.8 GB (docs/benchmarks.md, 1B-class bases)."""


def auto_mmap_threshold(quantized: bool, n_params: int, sharded: bool = False) -> int:
    """train.mmap_threshold_mib left empty: 1 MiB for a base of at least AUTO_MIN_PARAMS parameters that is
    4-bit or 8-bit, or sharded by FSDP (memory is why it was quantized or sharded, and the threshold is cheap
    there: the Llama-3.2-1B shape on 2 FSDP ranks, load peak 2650 -> 2481 MiB, step peak 2715-2750 -> 2632,
    43.6 -> 43.0 s a step), else 0 (glibc's own)."""
    return 1 if (quantized or sharded) and n_params >= AUTO_MIN_PARAMS else 0

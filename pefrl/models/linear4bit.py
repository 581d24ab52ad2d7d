"""bitsandbytes' 4-bit linear layer on CPU without a fresh dequantized weight per call.

Why: on CPU, `Linear4bit.forward` (bitsandbytes' default gemm_4bit) dequantizes the whole weight into a new
tensor on every call, and its backward once more: per decode step one per projection (Qwen2.5-1.5B: 27.5 MB for
each MLP projection, 196 calls a step), per update twice that per forward. On glibc's heap those blocks, with
the activations an update keeps between them, fragment it; in their own mappings (train.mmap_threshold_mib,
pefrl.heap) each one is mapped and faulted in afresh: +86% CPU on that model, against +4-8% once they are gone
(docs/benchmarks.md, 1B-class bases). Here each weight is dequantized into one reused buffer per (shape,
dtype), with bitsandbytes' own CPU kernel, and the matmuls run on it: the same kernels on the same values as
Linear4bit.forward and bitsandbytes' MatMul4Bit backward, so the same results to the bit.
`pefrl.models.load` installs it as the forward of every 4-bit layer of a base it loads.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

_SCRATCH: dict[tuple, torch.Tensor] = {}
"""One dequantized weight per (shape, dtype): a few tens of MB for a 1.5B model, kept for the process."""


def linear_4bit(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for a bitsandbytes Linear4bit as its own forward computes it. Any case the CPU kernel does
    not take as it is (CUDA, trainable base weights or bias, an odd layout) runs the class's forward."""
    state = getattr(module.weight, "quant_state", None)
    if not _plain_cpu_case(module, state, x):
        return type(module).forward(module, x)
    # Linear4bit.forward: compute in compute_dtype, bias in it too, result back in the input's dtype
    bias = None if module.bias is None else module.bias.to(module.compute_dtype)
    return _DequantizedMatmul.apply(x.to(module.compute_dtype), module, bias).to(x.dtype)


class _DequantizedMatmul(torch.autograd.Function):
    """y = x W^T + b with W dequantized into the scratch buffer; backward dequantizes again (the buffer is
    overwritten by the next layer, so it is never saved), as bitsandbytes' MatMul4Bit does."""

    @staticmethod
    def forward(ctx, x, module, bias):
        ctx.module = module
        return F.linear(x, _dequantized(module, module.compute_dtype), bias)  # gemm_4bit: in x's dtype

    @staticmethod
    def backward(ctx, grad):
        state = ctx.module.weight.quant_state  # MatMul4Bit.backward: dequantized in the state's dtype, then cast
        return torch.matmul(grad, _dequantized(ctx.module, state.dtype).to(grad.dtype)), None, None


def _plain_cpu_case(module, state, x: torch.Tensor) -> bool:
    return (state is not None and x.device.type == "cpu" and module.compute_type_is_set
            and not module.weight.requires_grad and (module.bias is None or not module.bias.requires_grad)
            and not getattr(state, "packing_format_for_cpu", False) and len(state.shape) == 2
            and state.shape[-1] % 2 == 0 and state.blocksize < 2048  # the CPU kernel's own fallbacks
            and (not state.nested or state.state2.blocksize == 256)
            and _kernel(state.quant_type, module.compute_dtype) is not None
            and _kernel(state.quant_type, state.dtype) is not None)


@functools.cache  # looked up for every 4-bit forward: once per (quant type, dtype) is enough
def _kernel(quant_type: str, dtype: torch.dtype):
    from bitsandbytes.cextension import lib

    suffix = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    return getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{suffix}", None)


def _dequantized(module, dtype: torch.dtype) -> torch.Tensor:
    """The weight (out, in) in `dtype`, in the scratch buffer of its shape: bitsandbytes' CPU kernel
    (backends/cpu/ops.py, dequantize_4bit) given an output instead of allocating one."""
    from bitsandbytes.functional import get_ptr

    state = module.weight.quant_state
    absmax = state.absmax
    if state.nested:  # as gemm_4bit's default implementation: the fp32 block scales from their 8-bit codes
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            state.absmax, state.state2.absmax, state.state2.code, 256, torch.float32) + state.offset
    key = (tuple(state.shape), dtype)
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.empty(key[0], dtype=dtype)
    out, packed, absmax = _SCRATCH[key], module.weight.data.view(torch.uint8), absmax.float()  # alive for the call
    rows, cols = state.shape
    _kernel(state.quant_type, dtype)(get_ptr(packed), get_ptr(absmax), get_ptr(out), ctypes.c_longlong(state.blocksize),
                                     ctypes.c_longlong(rows), ctypes.c_longlong(cols))
    return out

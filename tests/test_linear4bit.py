"""pefrl.models.linear4bit: a bitsandbytes 4-bit layer through a reused dequantization buffer computes exactly what
the layer's own forward computes."""

import bitsandbytes as bnb
import pytest
import torch

from pefrl.models import linear4bit

torch.set_num_threads(1)


def _layer(quant_type: str, double: bool, compute_dtype: torch.dtype, out_features: int = 96) -> bnb.nn.Linear4bit:
    torch.manual_seed(0)
    dense = torch.nn.Linear(128, out_features)
    layer = bnb.nn.Linear4bit(128, out_features, bias=True, compute_dtype=compute_dtype,
                              compress_statistics=double, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double)
    layer.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    layer = layer.to("cpu")  # quantizes
    layer.support_avx512bf16_for_cpu = False  # as pefrl.models.load does: no in-place repacking
    return layer


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_equals_the_layers_own_forward_to_the_bit(quant_type, double, compute_dtype):
    layer = _layer(quant_type, double, compute_dtype)
    x = torch.randn(5, 3, 128)  # fp32 input, as the lean layer's residual stream
    with torch.no_grad():
        ours, theirs = linear4bit.linear_4bit(layer, x), layer(x)
        again = linear4bit.linear_4bit(layer, x + 1)  # the buffer is overwritten, not accumulated
        assert torch.equal(again, layer(x + 1))
    assert ours.dtype == theirs.dtype == x.dtype and torch.equal(ours, theirs)
    assert ((96, 128), compute_dtype) in linear4bit._SCRATCH  # not the layer's forward again


def test_one_buffer_per_shape_and_dtype(monkeypatch):
    monkeypatch.setattr(linear4bit, "_SCRATCH", {})
    a, b, c = _layer("nf4", True, torch.bfloat16), _layer("fp4", False, torch.bfloat16), _layer("nf4", True, torch.bfloat16, 64)
    x = torch.randn(2, 128)
    with torch.no_grad():
        for layer in (a, b, c, a):
            linear4bit.linear_4bit(layer, x)
    assert sorted(linear4bit._SCRATCH) == [((64, 128), torch.bfloat16), ((96, 128), torch.bfloat16)]


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double", [True, False])
def test_gradients_equal_bitsandbytes_backward_to_the_bit(double, compute_dtype):
    layer = _layer("nf4", double, compute_dtype)
    x = torch.randn(4, 128, requires_grad=True)
    ours = linear4bit.linear_4bit(layer, x)
    ours.pow(2).sum().backward()
    ours_grad, x.grad = x.grad, None
    theirs = layer(x)  # bitsandbytes' MatMul4Bit
    theirs.pow(2).sum().backward()
    assert torch.equal(ours, theirs) and torch.equal(ours_grad, x.grad)


def test_a_trainable_bias_takes_the_layers_own_forward(monkeypatch):
    monkeypatch.setattr(linear4bit, "_SCRATCH", {})
    layer = _layer("nf4", True, torch.float32)
    layer.bias.requires_grad_(True)
    linear4bit.linear_4bit(layer, torch.randn(2, 128)).sum().backward()
    assert layer.bias.grad is not None and not linear4bit._SCRATCH

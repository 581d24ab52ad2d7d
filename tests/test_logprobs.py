import math

import pytest
import torch
from torch import nn

from pefrl.ops import logprobs as ops
from pefrl.ops.logprobs import (chunked_logprobs, dense_logprobs, entropy_from_logits, linear_logprobs,
                                 selective_logprobs)
from tests.tolerances import assert_fp32_close


def test_selective_logprobs_hand_worked():
    # logits [0, ln 3] -> softmax [1/4, 3/4]; at temperature 2 the logits halve: [0, ln 3 / 2] -> [1/(1+√3), √3/(1+√3)]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    tokens = torch.tensor([[0, 1]])
    lp = selective_logprobs(logits, tokens)
    assert torch.allclose(lp, torch.tensor([[math.log(0.25), math.log(0.75)]]))
    lp2 = selective_logprobs(logits, tokens, temperature=2.0)
    s3 = math.sqrt(3.0)
    assert torch.allclose(lp2, torch.tensor([[math.log(1 / (1 + s3)), math.log(s3 / (1 + s3))]]))


def test_entropy_hand_worked():
    # uniform over 4 tokens: ln 4; [1/4, 3/4]: -(1/4 ln 1/4 + 3/4 ln 3/4)
    logits = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [0.0, math.log(3.0), -math.inf, -math.inf]]])
    ent = entropy_from_logits(logits)
    expected = [math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    assert torch.allclose(ent, torch.tensor([expected]), atol=1e-6)
    # temperature -> large flattens the distribution towards uniform over all 4 finite logits
    assert entropy_from_logits(logits[:, :1] * 5, temperature=1e6).item() == pytest.approx(math.log(4.0), abs=1e-5)


def test_selective_matches_dense_in_bf16_and_many_rows():
    torch.manual_seed(0)
    logits = (torch.randn(3, 2000, 50) * 4).to(torch.bfloat16)  # 6000 rows: crosses the row-chunk boundary
    tokens = torch.randint(0, 50, (3, 2000))
    assert torch.allclose(selective_logprobs(logits, tokens, 0.7), dense_logprobs(logits, tokens, 0.7), atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_equals_dense_with_grads(chunk_size, with_entropy):
    torch.manual_seed(0)
    B, T, H, V = 2, 7, 8, 11
    head = nn.Linear(H, V, bias=False)
    hidden = torch.randn(B, T, H, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    weights = torch.randn(B, T)  # an arbitrary downstream loss so every position's gradient matters

    dense_logits = head(hidden)  # (B, T, V)
    lp_ref = dense_logprobs(dense_logits, tokens, 0.8)
    ent_ref = entropy_from_logits(dense_logits, 0.8)
    loss_ref = (lp_ref * weights).sum() + (ent_ref.sum() if with_entropy else 0)
    g_hidden_ref, g_head_ref = torch.autograd.grad(loss_ref, (hidden, head.weight))

    lp, ent = chunked_logprobs(hidden, head, tokens, 0.8, chunk_size, with_entropy)
    K = H * V * B * T  # the head's matmul, the softmax over V, the gradients' sum over tokens (tests/tolerances.py)
    assert_fp32_close(lp, lp_ref, k=K)
    assert (ent is not None) == with_entropy
    loss = (lp * weights).sum()
    if with_entropy:
        assert_fp32_close(ent, ent_ref, k=K)
        loss = loss + ent.sum()
    g_hidden, g_head = torch.autograd.grad(loss, (hidden, head.weight))
    assert_fp32_close(g_hidden, g_hidden_ref, k=K)
    assert_fp32_close(g_head, g_head_ref, k=K)


def test_chunked_without_grad_and_bad_chunk():
    head = nn.Linear(4, 5)
    hidden = torch.randn(1, 3, 4)
    tokens = torch.tensor([[0, 4, 2]])
    with torch.no_grad():
        lp, ent = chunked_logprobs(hidden, head, tokens, 1.0, 2, False)
        assert ent is None
        assert torch.allclose(lp, dense_logprobs(head(hidden), tokens), atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_logprobs(hidden, head, tokens, 1.0, 0, False)


def test_chunked_keeps_no_logits_for_backward():
    # Under checkpointing the graph keeps the (chunk, H) inputs, never (chunk, V) logits.
    B, T, H, V = 2, 8, 4, 1000
    head = nn.Linear(H, V)
    hidden = torch.randn(B, T, H, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))

    def largest_saved(fn):
        sizes = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return max(sizes)

    assert largest_saved(lambda: chunked_logprobs(hidden, head, tokens, 1.0, 4, True)) < 4 * V
    assert largest_saved(lambda: dense_logprobs(head(hidden), tokens)) >= B * T * V  # what it avoids


def test_linear_logprobs_hand_worked():
    # hidden [1, 0] against weight rows [0, 0], [ln 3, 0]: logits [0, ln 3] -> softmax [1/4, 3/4].
    # d log p_1 / d hidden = w_1 - sum_v p_v w_v = [ln 3, 0] - 3/4 [ln 3, 0] = [ln 3 / 4, 0]
    hidden = torch.tensor([[1.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    lp = linear_logprobs(hidden, weight, torch.tensor([1]))
    assert lp.item() == pytest.approx(math.log(0.75))
    lp.sum().backward()
    torch.testing.assert_close(hidden.grad, torch.tensor([[math.log(3.0) / 4, 0.0]]))


@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 1.0), (torch.float32, 0.7), (torch.bfloat16, 0.7)])
def test_linear_logprobs_equal_autograd_through_the_head(dtype, temperature, monkeypatch):
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 3 * 13)  # row chunks of 3: the last one is short
    torch.manual_seed(0)
    N, H, V = 10, 6, 13
    hidden = torch.randn(N, H, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, dtype=dtype, requires_grad=True)
    tokens = torch.randint(0, V, (N,))
    upstream = torch.randn(N)  # an arbitrary downstream loss, so every row's gradient matters

    expected = dense_logprobs((hidden @ weight.t())[None], tokens[None], temperature)[0]
    g_hidden, g_weight = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    lp = linear_logprobs(hidden, weight, tokens, temperature)
    assert lp.dtype == torch.float32
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lp, expected, **tol)
    got_hidden, got_weight = torch.autograd.grad((lp * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(got_hidden, g_hidden, **tol)
    torch.testing.assert_close(got_weight, g_weight, **tol)


def test_linear_logprobs_refuses_a_second_backward_and_bad_shapes():
    hidden = torch.randn(4, 3, requires_grad=True)
    lp = linear_logprobs(hidden, torch.randn(5, 3), torch.tensor([0, 1, 2, 4]))
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        lp.sum().backward()
    with pytest.raises(ValueError, match="hidden must be"):
        linear_logprobs(hidden[None], torch.randn(5, 3), torch.tensor([[0, 1, 2, 4]]))

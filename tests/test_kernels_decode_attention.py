"""Decode (flash-decoding) kernel: a few new queries against a KV cache, vs full attention over the cache."""

import math

import pytest
import torch

import fastgpt
from fastgpt import ops
from helpers import TOLERANCES, kernel_device, rel_err

DEVICE = kernel_device()


pytestmark = [pytest.mark.usefixtures("forced_triton"), pytest.mark.kernels]


def _bottom_right_reference(q, k, v):
    """float64 attention where query i (of q_len) sits at position kv_len − q_len + i."""
    q_len, kv_len, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(diagonal=kv_len - q_len)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v.double()


@pytest.mark.parametrize("q_len,kv_len,d,dtype", [
    (1, 1, 64, torch.float32), (1, 5, 64, torch.float32), (1, 200, 64, torch.float32),
    (3, 64, 64, torch.float32), (16, 130, 32, torch.float32), (7, 7, 128, torch.float16),
    (1, 150, 64, torch.float16), (4, 90, 64, torch.float16),
], ids=str)
def test_decode_matches_full_attention_over_a_strided_cache(q_len, kv_len, d, dtype):
    b, h, capacity = 2, 3, 256
    g = torch.Generator().manual_seed(kv_len)
    # A preallocated cache, filled up to kv_len: the kernel reads strided views of it.
    k_cache = torch.randn(b, h, capacity, d, generator=g).to(dtype).to(DEVICE)
    v_cache = torch.randn(b, h, capacity, d, generator=g).to(dtype).to(DEVICE)
    k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
    q = torch.randn(b, q_len, h, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2)  # projection layout
    with torch.no_grad():
        out = ops.cached_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, _bottom_right_reference(q, k, v)) <= TOLERANCES[dtype][0]
    # Equal lengths are a fresh prefill: ops.cached_attention hands them to causal attention.
    assert ops.dispatch_counts == {("causal_attention" if q_len == kv_len else "cached_attention", "triton"): 1}


def test_decode_agrees_with_the_eager_cached_attention():
    q, k, v = (torch.randn(1, 2, n, 64, device=DEVICE) for n in (2, 77, 77))
    with torch.no_grad():
        fused = ops.cached_attention(q, k, v)
        with fastgpt.use_backend("eager"):
            eager = ops.cached_attention(q, k, v)
    assert rel_err(fused, eager) <= 1e-5


def test_decode_refuses_what_it_cannot_do_when_forced():
    q, k, v = (torch.randn(1, 2, n, 64, device=DEVICE) for n in (41, 40, 40))
    with torch.no_grad(), pytest.raises(fastgpt.BackendError, match="41 query tokens over 40 cached positions"):
        ops.cached_attention(q, k, v)
    q1 = torch.randn(1, 2, 1, 64, device=DEVICE, requires_grad=True)
    with pytest.raises(fastgpt.BackendError, match="no backward"):
        ops.cached_attention(q1, k, v)


def test_auto_uses_eager_for_cpu_decoding():
    fastgpt.set_backend("auto")
    q, k, v = (torch.randn(1, 2, n, 64) for n in (1, 9, 9))
    with torch.no_grad():
        ops.cached_attention(q, k, v)
    assert ops.dispatch_counts == {("cached_attention", "eager"): 1}

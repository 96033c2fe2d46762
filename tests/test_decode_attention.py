"""Decode (flash-decoding) kernel: a few new queries against a KV cache, vs full attention over the cache;
hypothesis properties over shapes and dtypes; half-precision queries under autocast."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastgpt
from catalogue_launches import launches_in_the_catalogue
from fastgpt import ops
from helpers import TOLERANCES, kernel_device, rel_err
from op_cases import DOT_DTYPES, HALF_DTYPES, assert_triton_ran, bottom_right_reference, fresh_counts, kernel_settings

DEVICE = kernel_device()


pytestmark = [pytest.mark.usefixtures("forced_triton"), pytest.mark.kernels]


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
    assert rel_err(out, bottom_right_reference(q, k, v)) <= TOLERANCES[dtype][0]
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


# ---------------------------------------------------------------- properties (hypothesis)

@kernel_settings(8)
@given(b=st.integers(1, 2), h=st.integers(1, 2), q_len=st.integers(1, 16), extra=st.integers(1, 150),
       d=st.sampled_from([32, 64]), dtype=st.sampled_from(DOT_DTYPES), seed=st.integers(0, 2**16))
def test_decode_attention_matches_float64(b, h, q_len, extra, d, dtype, seed):
    fresh_counts()
    kv_len = q_len + extra
    g = torch.Generator().manual_seed(seed)
    # A preallocated cache filled to kv_len (strided views), queries in the projection layout.
    k_cache, v_cache = (torch.randn(b, h, kv_len + 7, d, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
    q = torch.randn(b, q_len, h, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    with launches_in_the_catalogue(), torch.no_grad():
        out = ops.cached_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, bottom_right_reference(q, k, v)) <= TOLERANCES[dtype][0]
    assert_triton_ran("cached_attention")


# ---------------------------------------------------------------- mixed precision

@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_decode_attention_takes_half_queries_against_the_float32_cache(dtype):
    # Generating under autocast: the queries come from a Linear (half precision),
    # the KV cache keeps the model's float32.
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 32, generator=g).to(dtype).to(DEVICE)[None]  # (1, 2, 3, 32): 3 new tokens
    k, v = (torch.randn(1, 2, 40, 32, generator=g).to(DEVICE) for _ in range(2))
    with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype):
        with launches_in_the_catalogue() as launched:
            out = ops.cached_attention(q, k, v)
        with fastgpt.use_backend("eager"):
            eager = ops.cached_attention(q, k, v)
    assert launched and ops.dispatch_counts[("cached_attention", "triton")] == 1
    assert out.dtype == eager.dtype == dtype
    assert rel_err(out, bottom_right_reference(q, k, v)) <= TOLERANCES[dtype][0]

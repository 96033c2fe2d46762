"""Causal attention: fastgpt's Triton kernels vs F.scaled_dot_product_attention vs an eager reference.

TFLOP/s counts 4·B·H·T²·d for a forward (two matmuls), halved for causal
masking, and ×2.5 for forward+backward. Decode counts GB/s of K and V read
once. GPU targets (H100, bf16, d = 64, causal, T = 1k–8k): forward ≥ 1.3× SDPA
and ≥ 350 TFLOP/s at T ≥ 4k; backward ≥ 1.2× SDPA; decode at batch 8 with a
1k–8k cache ≥ 70% of HBM bandwidth.

    pytest benchmarks/test_attention_speed.py --benchmark-group-by=group --benchmark-json out.json
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastgpt import ops
from timing import ON_GPU, record_bandwidth, synchronized

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
HEAD_DIM = 64
# (batch, heads, T): about 16k tokens per call on a GPU; tiny on the CPU.
SHAPES = [(16, 12, 1024), (8, 12, 2048), (4, 12, 4096), (2, 12, 8192)] if ON_GPU else [(1, 4, 128)]
DECODE_CACHE = [1024, 2048, 4096, 8192] if ON_GPU else [256]
IMPLEMENTATIONS = ["triton", "sdpa", "eager reference"] if ON_GPU else ["sdpa", "eager reference"]


def _eager_reference(q, k, v):
    """The seed's attention: scores, masked softmax, weights @ v (a T×T matrix in memory)."""
    t = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v


def _attention(impl):
    if impl == "triton":
        def run(q, k, v):
            with ops.use_backend("triton"):
                return ops.causal_attention(q, k, v)
        return run
    if impl == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return _eager_reference


def _qkv(b, h, t, grad=False):
    return [torch.randn(b, h, t, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=grad) for _ in range(3)]


def _record_tflops(benchmark, flops):
    benchmark.extra_info["TFLOP/s"] = round(flops / benchmark.stats.stats.median / 1e12, 2)
    benchmark.extra_info.update(dtype=str(DTYPE), device=str(DEVICE))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}xH{}xT{}".format(*s))
def test_attention_forward(benchmark, impl, shape):
    b, h, t = shape
    benchmark.group = f"attention fwd B{b} H{h} T{t} d{HEAD_DIM}"
    q, k, v = _qkv(b, h, t)
    attention = _attention(impl)
    run = synchronized(lambda: attention(q, k, v), DEVICE)
    run()
    benchmark.pedantic(run, rounds=20 if ON_GPU else 3, warmup_rounds=2)
    _record_tflops(benchmark, 0.5 * 4 * b * h * t * t * HEAD_DIM)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}xH{}xT{}".format(*s))
def test_attention_forward_backward(benchmark, impl, shape):
    b, h, t = shape
    benchmark.group = f"attention fwd+bwd B{b} H{h} T{t} d{HEAD_DIM}"
    q, k, v = _qkv(b, h, t, grad=True)
    do = torch.randn(b, h, t, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    attention = _attention(impl)
    run = synchronized(lambda: attention(q, k, v).backward(do), DEVICE)
    run()
    benchmark.pedantic(run, rounds=10 if ON_GPU else 3, warmup_rounds=2)
    _record_tflops(benchmark, 2.5 * 0.5 * 4 * b * h * t * t * HEAD_DIM)


DECODE_IMPLEMENTATIONS = ["triton", "sdpa"] if ON_GPU else ["sdpa"]


@pytest.mark.parametrize("impl", DECODE_IMPLEMENTATIONS)
@pytest.mark.parametrize("cache_len", DECODE_CACHE)
def test_decode_attention(benchmark, impl, cache_len):
    b, h = 8, 12
    benchmark.group = f"decode B{b} H{h} cache{cache_len} d{HEAD_DIM}"
    q = torch.randn(b, h, 1, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(b, h, cache_len, HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in range(2))

    def step():
        with torch.inference_mode():
            if impl == "triton":
                with ops.use_backend("triton"):
                    return ops.cached_attention(q, k, v)
            return F.scaled_dot_product_attention(q, k, v)

    run = synchronized(step, DEVICE)
    run()
    benchmark.pedantic(run, rounds=50 if ON_GPU else 5, warmup_rounds=3)
    record_bandwidth(benchmark, 2 * k.numel() * k.element_size())
    benchmark.extra_info.update(dtype=str(DTYPE), device=str(DEVICE))

"""Causal attention: fastgpt's Triton kernels vs F.scaled_dot_product_attention -- PyTorch's own choice
and each of its FLASH, CUDNN and EFFICIENT backends forced -- vs an eager reference.

TFLOP/s counts 4·B·H·T²·d·½ for a causal forward (two matmuls), 2.5× that for the
backward alone and 3.5× for forward + backward (benchmarks/peers.py). Dropout 0
and 0.1 (GPT-2's training rate). Decode counts GB/s of K and V read once. GPU
targets (H100/H200, bf16, d = 64, T = 1k–8k): forward ≥ 1.0× SDPA's FLASH backend
and ≥ 0.8× its CUDNN backend, backward ≥ 1.0× FLASH, dropout 0.1 costing ≤ 25%
over p = 0; decode at batch 8 with a 1k–8k cache ≥ 70% of the copy bandwidth.

    pytest benchmarks/test_attention_speed.py --benchmark-group-by=group --benchmark-json out.json
"""

import math

import pytest
import torch
import torch.nn.functional as F

import peers
from fastgpt import ops
from timing import ON_GPU, record_bandwidth, synchronized

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
HEAD_DIM = 64
# (batch, heads, T): about 16k tokens per call on a GPU; tiny on the CPU.
SHAPES = [(16, 12, 1024), (8, 12, 2048), (4, 12, 4096), (2, 12, 8192)] if ON_GPU else [(1, 4, 128)]
DECODE_CACHE = [1024, 2048, 4096, 8192] if ON_GPU else [256]
# Without a GPU: SDPA's CPU kernel and the eager reference (Triton's interpreter is not a speed,
# and the forced FLASH / CUDNN / EFFICIENT backends are CUDA kernels).
IMPLEMENTATIONS = [*peers.ATTENTION_IMPLEMENTATIONS, "eager reference"] if ON_GPU else ["sdpa", "eager reference"]
DROPOUT = [0.0, 0.1]
MODES = ["fwd", "bwd", "fwd+bwd"]


def _eager_reference(q, k, v, dropout_p):
    """The seed's attention: scores, masked softmax, dropout, weights @ v (a T×T matrix in memory)."""
    t = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    weights = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    return F.dropout(weights, dropout_p) @ v


def _attention(impl, dropout_p):
    if impl == "eager reference":
        return lambda q, k, v: _eager_reference(q, k, v, dropout_p)
    return peers.attention(impl, dropout_p)


def _qkv(b, h, t):
    return [torch.randn(b, h, t, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dropout_p", DROPOUT, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}xH{}xT{}".format(*s))
def test_attention(benchmark, impl, shape, dropout_p, mode):
    b, h, t = shape
    benchmark.group = f"attention {mode} B{b} H{h} T{t} d{HEAD_DIM} p{dropout_p}"
    q, k, v = _qkv(b, h, t)
    do = torch.randn(b, h, t, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    attention = _attention(impl, dropout_p)
    try:
        run = synchronized(peers.attention_step(attention, q, k, v, do, mode), DEVICE)
        run()
    except RuntimeError as error:
        if not impl.startswith("sdpa-"):
            raise
        # A forced SDPA backend that does not take this case (dtype, dropout, GPU): a peer, not ours.
        pytest.skip(f"{impl} does not run this case: {str(error).splitlines()[0]}")
    benchmark.pedantic(run, rounds=20 if ON_GPU else 3, warmup_rounds=2)
    benchmark.extra_info["TFLOP/s"] = round(peers.attention_flops(b, h, t, HEAD_DIM, mode)
                                            / benchmark.stats.stats.median / 1e12, 2)
    benchmark.extra_info.update(impl=impl, mode=mode, dropout=dropout_p, dtype=str(DTYPE), device=str(DEVICE))


DECODE_IMPLEMENTATIONS = ["fastgpt", "sdpa"] if ON_GPU else ["sdpa"]


@pytest.mark.parametrize("impl", DECODE_IMPLEMENTATIONS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("cache_len", DECODE_CACHE)
def test_decode_attention(benchmark, impl, batch, cache_len):
    h = 12
    benchmark.group = f"decode B{batch} H{h} cache{cache_len} d{HEAD_DIM}"
    q = torch.randn(batch, h, 1, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(batch, h, cache_len, HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in range(2))

    def step():
        with torch.inference_mode():
            if impl == "fastgpt":
                with ops.use_backend("triton", op="cached_attention"):
                    return ops.cached_attention(q, k, v)
            return F.scaled_dot_product_attention(q, k, v)

    run = synchronized(step, DEVICE)
    run()
    benchmark.pedantic(run, rounds=50 if ON_GPU else 5, warmup_rounds=3)
    record_bandwidth(benchmark, peers.decode_bytes(batch, h, cache_len, HEAD_DIM, q.element_size()))
    benchmark.extra_info.update(impl=impl, dtype=str(DTYPE), device=str(DEVICE))

"""Kernel-level implementations compared side by side, and what each moves or computes.

Used by the pytest-benchmark kernel suites and by gpu_check.py, so both time
the same things and count them the same way:

* attention: fastgpt's Triton kernels, ``F.scaled_dot_product_attention`` with
  PyTorch's own backend choice, and each SDPA backend forced on its own
  (FLASH, CUDNN, EFFICIENT) through ``torch.nn.attention.sdpa_kernel``;
* FLOPs of causal attention: forward 4·B·H·T²·d·½, backward alone 2.5× that,
  forward + backward 3.5×;
* bytes of the memory-bound ops, each input read once and each output written
  once (parameters and per-row statistics are small and left out).
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F

from fastgpt import ops

SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
ATTENTION_IMPLEMENTATIONS = ("fastgpt", "sdpa") + tuple(f"sdpa-{b.split('_')[0].lower()}" for b in SDPA_BACKENDS)
FLOP_FACTORS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def _sdpa_backend(impl: str):
    """The SDPBackend an implementation name forces, or None for PyTorch's own choice."""
    if impl == "sdpa":
        return None
    from torch.nn.attention import SDPBackend
    name = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
            "sdpa-efficient": "EFFICIENT_ATTENTION"}[impl]
    return getattr(SDPBackend, name)


def attention(impl: str, dropout_p: float = 0.0):
    """A function (q, k, v) -> causal attention output for one implementation."""
    if impl == "fastgpt":
        def run(q, k, v):
            with ops.use_backend("triton", op="causal_attention"):
                return ops.causal_attention(q, k, v, dropout_p=dropout_p)
        return run
    backend = _sdpa_backend(impl)

    def run(q, k, v):
        scope = contextlib.nullcontext()
        if backend is not None:
            from torch.nn.attention import sdpa_kernel
            scope = sdpa_kernel([backend])
        with scope:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    return run


def attention_step(attention, q, k, v, do, mode: str):
    """A zero-argument callable timing one ``mode`` of ``attention``: "fwd" (no autograd), "bwd" (the
    backward alone, of one saved forward) or "fwd+bwd". Building it runs the saved forward for "bwd"."""
    import torch
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return attention(q, k, v)
    elif mode == "bwd":
        saved = attention(q, k, v)

        def step():
            return torch.autograd.grad(saved, (q, k, v), do, retain_graph=True)
    else:
        def step():
            return torch.autograd.grad(attention(q, k, v), (q, k, v), do)
    return step


def attention_flops(b: int, h: int, t: int, d: int, mode: str) -> float:
    return 4 * b * h * t * t * d * 0.5 * FLOP_FACTORS[mode]


def decode_bytes(b: int, h: int, s: int, d: int, itemsize: int) -> int:
    """One decoding step: K and V read once (the query and output are one row each)."""
    return 2 * b * h * s * d * itemsize + 2 * b * h * d * itemsize


# Bytes per element of (rows × width) for the memory-bound ops, forward and backward.
ELEMENTWISE_PASSES = {
    ("layer_norm", "fwd"): 2,               # read x, write y
    ("layer_norm", "bwd"): 3,               # read dy, x; write dx
    ("dropout_add_layer_norm", "fwd"): 4,   # read x, branch; write h, y
    ("dropout_add_layer_norm", "bwd"): 5,   # read dh, dy, h; write dx, dbranch
    ("bias_gelu", "fwd"): 2,                # read z; write y
    ("bias_gelu", "bwd"): 3,                # read dy, z; write dz
}


def elementwise_bytes(op: str, direction: str, rows: int, width: int, itemsize: int) -> int:
    return ELEMENTWISE_PASSES[(op, direction)] * rows * width * itemsize


def elementwise_op(op: str, backend: str):
    """A function of the op's inputs for LayerNorm (x, w, b), dropout+add+LayerNorm (x, branch, w, b;
    p = 0.1) or bias+GELU (z, bias), run with fastgpt's backend ``backend`` ("triton" or "eager")."""
    if op == "layer_norm":
        def run(x, w, b):
            with ops.use_backend(backend):
                return ops.layer_norm(x, w, b, 1e-5)
    elif op == "dropout_add_layer_norm":
        def run(x, branch, w, b):
            with ops.use_backend(backend):
                h, y = ops.dropout_add_layer_norm(x, branch, w, b, 1e-5, 0.1)
            return h, y
    elif op == "bias_gelu":  # the pointwise half of ops.linear_gelu: bias add + GELU
        def run(z, bias):
            if backend == "eager":
                return F.gelu(z + bias, approximate="tanh")
            from fastgpt.kernels.gelu import gelu_op  # imports Triton: only where the kernel runs
            return gelu_op(z, bias)
    else:
        raise ValueError(f"unknown op {op!r}")
    return run

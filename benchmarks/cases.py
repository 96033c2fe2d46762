"""Kernel-level benchmark cases, shared by the op suites (``test_op_*.py``) and ``gpu_check.py``.

A case is one implementation at one shape: its record (what ``bench.jsonl``
and pytest-benchmark's ``extra_info`` hold), a builder that allocates random
inputs (never zeros) and returns the zero-argument step to time, and the work
of one step, so the suites and the GPU check time the same things and count
them the same way:

* attention: fastgpt's Triton kernels, ``F.scaled_dot_product_attention`` with
  PyTorch's own backend choice, each SDPA backend forced on its own (FLASH,
  CUDNN, EFFICIENT) through ``torch.nn.attention.sdpa_kernel``, and the seed's
  eager attention (a T×T matrix in memory);
* FLOPs of causal attention: forward 4·B·H·T²·d·½, backward alone 2.5× that,
  forward + backward 3.5×;
* decode attention: one query row against a K/V cache, GB/s of K and V read once;
* the memory-bound ops (LayerNorm, dropout + add + LayerNorm, bias + GELU):
  bytes with each input read once and each output written once (parameters and
  per-row statistics are small and left out), forward, backward alone and both;
* the ceilings gpu_check.py measures beside them: copy bandwidth and a GEMM.

Sizes: GPU-sized on CUDA (bfloat16), tiny in float32 without one (CI proves
the harness, the interpreter or eager PyTorch runs the step).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from fastgpt import ops

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
COMPILE_BACKEND = "inductor" if ON_GPU else "aot_eager"  # inductor's C++ build takes ~40 s a graph on a CPU
HEAD_DIM = 64

# (batch, heads, T): about 16k tokens per call on a GPU; tiny on the CPU.
ATTENTION_SHAPES = [(16, 12, 1024), (8, 12, 2048), (4, 12, 4096), (2, 12, 8192)] if ON_GPU else [(1, 2, 64)]
DROPOUTS = (0.0, 0.1)  # GPT-2's training rate
MODES = ("fwd", "bwd", "fwd+bwd")
# (batch, cache length) of one decoding step, GPT-2 small's 12 heads.
DECODE_SHAPES = [(b, s) for b in (1, 8) for s in (1024, 2048, 4096, 8192)] if ON_GPU else [(1, 128)]
DECODE_HEADS = 12
ELEMENTWISE_ROWS = 8192 if ON_GPU else 64
ELEMENTWISE_WIDTHS = [768, 1024, 1280, 1600] if ON_GPU else [768]  # GPT-2 small to XL

SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
ATTENTION_IMPLEMENTATIONS = ("fastgpt", "sdpa") + tuple(f"sdpa-{b.split('_')[0].lower()}" for b in SDPA_BACKENDS)
EAGER_REFERENCE = "eager reference"
FLOP_FACTORS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
DECODE_IMPLEMENTATIONS = ("fastgpt", "sdpa")
ELEMENTWISE_OPS = ("layer_norm", "dropout_add_layer_norm", "bias_gelu")
ELEMENTWISE_IMPLEMENTATIONS = ("fastgpt", "eager", "torch.compile")


@dataclass
class Case:
    record: dict                                  # kind, impl, shape, dtype: a bench.jsonl line without timings
    build: Callable[[], Callable[[], object]]     # allocates the inputs, returns the step to time
    work: float                                   # of one step: FLOPs (unit TFLOP/s) or bytes (unit GB/s)
    unit: str

    def rate(self, seconds: float) -> float:
        return self.work / seconds / (1e12 if self.unit == "TFLOP/s" else 1e9)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def case_id(case: Case) -> str:
    """A pytest id: the record's values that vary between cases."""
    r = case.record
    if r["kind"] == "attention":
        return f"B{r['B']}xH{r['H']}xT{r['T']}-{r['impl']}-p{r['dropout']}-{r['mode']}"
    if r["kind"] == "decode":
        return f"B{r['B']}-S{r['S']}-{r['impl']}"
    if r["kind"] == "elementwise":
        return f"{r['op']}-{r['direction']}-{r['rows']}x{r['width']}-{r['impl']}"
    return f"{r['kind']}-{r.get('name', '')}"


def group(case: Case) -> str:
    """A pytest-benchmark group: one shape, every implementation of it."""
    r = case.record
    if r["kind"] == "attention":
        return f"attention {r['mode']} B{r['B']} H{r['H']} T{r['T']} d{r['d']} p{r['dropout']}"
    if r["kind"] == "decode":
        return f"decode B{r['B']} H{r['H']} cache{r['S']} d{r['d']}"
    return f"{r['op']} {r['direction']} {r['rows']}x{r['width']}"


# =============================================================================
# Causal attention
# =============================================================================

def _sdpa_backend(impl: str):
    """The SDPBackend an implementation name forces, or None for PyTorch's own choice."""
    if impl == "sdpa":
        return None
    from torch.nn.attention import SDPBackend
    name = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
            "sdpa-efficient": "EFFICIENT_ATTENTION"}[impl]
    return getattr(SDPBackend, name)


def eager_reference(q, k, v, dropout_p: float = 0.0):
    """The seed's attention: scores, masked softmax, dropout, weights @ v (a T×T matrix in memory)."""
    t = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    weights = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    return F.dropout(weights, dropout_p) @ v


def attention(impl: str, dropout_p: float = 0.0):
    """A function (q, k, v) -> causal attention output for one implementation."""
    if impl == "fastgpt":
        def run(q, k, v):
            with ops.use_backend("triton", op="causal_attention"):
                return ops.causal_attention(q, k, v, dropout_p=dropout_p)
        return run
    if impl == EAGER_REFERENCE:
        return lambda q, k, v: eager_reference(q, k, v, dropout_p)
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


def attention_cases(shapes=ATTENTION_SHAPES, impls: Iterable[str] = ATTENTION_IMPLEMENTATIONS,
                    dropouts=DROPOUTS, modes=MODES, d: int = HEAD_DIM, device=DEVICE, dtype=DTYPE) -> list[Case]:
    cases = []
    for (b, h, t), p in ((shape, p) for shape in shapes for p in dropouts):
        for impl in impls:
            for mode in modes:
                def build(b=b, h=h, t=t, p=p, impl=impl, mode=mode):
                    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True)
                               for _ in range(3))
                    do = torch.randn(b, h, t, d, device=device, dtype=dtype)
                    return attention_step(attention(impl, p), q, k, v, do, mode)
                record = {"kind": "attention", "impl": impl, "mode": mode, "B": b, "H": h, "T": t, "d": d,
                          "dtype": _dtype_name(dtype), "dropout": p}
                cases.append(Case(record, build, attention_flops(b, h, t, d, mode), "TFLOP/s"))
    return cases


# =============================================================================
# Decode attention: one new query row against the KV cache
# =============================================================================

def decode_bytes(b: int, h: int, s: int, d: int, itemsize: int) -> int:
    """One decoding step: K and V read once (the query and output are one row each)."""
    return 2 * b * h * s * d * itemsize + 2 * b * h * d * itemsize


def decode_step(impl: str, q, k, v):
    def step():
        with torch.inference_mode():
            if impl == "fastgpt":
                with ops.use_backend("triton", op="cached_attention"):
                    return ops.cached_attention(q, k, v)
            return F.scaled_dot_product_attention(q, k, v)
    return step


def decode_cases(shapes=DECODE_SHAPES, impls: Iterable[str] = DECODE_IMPLEMENTATIONS, h: int = DECODE_HEADS,
                 d: int = HEAD_DIM, device=DEVICE, dtype=DTYPE) -> list[Case]:
    cases = []
    itemsize = torch.empty((), dtype=dtype).element_size()
    for b, s in shapes:
        for impl in impls:
            def build(b=b, s=s, impl=impl):
                q = torch.randn(b, h, 1, d, device=device, dtype=dtype)
                k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype) for _ in range(2))
                return decode_step(impl, q, k, v)
            record = {"kind": "decode", "impl": impl, "B": b, "H": h, "S": s, "d": d, "dtype": _dtype_name(dtype)}
            cases.append(Case(record, build, decode_bytes(b, h, s, d, itemsize), "GB/s"))
    return cases


# =============================================================================
# Memory-bound ops: LayerNorm, dropout + add + LayerNorm, bias + GELU
# =============================================================================

# Bytes per element of (rows × width), forward and backward alone (forward + backward: their sum).
ELEMENTWISE_PASSES = {
    ("layer_norm", "fwd"): 2,               # read x, write y
    ("layer_norm", "bwd"): 3,               # read dy, x; write dx
    ("dropout_add_layer_norm", "fwd"): 4,   # read x, branch; write h, y
    ("dropout_add_layer_norm", "bwd"): 5,   # read dh, dy, h; write dx, dbranch
    ("bias_gelu", "fwd"): 2,                # read z; write y
    ("bias_gelu", "bwd"): 3,                # read dy, z; write dz
}


def elementwise_bytes(op: str, direction: str, rows: int, width: int, itemsize: int) -> int:
    passes = sum(ELEMENTWISE_PASSES[(op, part)] for part in direction.split("+"))
    return passes * rows * width * itemsize


def elementwise_width(op: str, width: int) -> int:
    """The activation's width: bias + GELU runs on the FeedForward's 4·width hidden layer."""
    return 4 * width if op == "bias_gelu" else width


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
    elif op == "bias_gelu":  # the pointwise half of ops.linear_gelu: bias add + GELU, without the matmul
        def run(z, bias):
            if backend == "eager":
                return F.gelu(z + bias, approximate="tanh")
            from fastgpt.kernels.gelu import gelu_op  # imports Triton: only where the kernel runs
            return gelu_op(z, bias)
    else:
        raise ValueError(f"unknown op {op!r}")
    return run


_compiled: dict = {}


def elementwise_fn(op: str, impl: str, compile_backend: str = COMPILE_BACKEND):
    """``elementwise_op`` for an implementation: fastgpt (Triton), eager, or torch.compile of eager.
    A compiled function is kept until another is asked for (one compile for its fwd and bwd cases)."""
    if impl != "torch.compile":
        return elementwise_op(op, "triton" if impl == "fastgpt" else "eager")
    key = (op, compile_backend)
    if key not in _compiled:
        _compiled.clear()
        torch._dynamo.reset()
        _compiled[key] = torch.compile(elementwise_op(op, "eager"), backend=compile_backend)
    return _compiled[key]


def elementwise_inputs(op: str, rows: int, n: int, device=DEVICE, dtype=DTYPE) -> tuple:
    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()
    if op == "layer_norm":
        return t(rows, n), t(n), t(n)
    if op == "dropout_add_layer_norm":
        return t(rows, n), t(rows, n), t(n), t(n)
    return t(rows, n), t(n)


def elementwise_step(fn, inputs: tuple, direction: str):
    """The step timing one direction of ``fn``: "fwd" (no autograd), "bwd" (the backward alone, of
    one saved forward) or "fwd+bwd"."""
    if direction == "fwd":
        def step():
            with torch.no_grad():
                return fn(*inputs)
        return step

    def as_tuple(outputs):
        return outputs if isinstance(outputs, tuple) else (outputs,)
    outputs = as_tuple(fn(*inputs))
    grads = [torch.randn_like(o) for o in outputs]
    leaves = [t for t in inputs if t.requires_grad]
    if direction == "bwd":
        def step():
            return torch.autograd.grad(outputs, leaves, grads, retain_graph=True)
    else:
        def step():
            return torch.autograd.grad(as_tuple(fn(*inputs)), leaves, grads)
    return step


def elementwise_cases(ops_: Iterable[str] = ELEMENTWISE_OPS, widths=ELEMENTWISE_WIDTHS, rows: int = ELEMENTWISE_ROWS,
                      impls: Iterable[str] = ELEMENTWISE_IMPLEMENTATIONS, directions=("fwd", "bwd"),
                      compile_backend: str = COMPILE_BACKEND, device=DEVICE, dtype=DTYPE) -> list[Case]:
    cases = []
    itemsize = torch.empty((), dtype=dtype).element_size()
    for width, op in ((w, op) for w in widths for op in ops_):
        n = elementwise_width(op, width)
        for impl in impls:
            for direction in directions:
                def build(op=op, impl=impl, n=n, direction=direction):
                    fn = elementwise_fn(op, impl, compile_backend)
                    return elementwise_step(fn, elementwise_inputs(op, rows, n, device, dtype), direction)
                record = {"kind": "elementwise", "op": op, "direction": direction, "impl": impl, "rows": rows,
                          "width": n, "dtype": _dtype_name(dtype)}
                cases.append(Case(record, build, elementwise_bytes(op, direction, rows, n, itemsize), "GB/s"))
    return cases


# =============================================================================
# Ceilings: what the hardware allows (gpu_check.py)
# =============================================================================

def ceiling_cases(copy_bytes: int = 2**31, gemm_n: int = 8192, device=DEVICE, dtype=DTYPE) -> list[Case]:
    """A copy of ``copy_bytes`` (2 GiB: many times the L2) and an n×n GEMM, in ``dtype``."""
    def copy():
        source = torch.randn(copy_bytes // torch.empty((), dtype=dtype).element_size(), device=device, dtype=dtype)
        target = torch.empty_like(source)
        return lambda: target.copy_(source)

    def gemm():
        a, b = (torch.randn(gemm_n, gemm_n, device=device, dtype=dtype) for _ in range(2))
        return lambda: a @ b
    return [Case({"kind": "ceiling", "name": "copy", "bytes": 2 * copy_bytes}, copy, 2 * copy_bytes, "GB/s"),
            Case({"kind": "ceiling", "name": f"gemm {'bf16' if dtype == torch.bfloat16 else 'fp32'}", "n": gemm_n},
                 gemm, 2 * gemm_n**3, "TFLOP/s")]


def select(cases: list[Case], **match) -> list[Case]:
    """The cases whose record has every ``key=value`` (a value may be a tuple of allowed values)."""
    def ok(value, wanted):
        return value in wanted if isinstance(wanted, (tuple, list, set)) else value == wanted
    return [c for c in cases if all(ok(c.record.get(k), v) for k, v in match.items())]


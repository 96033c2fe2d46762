"""GELU (tanh approximation) forward and backward in Triton, optionally with the bias add fused in.

GPT-2's GELU, rewritten with 0.5 · (1 + tanh(u)) = sigmoid(2u), which needs one
exp and no cancellation near zero:

    z = x (+ bias)               u = sqrt(2/π) · (z + 0.044715 · z³)
    s = sigmoid(2u) = 1 / (1 + exp(−2u))      (exp's argument clamped at 80: no overflow)
    y = z · s
    dy/dz = s + z · s · (1 − s) · 2 · sqrt(2/π) · (1 + 3 · 0.044715 · z²)

The bias form serves the first FeedForward Linear, which then runs without its
bias. Forward: the bias add and the activation in one pass (as eager's addmm
epilogue and GELU: no bytes saved there). Backward: the bias gradient
db = Σ_rows dz is summed by the same kernel that writes dz, into a float32
partial row per program (kernels/column_sum.py adds those up, in a fixed order),
so dz is read from memory zero times instead of once: 3 passes over the
activation (read dy and z, write dz) instead of eager's 4.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import column_sum
from .outputs import new_output
from .runtime import DTYPES, device_mismatch, on_device, run

BLOCK = 1024
NUM_WARPS = 4
BIAS_ROWS = 32  # rows per program of the bias backward (its partial sums: one row per program)


@triton.jit
def _gelu(z):
    """GELU(z) and its derivative, in float32."""
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    # exp(−2u) clamped below overflow: sigmoid is then ~1e-35, as good as 0.
    s = 1.0 / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))
    du_dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    return z * s, s + z * s * (1.0 - s) * 2.0 * du_dz


@triton.jit
def _gelu_fwd_kernel(X, BIAS, Y, n_elements, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    z = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + offsets % N, mask=mask, other=0.0).to(tl.float32)
    y, _ = _gelu(z)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(DY, X, DX, n_elements, BLOCK: tl.constexpr):
    """dz = dy · GELU'(x), element-wise over the flat tensor (no bias)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    z = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    _, slope = _gelu(z)
    tl.store(DX + offsets, (dy * slope).to(DX.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _bias_gelu_bwd_kernel(DY, X, BIAS, DX, DBIAS_PARTIAL, M, N, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """dz = dy · GELU'(x + bias) for ROWS rows × BLOCK columns, and those rows' Σ dz per column."""
    row_start = tl.program_id(0) * ROWS
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < N
    bias = tl.load(BIAS + cols, mask=in_row, other=0.0).to(tl.float32)
    column_total = tl.zeros([BLOCK], dtype=tl.float32)
    for row in tl.range(row_start, tl.minimum(row_start + ROWS, M), num_stages=2):
        offsets = row * N + cols  # 32-bit: supports() refuses a bias form of 2**31 elements or more
        z = tl.load(X + offsets, mask=in_row, other=0.0).to(tl.float32) + bias
        dy = tl.load(DY + offsets, mask=in_row, other=0.0).to(tl.float32)
        _, slope = _gelu(z)
        dz = (dy * slope).to(DX.dtype.element_ty)
        tl.store(DX + offsets, dz, mask=in_row)
        column_total += dz.to(tl.float32)  # the rounded dz, as a sum of the stored gradient would see it
    tl.store(DBIAS_PARTIAL + tl.program_id(0) * N + cols, column_total, mask=in_row)


def supports(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> "str | None":
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (supported: float32, float16, bfloat16)"
    if bias is not None:
        if (problem := device_mismatch(input=x, bias=bias)) is not None:
            return problem
        if bias.dtype != x.dtype:
            return f"bias dtype {bias.dtype} differs from the input's {x.dtype}"
        if bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
            return f"bias shape {tuple(bias.shape)} does not match last dim {x.shape[-1]}"
        if x.numel() >= 2**31:
            return "a bias form of 2**31 elements or more (its backward uses 32-bit offsets)"
    return None


def _autocast_dtype(x: torch.Tensor, weight: torch.Tensor) -> "torch.dtype | None":
    """The dtype autocast gives F.linear(x, weight), or None where autocast leaves it alone."""
    if x.dtype in DTYPES and weight.dtype in DTYPES and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def supports_linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> "str | None":
    autocast_dtype = _autocast_dtype(x, weight)
    bias_dtype = x.dtype if bias is None else bias.dtype
    if autocast_dtype is None and not x.dtype == weight.dtype == bias_dtype:
        return f"dtypes {x.dtype}/{weight.dtype}/{bias_dtype} of input/weight/bias differ"
    if x.dim() == 0:
        return "a 0-dimensional input (need (..., in_features))"
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        return f"weight shape {tuple(weight.shape)} does not fit input width {x.shape[-1]}"
    if (problem := device_mismatch(input=x, weight=weight, bias=bias)) is not None:
        return problem
    # The kernel sees the matmul's output (last dim weight.shape[0]) and, under
    # autocast, the bias cast to its dtype by the launcher, as F.linear casts it.
    matmul_out = x.new_empty((0, weight.shape[0]), dtype=autocast_dtype or x.dtype)
    return supports(matmul_out, bias if autocast_dtype is None or bias is None or bias.dtype not in DTYPES
                    else bias.new_empty(bias.shape, dtype=autocast_dtype))


# ---------------------------------------------------------------- launches
#
# Each launch is described once, as (grid, positional arguments, keyword arguments):
# the launchers run it (runtime.run), and the compile catalogue (kernels/report/catalogue.py)
# gives the same description, on meta tensors of real shapes, to the ahead-of-time report.

def fwd_launch(x, bias, y):
    n_elements = x.numel()
    args = (x, x if bias is None else bias, y, n_elements, x.shape[-1] if x.dim() else 1)
    return (triton.cdiv(n_elements, BLOCK),), args, dict(HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)


def bwd_launch(dy, x, dx):
    n_elements = x.numel()
    return (triton.cdiv(n_elements, BLOCK),), (dy, x, dx, n_elements), dict(BLOCK=BLOCK, num_warps=NUM_WARPS)


def bias_bwd_launch(dy, x, bias, dx, partial):
    n = x.shape[-1]
    m = x.numel() // n
    grid = (triton.cdiv(m, BIAS_ROWS), triton.cdiv(n, BLOCK))
    return grid, (dy, x, bias, dx, partial, m, n), dict(ROWS=BIAS_ROWS, BLOCK=BLOCK, num_warps=NUM_WARPS)


# ---------------------------------------------------------------- torch.library ops + autograd

@torch.library.custom_op("fastgpt::gelu", mutates_args=())
def gelu_op(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    x = x.contiguous()
    y = new_output(x.shape, x.dtype, x.device)
    if x.numel():
        with on_device(x):
            run(_gelu_fwd_kernel, fwd_launch(x, bias, y))
    return y


@gelu_op.register_fake
def _(x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastgpt::gelu_backward", mutates_args=())
def gelu_backward_op(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz, dbias); dbias is empty without a bias."""
    dy, x = dy.contiguous(), x.contiguous()
    dx = new_output(x.shape, x.dtype, x.device)
    dbias = new_output((0,) if bias is None else bias.shape, x.dtype if bias is None else bias.dtype, x.device)
    with on_device(x):
        if bias is None:
            if x.numel():
                run(_gelu_bwd_kernel, bwd_launch(dy, x, dx))
            return dx, dbias
        m = x.numel() // x.shape[-1]
        partial = new_output((triton.cdiv(m, BIAS_ROWS), x.shape[-1]), torch.float32, x.device)
        if m:
            run(_bias_gelu_bwd_kernel, bias_bwd_launch(dy, x, bias, dx, partial))
        column_sum.column_sum_(partial, dbias)
    return dx, dbias


@gelu_backward_op.register_fake
def _(dy, x, bias):
    dbias = x.new_empty((0,)) if bias is None else torch.empty_like(bias)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dbias


def _gelu_setup(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _gelu_grad(ctx, dy):
    x, bias = ctx.saved_tensors
    dz, dbias = torch.ops.fastgpt.gelu_backward(dy, x, bias)
    return dz, dbias if bias is not None else None


gelu_op.register_autograd(_gelu_grad, setup_context=_gelu_setup)


# ---------------------------------------------------------------- entry points for fastgpt.ops

def gelu(x):
    return torch.ops.fastgpt.gelu(x, None)


def linear_gelu(x, weight, bias=None):
    """GELU(x @ weightᵀ + bias) (bias optional): the matmul by torch without its bias, bias + GELU in one kernel."""
    z = torch.nn.functional.linear(x, weight)
    # Under autocast z is half precision while the bias stays float32: cast it as
    # F.linear would, so the kernel sees one dtype (the compile catalogue's cases).
    return torch.ops.fastgpt.gelu(z, None if bias is None else bias.to(z.dtype))

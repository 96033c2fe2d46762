"""LayerNorm forward and backward in Triton, optionally fused with the residual add and dropout before it.

One program normalises one row x ∈ R^N, statistics in float32:

    mean = Σx / N        var = Σ(x − mean)² / N  (biased)     rstd = 1 / sqrt(var + eps)
    x̂ = (x − mean) · rstd                         y = x̂ · w + b

Fused form (the GPT-2 block's residual add feeding the next LayerNorm):

    h = x + dropout(branch)          y = LayerNorm(h)          -> returns h and y

Backward, per row, with g = dy · w:

    dh = rstd · (g − mean(g) − x̂ · mean(g · x̂))   (+ the gradient arriving at h itself)
    dbranch = dh · keep / (1 − p)                  keep regenerated from (seed, row, column)
    dw = Σ_rows dy · x̂      db = Σ_rows dy         deterministic: every program sums its
                                                   block of rows into its own float32 partial
                                                   row; the partials are summed afterwards.

Dropout uses kernels/dropout.py's ``keep_row`` (one Philox2x32-10 call per 8
contiguous elements, a pure function of seed, row and column), so the backward
pass regenerates the forward's mask instead of storing it. The drop probability
is rounded to a multiple of 1/256.

The weight and bias are read in their own dtype and converted in the kernel,
the branch in its own dtype too (under autocast it is half precision while the
residual is float32), and the dW/dB partial sums are reduced by a kernel: a
LayerNorm call launches its kernel and nothing else.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import column_sum
from .dropout import keep_row, quantize
from .outputs import new_output
from .runtime import DTYPES, device_mismatch, dropout_seed, on_device, run, sm_count

MAX_N = 4096       # widest row one program holds in registers (8192 spilled in the backward)
_MIN_BLOCK_N = 128  # narrower rows are padded (masked) to this width
BACKWARD_STAGES = 2  # row loads of the backward in flight ahead of the row being reduced


@triton.jit
def _aligned(value, ALIGN: tl.constexpr):
    """value, a multiple of ALIGN (row_alignment made sure), as the compiler can see it is one: tl.multiple_of
    cannot mark a kernel argument, but the analysis knows x // A * A. At 16 Triton's launcher specialisation
    already says so, and below 2 there is nothing to say."""
    if ALIGN > 1 and ALIGN < 16:
        value = value // ALIGN * ALIGN
    return value


@triton.jit(do_not_specialize=["drop_threshold"])
def _layer_norm_fwd_kernel(
    X, BRANCH, H, Y, W, B, MEAN, RSTD, SEED,     # pointers; BRANCH, H, SEED unused without HAS_BRANCH / HAS_DROPOUT
    stride_x, stride_branch, stride_h, stride_y,  # row strides (columns are contiguous)
    N, eps, drop_threshold, keep_scale,
    HAS_BRANCH: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    # Rows start on ROW_ALIGN-element boundaries (row_alignment): ragged widths move whole vectors too.
    N, stride_x, stride_branch = _aligned(N, ROW_ALIGN), _aligned(stride_x, ROW_ALIGN), _aligned(stride_branch, ROW_ALIGN)
    stride_h, stride_y = _aligned(stride_h, ROW_ALIGN), _aligned(stride_y, ROW_ALIGN)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        branch = tl.load(BRANCH + row * stride_branch + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:  # h = x + keep · branch / (1 − p): one fused multiply-add and a select
            h = tl.where(keep_row(tl.load(SEED), row, drop_threshold, BLOCK_N), x + branch * keep_scale, x)
        else:
            h = x + branch
        h = h.to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=mask)
        x = h.to(tl.float32)  # normalise exactly the h that is returned
    mean = tl.sum(x, axis=0) / N
    centred = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    y = centred * rstd * w + b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit(do_not_specialize=["M", "rows_per_program", "drop_threshold"])
def _layer_norm_bwd_kernel(
    DY, H, W, MEAN, RSTD, DH_IN, DX, DBRANCH, DW_PARTIAL, DB_PARTIAL, SEED,
    stride_dy, stride_h, stride_dh_in, stride_dx, stride_dbranch,
    M, N, rows_per_program, drop_threshold, keep_scale,
    HAS_DH_IN: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_DBRANCH: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    N, stride_dy, stride_h = _aligned(N, ROW_ALIGN), _aligned(stride_dy, ROW_ALIGN), _aligned(stride_h, ROW_ALIGN)
    stride_dh_in, stride_dx = _aligned(stride_dh_in, ROW_ALIGN), _aligned(stride_dx, ROW_ALIGN)
    stride_dbranch = _aligned(stride_dbranch, ROW_ALIGN)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    # tl.range with stages: the next rows' loads are issued (cp.async) while this
    # row is reduced, keeping memory busy across the two reductions' barriers.
    for r in tl.range(row_start, row_end, num_stages=NUM_STAGES):
        # 32-bit offsets are safe: supports() refuses tensors of 2**31 elements or more.
        h = tl.load(H + r * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + r)
        rstd = tl.load(RSTD + r)
        x_hat = tl.where(mask, (h - mean) * rstd, 0.0)
        g = dy * w
        mean_g_xhat = tl.sum(g * x_hat, axis=0) / N
        mean_g = tl.sum(g, axis=0) / N
        dh = (g - mean_g - x_hat * mean_g_xhat) * rstd
        if HAS_DH_IN:
            dh += tl.load(DH_IN + r * stride_dh_in + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r * stride_dx + cols, dh.to(DX.dtype.element_ty), mask=mask)
        if HAS_DBRANCH:  # the branch's own gradient: dropped like the forward, in the branch's dtype
            dbranch = dh
            if HAS_DROPOUT:
                dbranch = tl.where(keep_row(seed, r, drop_threshold, BLOCK_N), dh * keep_scale, 0.0)
            tl.store(DBRANCH + r * stride_dbranch + cols, dbranch.to(DBRANCH.dtype.element_ty), mask=mask)
        dw_acc += dy * x_hat
        db_acc += dy
    tl.store(DW_PARTIAL + pid * N + cols, dw_acc, mask=mask)
    tl.store(DB_PARTIAL + pid * N + cols, db_acc, mask=mask)


# ---------------------------------------------------------------- launch configuration

def block_n(n: int) -> int:
    return max(_MIN_BLOCK_N, triton.next_power_of_2(n))


def row_alignment(n: int, *row_strides: int) -> int:
    """The largest power of two up to 16 dividing the width and every row stride. Triton's launcher
    only specialises "divisible by 16"; a width like 100 (and 100-element rows) is divisible by 4,
    which is enough for whole 16-byte float32 vectors."""
    alignment = 16
    while alignment > 1 and any(value % alignment for value in (n, *row_strides)):
        alignment //= 2
    return alignment


def num_warps_for(block: int) -> int:
    # About 8 elements per thread up to 8 warps; 4096-wide rows get 16 warps.
    return min(max(block // 256, 1), 16)


def _backward_programs(m: int, device: torch.device) -> int:
    # 4 programs per SM; the interpreter: few programs, each looping over rows.
    return max(1, min(m, 4 * sm_count(device, elsewhere=1)))


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> a 2-D (M, N) view with contiguous columns (copying only if it must)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *rest) -> "str | None":
    """None when the kernels handle this call, else the reason they do not."""
    if x.dim() == 0:
        return "a 0-dimensional input (LayerNorm normalises over the last dimension)"
    for name, t in (("input", x), ("weight", weight), ("bias", bias)):
        if t.dtype not in DTYPES:
            return f"{name} dtype {t.dtype} (supported: float32, float16, bfloat16)"
    if (problem := device_mismatch(input=x, weight=weight, bias=bias)) is not None:
        return problem
    n = x.shape[-1]
    if not 1 <= n <= MAX_N:
        return f"hidden size {n} (supported: 1..{MAX_N})"
    if weight.shape != (n,) or bias.shape != (n,):
        return f"weight/bias shapes {tuple(weight.shape)}/{tuple(bias.shape)} do not match hidden size {n}"
    if x.numel() >= 2**31:
        return "more than 2**31 elements"
    return None


def supports_dropout_add(x, branch, weight, bias, *rest) -> "str | None":
    if branch.shape != x.shape:
        return f"branch shape {tuple(branch.shape)} != residual shape {tuple(x.shape)}"
    if branch.dtype not in DTYPES:
        return f"branch dtype {branch.dtype} (supported: float32, float16, bfloat16)"
    if (problem := device_mismatch(residual=x, branch=branch)) is not None:
        return problem
    return supports(x, weight, bias)


# Each launch is described once, as (grid, positional arguments, keyword
# arguments): the launchers run it (runtime.run), and the compile catalogue
# (kernels/report/catalogue.py) gives the same description, on meta tensors of
# real shapes, to the ahead-of-time report.

def fwd_launch(x2, branch2, h, y, weight, bias, mean, rstd, seed, eps, dropout_p):
    m, n = x2.shape
    block = block_n(n)
    threshold, keep_scale = quantize(dropout_p)
    strides = (x2.stride(0), branch2.stride(0), h.stride(0), y.stride(0))
    args = (x2, branch2, h, y, weight, bias, mean, rstd, x2 if seed is None else seed,
            *strides, n, eps, threshold, keep_scale)
    meta = dict(HAS_BRANCH=branch2 is not x2, HAS_DROPOUT=threshold > 0, BLOCK_N=block,
                ROW_ALIGN=row_alignment(n, *strides), num_warps=num_warps_for(block))
    return (m,), args, meta


def bwd_launch(dy2, h2, weight, mean, rstd, dh_in2, dx, dbranch, dw_partial, db_partial, seed, dropout_p):
    m, n = h2.shape
    programs = dw_partial.shape[0]
    block = block_n(n)
    threshold, keep_scale = quantize(dropout_p)
    dh_in_or_dy = dy2 if dh_in2 is None else dh_in2  # unused without HAS_DH_IN
    dbranch2 = dx if dbranch is None else dbranch  # unused without HAS_DBRANCH
    strides = (dy2.stride(0), h2.stride(0), dh_in_or_dy.stride(0), dx.stride(0), dbranch2.stride(0))
    args = (dy2, h2, weight, mean, rstd, dh_in_or_dy, dx, dbranch2, dw_partial, db_partial, h2 if seed is None else seed,
            *strides, m, n, triton.cdiv(m, programs), threshold, keep_scale)
    meta = dict(HAS_DH_IN=dh_in2 is not None, HAS_DROPOUT=threshold > 0, HAS_DBRANCH=dbranch is not None,
                BLOCK_N=block, NUM_STAGES=BACKWARD_STAGES, ROW_ALIGN=row_alignment(n, *strides),
                num_warps=num_warps_for(block))
    return (programs,), args, meta


def _forward(x, branch, weight, bias, eps, dropout_p, seed):
    shape, n = x.shape, x.shape[-1]
    x2 = _as_rows(x)
    m = x2.shape[0]
    y = new_output((m, n), x.dtype, x.device)
    h = new_output((m, n), x.dtype, x.device) if branch is not None else y
    branch2 = _as_rows(branch) if branch is not None else x2
    mean = new_output(m, torch.float32, x.device)
    rstd = new_output(m, torch.float32, x.device)
    if m:
        with on_device(x):
            run(_layer_norm_fwd_kernel, fwd_launch(x2, branch2, h, y, weight, bias, mean, rstd, seed, eps, dropout_p))
    return h.view(shape), y.view(shape), mean, rstd


def _backward(dy, h, weight, mean, rstd, dh_in, dropout_p, seed, branch_dtype=None):
    """dx, dbranch (None unless dropout or a branch dtype other than h's asks for its own), dw, db."""
    shape, n = h.shape, h.shape[-1]
    dy2, h2 = _as_rows(dy), _as_rows(h)
    m = h2.shape[0]
    dh_in2 = _as_rows(dh_in) if dh_in is not None else None
    dx = new_output((m, n), h.dtype, h.device)
    own_dbranch = branch_dtype is not None and (dropout_p > 0.0 or branch_dtype != h.dtype)
    dbranch = new_output((m, n), branch_dtype, h.device) if own_dbranch else None
    programs = _backward_programs(m, h.device)
    dw_partial = new_output((programs, n), torch.float32, h.device)
    db_partial = new_output((programs, n), torch.float32, h.device)
    dw, db = new_output(n, weight.dtype, h.device), new_output(n, weight.dtype, h.device)
    with on_device(h):
        if m:
            run(_layer_norm_bwd_kernel, bwd_launch(dy2, h2, weight, mean, rstd, dh_in2, dx, dbranch,
                                                   dw_partial, db_partial, seed, dropout_p))
        else:
            dw_partial.zero_()
            db_partial.zero_()
        column_sum.column_sum_(dw_partial, dw, db_partial, db)
    return dx.view(shape), None if dbranch is None else dbranch.view(shape), dw, db


# ---------------------------------------------------------------- torch.library ops + autograd

@torch.library.custom_op("fastgpt::layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, y, mean, rstd = _forward(x, None, weight, bias, eps, 0.0, None)
    return y, mean, rstd


@layer_norm_op.register_fake
def _(x, weight, bias, eps):
    m = x.numel() // x.shape[-1]
    stats = x.new_empty(m, dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, stats.clone()


@torch.library.custom_op("fastgpt::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                           rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, _, dw, db = _backward(dy, x, weight, mean, rstd, None, 0.0, None)
    return dx, dw, db


@layer_norm_backward_op.register_fake
def _(dy, x, weight, mean, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight), torch.empty_like(weight)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _layer_norm_grad(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.fastgpt.layer_norm_backward(dy, x, weight, mean, rstd)
    return dx, dw, db, None


layer_norm_op.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)
# CUDA autocast runs torch's layer_norm in float32 (CPU autocast leaves it alone):
# the kernel follows the same policy, so both dispatch paths return the same dtype.
torch.library.register_autocast("fastgpt::layer_norm", "cuda", torch.float32)


@torch.library.custom_op("fastgpt::dropout_add_layer_norm", mutates_args=())
def dropout_add_layer_norm_op(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              eps: float, dropout_p: float, seed: Optional[torch.Tensor]
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, branch, weight, bias, eps, dropout_p, seed)


@dropout_add_layer_norm_op.register_fake
def _(x, branch, weight, bias, eps, dropout_p, seed):
    m = x.numel() // x.shape[-1]
    stats = x.new_empty(m, dtype=torch.float32)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, out.clone(), stats, stats.clone()


@torch.library.custom_op("fastgpt::dropout_add_layer_norm_backward", mutates_args=())
def dropout_add_layer_norm_backward_op(dh: torch.Tensor, dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                                       mean: torch.Tensor, rstd: torch.Tensor, dropout_p: float,
                                       seed: Optional[torch.Tensor], branch_dtype: torch.dtype
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dbranch, dw, db = _backward(dy, h, weight, mean, rstd, dh, dropout_p, seed, branch_dtype)
    # An op's outputs may not alias each other: an empty placeholder stands for "same as dx".
    return dx, h.new_empty((0, h.shape[-1])) if dbranch is None else dbranch, dw, db


@dropout_add_layer_norm_backward_op.register_fake
def _(dh, dy, h, weight, mean, rstd, dropout_p, seed, branch_dtype):
    dx = torch.empty_like(h, memory_format=torch.contiguous_format)
    own = dropout_p > 0.0 or branch_dtype != h.dtype
    dbranch = torch.empty_like(dx, dtype=branch_dtype) if own else h.new_empty((0, h.shape[-1]))
    return dx, dbranch, torch.empty_like(weight), torch.empty_like(weight)


def _dropout_add_setup(ctx, inputs, output):
    x, branch, weight, _, _, dropout_p, seed = inputs
    h, _, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd, seed)
    ctx.dropout_p = dropout_p
    ctx.branch_dtype = branch.dtype


def _dropout_add_grad(ctx, dh, dy, _dmean, _drstd):
    h, weight, mean, rstd, seed = ctx.saved_tensors
    dx, dbranch, dw, db = torch.ops.fastgpt.dropout_add_layer_norm_backward(
        dh, dy, h, weight, mean, rstd, ctx.dropout_p, seed, ctx.branch_dtype)
    if dbranch.numel() == 0 and dx.numel() != 0:
        dbranch = dx  # without dropout, in h's dtype, the branch receives exactly the residual's gradient
    return dx, dbranch, dw, db, None, None, None


dropout_add_layer_norm_op.register_autograd(_dropout_add_grad, setup_context=_dropout_add_setup)


# ---------------------------------------------------------------- entry points for fastgpt.ops

def layer_norm(x, weight, bias, eps):
    return torch.ops.fastgpt.layer_norm(x, weight, bias, eps)[0]


def dropout_add_layer_norm(x, branch, weight, bias, eps, dropout_p):
    """(h, LayerNorm(h)) with h = x + dropout(branch); dropout_p is applied as given."""
    # A device-side seed from torch's generator: torch.manual_seed makes runs
    # repeatable, and a captured CUDA graph draws a new one at every replay.
    seed = dropout_seed(x.device) if dropout_p > 0.0 else None
    # h takes x + branch's promoted dtype, as in eager PyTorch (a half-precision
    # residual meeting a float32 branch gives float32); the kernel reads the branch in its own.
    x = x.to(torch.promote_types(x.dtype, branch.dtype))
    h, y, _, _ = torch.ops.fastgpt.dropout_add_layer_norm(x, branch, weight, bias, eps, dropout_p, seed)
    return h, y

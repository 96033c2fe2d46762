"""LayerNorm forward and backward in Triton, optionally fused with the residual add and dropout before it.

One program normalises one row x ∈ R^N, statistics in float32:

    mean = Σx / N        var = Σ(x − mean)² / N  (biased)     rstd = 1 / sqrt(var + eps)
    x̂ = (x − mean) · rstd                         y = x̂ · w + b

Fused form (the GPT-2 block's residual add feeding the next LayerNorm):

    h = x + dropout(branch)          y = LayerNorm(h)          -> returns h and y

Backward, per row, with g = dy · w:

    dh = rstd · (g − mean(g) − x̂ · mean(g · x̂))   (+ the gradient arriving at h itself)
    dbranch = dh · keep / (1 − p)                  keep regenerated from (seed, element offset)
    dw = Σ_rows dy · x̂      db = Σ_rows dy         deterministic: every program sums its
                                                   block of rows into its own float32 partial
                                                   row; the partials are summed afterwards.

Dropout draws keep = rand(seed, row · N + col) ≥ p with Triton's counter-based
Philox generator, so the backward pass regenerates the forward's mask instead of
storing it.
"""

import torch
import triton
import triton.language as tl

from .cases import CompileCase
from .outputs import new_output

MAX_N = 4096       # widest row one program holds in registers (8192 spilled in the backward)
_MIN_BLOCK_N = 128  # narrower rows are padded (masked) to this width
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _layer_norm_fwd_kernel(
    X, BRANCH, H, Y, W, B, MEAN, RSTD,          # pointers; BRANCH and H unused without HAS_BRANCH
    stride_x, stride_branch, stride_h, stride_y,  # row strides (columns are contiguous)
    N, eps, dropout_p, seed,
    HAS_BRANCH: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        branch = tl.load(BRANCH + row * stride_branch + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = tl.rand(seed, (row * N + cols).to(tl.int32)) >= dropout_p
            branch = tl.where(keep, branch / (1.0 - dropout_p), 0.0)
        h = (x + branch).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=mask)
        x = h.to(tl.float32)  # normalise exactly the h that is returned
    mean = tl.sum(x, axis=0) / N
    centred = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0)
    b = tl.load(B + cols, mask=mask, other=0.0)
    y = centred * rstd * w + b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, H, W, MEAN, RSTD, DH_IN, DX, DBRANCH, DW_PARTIAL, DB_PARTIAL,
    stride_dy, stride_h, stride_dh_in, stride_dx, stride_dbranch,
    M, N, rows_per_program, dropout_p, seed,
    HAS_DH_IN: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r in range(row_start, row_end):
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
        if HAS_DROPOUT:
            keep = tl.rand(seed, r * N + cols) >= dropout_p
            dbranch = tl.where(keep, dh / (1.0 - dropout_p), 0.0)
            tl.store(DBRANCH + r * stride_dbranch + cols, dbranch.to(DBRANCH.dtype.element_ty), mask=mask)
        dw_acc += dy * x_hat
        db_acc += dy
    tl.store(DW_PARTIAL + pid * N + cols, dw_acc, mask=mask)
    tl.store(DB_PARTIAL + pid * N + cols, db_acc, mask=mask)


# ---------------------------------------------------------------- launch configuration

def block_n(n: int) -> int:
    return max(_MIN_BLOCK_N, triton.next_power_of_2(n))


def num_warps_for(block: int) -> int:
    # About 8 elements per thread up to 8 warps; 4096-wide rows get 16 warps.
    return min(max(block // 256, 1), 16)


def _backward_programs(m: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(m, 4 * sms))
    return max(1, min(m, 4))  # the interpreter: few programs, each looping over rows


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
        if t.dtype not in _DTYPES:
            return f"{name} dtype {t.dtype} (supported: float32, float16, bfloat16)"
        if t.device != x.device:
            return f"{name} is on {t.device}, input on {x.device}"
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
    if branch.dtype not in _DTYPES or branch.device != x.device:
        return f"branch dtype/device {branch.dtype}/{branch.device}"
    return supports(x, weight, bias)


def _forward(x, branch, weight, bias, eps, dropout_p, seed):
    shape, n = x.shape, x.shape[-1]
    x2 = _as_rows(x)
    m = x2.shape[0]
    y = new_output((m, n), x.dtype, x.device)
    h = new_output((m, n), x.dtype, x.device) if branch is not None else y
    branch2 = _as_rows(branch.to(x.dtype)) if branch is not None else x2
    mean = new_output(m, torch.float32, x.device)
    rstd = new_output(m, torch.float32, x.device)
    if m:
        block = block_n(n)
        _layer_norm_fwd_kernel[(m,)](
            x2, branch2, h, y, weight.float(), bias.float(), mean, rstd,
            x2.stride(0), branch2.stride(0), h.stride(0), y.stride(0),
            n, eps, dropout_p, seed,
            HAS_BRANCH=branch is not None, HAS_DROPOUT=dropout_p > 0.0, BLOCK_N=block,
            num_warps=num_warps_for(block),
        )
    return h.view(shape), y.view(shape), mean, rstd


def _backward(dy, h, weight, mean, rstd, dh_in, dropout_p, seed):
    shape, n = h.shape, h.shape[-1]
    dy2, h2 = _as_rows(dy), _as_rows(h)
    m = h2.shape[0]
    dh_in2 = _as_rows(dh_in) if dh_in is not None else dy2
    dx = new_output((m, n), h.dtype, h.device)
    dbranch = new_output((m, n) if dropout_p > 0.0 else (0, n), h.dtype, h.device)
    programs = _backward_programs(m, h.device)
    dw_partial = new_output((programs, n), torch.float32, h.device)
    db_partial = new_output((programs, n), torch.float32, h.device)
    if m:
        block = block_n(n)
        _layer_norm_bwd_kernel[(programs,)](
            dy2, h2, weight.float(), mean, rstd, dh_in2, dx, dbranch, dw_partial, db_partial,
            dy2.stride(0), h2.stride(0), dh_in2.stride(0), dx.stride(0), max(dbranch.stride(0), 1),
            m, n, triton.cdiv(m, programs), dropout_p, seed,
            HAS_DH_IN=dh_in is not None, HAS_DROPOUT=dropout_p > 0.0, BLOCK_N=block,
            num_warps=num_warps_for(block),
        )
    else:
        dw_partial.zero_()
        db_partial.zero_()
    dw = dw_partial.sum(0).to(weight.dtype)
    db = db_partial.sum(0).to(weight.dtype)
    return dx.view(shape), dbranch.view(shape) if dropout_p > 0.0 else dbranch, dw, db


# ---------------------------------------------------------------- torch.library ops + autograd

@torch.library.custom_op("fastgpt::layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, y, mean, rstd = _forward(x, None, weight, bias, eps, 0.0, 0)
    return y, mean, rstd


@layer_norm_op.register_fake
def _(x, weight, bias, eps):
    m = x.numel() // x.shape[-1]
    stats = x.new_empty(m, dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, stats.clone()


@torch.library.custom_op("fastgpt::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                           rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, _, dw, db = _backward(dy, x, weight, mean, rstd, None, 0.0, 0)
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
                              eps: float, dropout_p: float, seed: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, branch, weight, bias, eps, dropout_p, int(seed))


@dropout_add_layer_norm_op.register_fake
def _(x, branch, weight, bias, eps, dropout_p, seed):
    m = x.numel() // x.shape[-1]
    stats = x.new_empty(m, dtype=torch.float32)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, out.clone(), stats, stats.clone()


@torch.library.custom_op("fastgpt::dropout_add_layer_norm_backward", mutates_args=())
def dropout_add_layer_norm_backward_op(dh: torch.Tensor, dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                                       mean: torch.Tensor, rstd: torch.Tensor, dropout_p: float, seed: torch.Tensor
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy, h, weight, mean, rstd, dh, dropout_p, int(seed))


@dropout_add_layer_norm_backward_op.register_fake
def _(dh, dy, h, weight, mean, rstd, dropout_p, seed):
    dx = torch.empty_like(h, memory_format=torch.contiguous_format)
    dbranch = torch.empty_like(dx) if dropout_p > 0.0 else h.new_empty((0, h.shape[-1]))
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
        dh, dy, h, weight, mean, rstd, ctx.dropout_p, seed)
    if ctx.dropout_p == 0.0:
        dbranch = dx  # without dropout the branch receives exactly the residual's gradient
    return dx, dbranch.to(ctx.branch_dtype), dw, db, None, None, None


dropout_add_layer_norm_op.register_autograd(_dropout_add_grad, setup_context=_dropout_add_setup)


# ---------------------------------------------------------------- entry points for fastgpt.ops

def layer_norm(x, weight, bias, eps):
    return torch.ops.fastgpt.layer_norm(x, weight, bias, eps)[0]


def dropout_add_layer_norm(x, branch, weight, bias, eps, dropout_p):
    """(h, LayerNorm(h)) with h = x + dropout(branch); dropout_p is applied as given."""
    # The seed comes from torch's default generator, so torch.manual_seed makes runs repeatable.
    seed = torch.randint(0, 2**31 - 1, (1,)) if dropout_p > 0.0 else torch.zeros(1, dtype=torch.int64)
    # h takes x + branch's promoted dtype, as in eager PyTorch (a half-precision
    # residual meeting a float32 branch gives float32); the kernel works in x's.
    x = x.to(torch.promote_types(x.dtype, branch.dtype))
    h, y, _, _ = torch.ops.fastgpt.dropout_add_layer_norm(x, branch, weight, bias, eps, dropout_p, seed)
    return h, y


# ---------------------------------------------------------------- ahead-of-time compile cases

def compile_cases() -> list:
    """Every specialisation the launchers above can produce: dtype × row width × fusion flags."""
    cases = []
    blocks = [1 << k for k in range(_MIN_BLOCK_N.bit_length() - 1, MAX_N.bit_length())]
    for torch_dtype, t in _DTYPES.items():
        for block in blocks:
            for has_branch, has_dropout in ((False, False), (True, False), (True, True)):
                fused = "+add+dropout" if has_dropout else "+add" if has_branch else ""
                label = f"{t} BLOCK_N={block} warps={num_warps_for(block)}"
                cases.append(CompileCase(
                    kernel=f"layer_norm_fwd{fused}", fn=_layer_norm_fwd_kernel,
                    signature={
                        "X": f"*{t}", "BRANCH": f"*{t}", "H": f"*{t}", "Y": f"*{t}", "W": "*fp32", "B": "*fp32",
                        "MEAN": "*fp32", "RSTD": "*fp32", "stride_x": "i32", "stride_branch": "i32",
                        "stride_h": "i32", "stride_y": "i32", "N": "i32", "eps": "fp32", "dropout_p": "fp32",
                        "seed": "i32", "HAS_BRANCH": "constexpr", "HAS_DROPOUT": "constexpr", "BLOCK_N": "constexpr",
                    },
                    constexprs={"HAS_BRANCH": has_branch, "HAS_DROPOUT": has_dropout, "BLOCK_N": block},
                    num_warps=num_warps_for(block), config=label,
                ))
                cases.append(CompileCase(
                    kernel=f"layer_norm_bwd{fused}", fn=_layer_norm_bwd_kernel,
                    signature={
                        "DY": f"*{t}", "H": f"*{t}", "W": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32",
                        "DH_IN": f"*{t}", "DX": f"*{t}", "DBRANCH": f"*{t}", "DW_PARTIAL": "*fp32",
                        "DB_PARTIAL": "*fp32", "stride_dy": "i32", "stride_h": "i32", "stride_dh_in": "i32",
                        "stride_dx": "i32", "stride_dbranch": "i32", "M": "i32", "N": "i32",
                        "rows_per_program": "i32", "dropout_p": "fp32", "seed": "i32",
                        "HAS_DH_IN": "constexpr", "HAS_DROPOUT": "constexpr", "BLOCK_N": "constexpr",
                    },
                    constexprs={"HAS_DH_IN": has_branch, "HAS_DROPOUT": has_dropout, "BLOCK_N": block},
                    num_warps=num_warps_for(block), config=label,
                ))
    return cases

"""GELU (tanh approximation) forward and backward in Triton, optionally with the bias add fused in.

GPT-2's GELU, rewritten with 0.5 · (1 + tanh(u)) = sigmoid(2u), which needs one
exp and no cancellation near zero:

    z = x (+ bias)               u = sqrt(2/π) · (z + 0.044715 · z³)
    s = sigmoid(2u) = 1 / (1 + exp(−2u))      (exp's argument clamped at 80: no overflow)
    y = z · s
    dy/dz = s + z · s · (1 − s) · 2 · sqrt(2/π) · (1 + 3 · 0.044715 · z²)

The bias form serves the first FeedForward Linear, which then runs without its
bias: the bias add and the activation cost one pass over memory instead of two.
The bias gradient is the column sum of dz, reduced by torch (deterministic).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .cases import CompileCase
from .outputs import new_output

BLOCK = 1024
NUM_WARPS = 4
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _gelu_fwd_kernel(X, BIAS, Y, n_elements, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    z = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + offsets % N, mask=mask, other=0.0).to(tl.float32)
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    # exp(−2u) clamped below overflow: sigmoid is then ~1e-35, as good as 0.
    s = 1.0 / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))
    tl.store(Y + offsets, (z * s).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(DY, X, BIAS, DX, n_elements, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    z = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + offsets % N, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    s = 1.0 / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))
    du_dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    dz = dy * (s + z * s * (1.0 - s) * 2.0 * du_dz)
    tl.store(DX + offsets, dz.to(DX.dtype.element_ty), mask=mask)


def supports(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> "str | None":
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} (supported: float32, float16, bfloat16)"
    if bias is not None:
        if bias.dtype != x.dtype or bias.device != x.device:
            return f"bias dtype/device {bias.dtype}/{bias.device} differs from the input's {x.dtype}/{x.device}"
        if bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
            return f"bias shape {tuple(bias.shape)} does not match last dim {x.shape[-1]}"
    return None


def _autocast_dtype(x: torch.Tensor, weight: torch.Tensor) -> "torch.dtype | None":
    """The dtype autocast gives F.linear(x, weight), or None where autocast leaves it alone."""
    if x.dtype in _DTYPES and weight.dtype in _DTYPES and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def supports_linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> "str | None":
    autocast_dtype = _autocast_dtype(x, weight)
    if autocast_dtype is None and not x.dtype == weight.dtype == bias.dtype:
        return f"dtypes {x.dtype}/{weight.dtype}/{bias.dtype} of input/weight/bias differ"
    if x.dim() == 0:
        return "a 0-dimensional input (need (..., in_features))"
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        return f"weight shape {tuple(weight.shape)} does not fit input width {x.shape[-1]}"
    if weight.device != x.device:
        return f"weight is on {weight.device}, input on {x.device}"
    # The kernel sees the matmul's output (last dim weight.shape[0]) and, under
    # autocast, the bias cast to its dtype by the launcher, as F.linear casts it.
    matmul_out = x.new_empty((0, weight.shape[0]), dtype=autocast_dtype or x.dtype)
    return supports(matmul_out, bias if autocast_dtype is None or bias.dtype not in _DTYPES
                    else bias.new_empty(bias.shape, dtype=autocast_dtype))


# ---------------------------------------------------------------- torch.library ops + autograd

@torch.library.custom_op("fastgpt::gelu", mutates_args=())
def gelu_op(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    x = x.contiguous()
    y = new_output(x.shape, x.dtype, x.device)
    n_elements = x.numel()
    if n_elements:
        _gelu_fwd_kernel[(triton.cdiv(n_elements, BLOCK),)](
            x, bias if bias is not None else x, y, n_elements, x.shape[-1] if x.dim() else 1,
            HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y


@gelu_op.register_fake
def _(x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastgpt::gelu_backward", mutates_args=())
def gelu_backward_op(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    dy, x = dy.contiguous(), x.contiguous()
    dx = new_output(x.shape, x.dtype, x.device)
    n_elements = x.numel()
    if n_elements:
        _gelu_bwd_kernel[(triton.cdiv(n_elements, BLOCK),)](
            dy, x, bias if bias is not None else x, dx, n_elements, x.shape[-1] if x.dim() else 1,
            HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dx


@gelu_backward_op.register_fake
def _(dy, x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _gelu_setup(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _gelu_grad(ctx, dy):
    x, bias = ctx.saved_tensors
    dz = torch.ops.fastgpt.gelu_backward(dy, x, bias)
    dbias = dz.reshape(-1, dz.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype) if bias is not None else None
    return dz, dbias


gelu_op.register_autograd(_gelu_grad, setup_context=_gelu_setup)


# ---------------------------------------------------------------- entry points for fastgpt.ops

def gelu(x):
    return torch.ops.fastgpt.gelu(x, None)


def linear_gelu(x, weight, bias):
    """GELU(x @ weightᵀ + bias): the matmul by torch without its bias, bias + GELU in one kernel."""
    z = torch.nn.functional.linear(x, weight)
    # Under autocast z is half precision while the bias stays float32: cast it as
    # F.linear would, so the kernel sees one dtype (the compile catalogue's cases).
    return torch.ops.fastgpt.gelu(z, bias.to(z.dtype))


# ---------------------------------------------------------------- ahead-of-time compile cases

def compile_cases() -> list:
    cases = []
    for t in _DTYPES.values():
        for has_bias in (False, True):
            suffix = "+bias" if has_bias else ""
            common = {"n_elements": "i32", "N": "i32", "HAS_BIAS": "constexpr", "BLOCK": "constexpr"}
            constexprs = {"HAS_BIAS": has_bias, "BLOCK": BLOCK}
            label = f"{t} BLOCK={BLOCK} warps={NUM_WARPS}"
            cases.append(CompileCase(
                kernel=f"gelu_fwd{suffix}", fn=_gelu_fwd_kernel,
                signature={"X": f"*{t}", "BIAS": f"*{t}", "Y": f"*{t}", **common},
                constexprs=constexprs, num_warps=NUM_WARPS, config=label))
            cases.append(CompileCase(
                kernel=f"gelu_bwd{suffix}", fn=_gelu_bwd_kernel,
                signature={"DY": f"*{t}", "X": f"*{t}", "BIAS": f"*{t}", "DX": f"*{t}", **common},
                constexprs=constexprs, num_warps=NUM_WARPS, config=label))
    return cases

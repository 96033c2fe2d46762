"""Cross-entropy over one chunk of logits rows, in place: per-row loss, and the logits overwritten by their gradient.

The per-chunk step of fastgpt's fused linear + cross-entropy (fastgpt/loss.py),
which computes the chunk's logits z (rows × V) with a matmul and hands them
here. One program per row, float32 arithmetic whatever the logits' dtype:

    pass 1 (online log-sum-exp over V, BLOCK columns at a time):
        m' = max(m, max_j z_j)       s' = s · exp(m − m') + Σ_j exp(z_j − m')
        lse = m + log s              loss = lse − z_t     (0 when t == ignore_index)
    pass 2 (only with COMPUTE_GRAD), written over z:
        g_j = exp(z_j − lse) · c − c · [j == t]
        c = *SCALE (1/n_valid for a mean, 1 for a sum; the same for every row), 0 on an ignored row

The logits are read twice and written once; nothing of size V is allocated.
The scale is read from a one-element tensor, so the caller never synchronises
to count the valid targets (and a captured CUDA graph stays right).
"""

import torch
import triton
import triton.language as tl

from .outputs import new_output
from .runtime import DTYPES, on_device, run, same_device

NUM_WARPS = 8
# Columns per step: GPT-2's 50,257-wide rows take 4096 (8 float32 per thread at
# 8 warps); narrow test vocabularies take 1024. These two are all we launch.
BLOCKS = (1024, 4096)


def block_for(n_cols: int) -> int:
    return BLOCKS[0] if n_cols <= BLOCKS[0] else BLOCKS[1]


@triton.jit(do_not_specialize=["ignore_index"])
def _cross_entropy_rows_kernel(
    LOGITS, TARGETS, LOSS, SCALE,   # (rows, n_cols) logits, (rows,) int64 targets, (rows,) fp32 losses, fp32 scalar
    stride_row, n_cols, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    ignored = target == ignore_index

    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(z_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    # The caller checks targets; the mask keeps a bad one from reading outside the row.
    z_target = tl.load(z_row + target, mask=(~ignored) & (target >= 0) & (target < n_cols), other=0.0)
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - z_target.to(tl.float32)))

    if COMPUTE_GRAD:
        c = tl.where(ignored, 0.0, tl.load(SCALE))
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            g = tl.exp(z - lse) * c
            g = tl.where(cols == target, g - c, g)
            tl.store(z_row + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


def supports(dtype: torch.dtype) -> "str | None":
    """None when the kernel takes logits of this dtype, else why not."""
    if dtype not in DTYPES:
        return f"logits dtype {dtype} (supported: float32, float16, bfloat16)"
    return None


def supports_loss(hidden: torch.Tensor, compute_dtype: torch.dtype) -> "str | None":
    """fastgpt.ops.select_path's form: the loss of ``hidden`` computes its logits in ``compute_dtype``."""
    return supports(compute_dtype)


def launch(logits, targets, losses, scale, ignore_index: int, compute_grad: bool):
    rows, n_cols = logits.shape
    args = (logits, targets, losses, scale, logits.stride(0), n_cols, ignore_index)
    return (rows,), args, dict(COMPUTE_GRAD=compute_grad, BLOCK=block_for(n_cols), num_warps=NUM_WARPS)


@torch.library.custom_op("fastgpt::cross_entropy_rows_", mutates_args=("logits",))
def cross_entropy_rows_op(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                          compute_grad: bool) -> torch.Tensor:
    losses = new_output((logits.shape[0],), torch.float32, logits.device)
    if logits.shape[0]:
        with on_device(logits):
            run(_cross_entropy_rows_kernel, launch(logits, targets, losses, scale, ignore_index, compute_grad))
    return losses


@cross_entropy_rows_op.register_fake
def _(logits, targets, scale, ignore_index, compute_grad):
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                       compute_grad: bool) -> torch.Tensor:
    """Per-row float32 losses of ``logits`` (rows × V, unit column stride); with ``compute_grad``
    the logits are overwritten by ``(softmax − onehot(targets)) · scale`` (0 on ignored rows)."""
    same_device("cross_entropy", logits=logits, targets=targets, scale=scale)
    reason = supports(logits.dtype)
    if reason is not None:
        raise ValueError(f"cross_entropy: {reason}")
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"cross_entropy: logits must be 2-D with contiguous rows, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: targets must have shape ({logits.shape[0]},), got {tuple(targets.shape)}")
    return cross_entropy_rows_op(logits, targets.to(torch.int64), scale.to(torch.float32).reshape(1), ignore_index,
                                 compute_grad)

"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T`` without ever building the logits.

A GPT-2 training step's largest tensors are its logits (batch · seq_len ×
50,257) and, in ``F.cross_entropy``, their log-softmax and their gradient.
Here the rows go through in chunks; each chunk's logits live only long enough
to give that chunk's loss and its share of both gradients, which are computed
during the forward pass, so the backward pass needs no logits at all
(Liger-Kernel's idea; this is our own implementation). Per chunk of rows:

    z = h Wᵀ                                   (rows × V, one matmul)
    m = max_j z_j      s = Σ_j exp(z_j − m)    lse = m + log s
    loss_i = lse_i − z_{i, t_i}                (0 where t_i == ignore_index)
    g = (softmax(z) − onehot(t)) · c           c = 1 / n_valid ("mean") or 1 ("sum"), 0 on ignored rows
    dh = g W        dW += gᵀ h                 (g overwrites z in place)

The softmax/gradient step is an op of ``fastgpt/ops.py`` (``cross_entropy_rows``):
a Triton kernel on CUDA (one program per row, online log-sum-exp over the
vocabulary, kernels/cross_entropy.py) and the same arithmetic in eager PyTorch
elsewhere; the matmuls are torch's. The backward pass only scales the stored
gradients by the incoming one. Memory beyond the parameters: one chunk of
logits (chosen from the sizes: about ``CHUNK_BYTES``, overridable) instead of
three or four full logits tensors.

Under autocast the matmuls run in autocast's dtype, as ``F.linear`` would, and
the softmax in float32, as ``F.cross_entropy`` does; the weight's gradient is
accumulated in float32.

The loss follows fastgpt's default backend (``fastgpt.set_backend`` /
``use_backend`` without ``op=``) and is counted in
``fastgpt.ops.dispatch_counts[("linear_cross_entropy", path)]``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import ops
from .kernels.runtime import device_mismatch  # no Triton import

REDUCTIONS = ("mean", "sum")
# F.cross_entropy takes int64 and uint8 class ids; int32 works here too (fastgpt always took it).
TARGET_DTYPES = (torch.int64, torch.uint8, torch.int32)
CHUNK_BYTES = 64 * 2**20  # one chunk of logits, in the matmuls' dtype
MIN_CHUNK_ROWS = 16


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               ignore_index: int = -100, reduction: str = "mean",
                               chunk_size: Optional[int] = None) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, ...)`` without materialising the logits.

    hidden: (..., emb_dim); weight: (vocab_size, emb_dim), as ``nn.Linear``
    stores it; targets: integer class ids of shape ``hidden.shape[:-1]``.
    ``reduction`` is "mean" (over the targets that are not ``ignore_index``;
    NaN when all are, as ``F.cross_entropy``) or "sum". ``chunk_size``: rows per
    chunk (default: from the sizes, about ``CHUNK_BYTES`` of logits at a time).
    """
    compute_dtype = _check(hidden, weight, targets, ignore_index, reduction, chunk_size)
    if targets.dtype == torch.uint8:  # F.cross_entropy takes Byte targets; gather() takes int32/int64 only
        targets = targets.long()
    hidden2d, targets1d = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if chunk_size is None:
        chunk_size = default_chunk_rows(hidden2d.shape[0], weight.shape[0], compute_dtype.itemsize)
    rows_fn = ops.cross_entropy_rows(hidden, compute_dtype)  # Triton or eager, per fastgpt's backend choice
    args = hidden2d, weight, targets1d, ignore_index, reduction, chunk_size, compute_dtype, rows_fn
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(*args)
    with torch.autocast(hidden.device.type, enabled=False):  # evaluation: the losses alone
        return _chunked(*args, want_dh=False, want_dw=False)[0]


def default_chunk_rows(n_rows: int, vocab_size: int, itemsize: int) -> int:
    """Rows per chunk: about CHUNK_BYTES of logits, split evenly (no ragged last chunk)."""
    rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // max(1, vocab_size * itemsize))
    chunks = math.ceil(n_rows / rows) if n_rows else 1
    return max(1, math.ceil(n_rows / chunks))


def _check(hidden, weight, targets, ignore_index, reduction, chunk_size) -> torch.dtype:
    """Raise a clear error for bad input; return the matmuls' dtype."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_linear_cross_entropy: {name} must be a torch.Tensor, got {type(t).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"fused_linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r} "
                         "(per-token losses need the logits: use F.cross_entropy(..., reduction='none'))")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"fused_linear_cross_entropy: ignore_index must be an int, got {ignore_index!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be a positive int or None, got {chunk_size!r}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"fused_linear_cross_entropy: hidden and weight must be floating point, got "
                        f"{hidden.dtype} and {weight.dtype}")
    if targets.dtype not in TARGET_DTYPES:
        integer = not (targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool)
        raise TypeError(f"fused_linear_cross_entropy: targets must be integer class ids of dtype torch.long "
                        f"(torch.uint8 and torch.int32 also work), got {targets.dtype}"
                        + ("; convert them with targets.long()" if integer else ""))
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"fused_linear_cross_entropy: weight must be (vocab_size, emb_dim) with emb_dim = "
                         f"hidden.shape[-1]; got hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"fused_linear_cross_entropy: targets must have shape hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    if hidden.numel() == 0 or weight.shape[0] == 0:
        raise ValueError(f"fused_linear_cross_entropy: empty input (hidden {tuple(hidden.shape)}, weight "
                         f"{tuple(weight.shape)})")
    problem = device_mismatch(hidden=hidden, weight=weight, targets=targets)
    if problem:
        raise ValueError(f"fused_linear_cross_entropy: {problem}")
    if not torch.compiler.is_compiling():  # one device sync; F.cross_entropy checks the same
        bad = targets[(targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))]
        if bad.numel():
            raise ValueError(f"fused_linear_cross_entropy: target {int(bad[0])} is outside the vocabulary "
                             f"[0, {weight.shape[0]}) and is not ignore_index ({ignore_index})")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"fused_linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; "
                        "cast one, or run under torch.autocast")
    return hidden.dtype


# ---------------------------------------------------------------- the chunked op and its autograd

class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size, compute_dtype, rows_fn):
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen here, explicitly
            loss, grad_hidden, grad_weight = _chunked(hidden, weight, targets, ignore_index, reduction, chunk_size,
                                                      compute_dtype, rows_fn, want_dh, want_dw)
        # Saved tensors are released before autograd hands the gradients on, so
        # grad_weight becomes weight.grad without a copy.
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place: a copy of grad_weight would cost a weight-sized tensor. A second
        # backward through the same graph (retain_graph=True) then fails torch's
        # saved-tensor version check instead of scaling twice.
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight.mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _chunked(hidden, weight, targets, ignore_index, reduction, chunk_size, compute_dtype, rows_fn, want_dh, want_dw):
    n = hidden.shape[0]
    compute_grad = want_dh or want_dw
    valid = (targets != ignore_index).sum()
    # c in the formulas above: 1/n_valid (inf when every target is ignored: the
    # loss is then NaN and every gradient 0, as F.cross_entropy gives).
    scale = (1.0 / valid.float()) if reduction == "mean" else torch.ones((), device=hidden.device)
    w = weight.to(compute_dtype)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if want_dh else None
    grad_weight, partial = None, None
    if want_dw:
        # float32 accumulation when the matmuls run in half precision (autocast).
        accumulate_dtype = weight.dtype if weight.dtype == compute_dtype else torch.float32
        grad_weight = torch.zeros(weight.shape, dtype=accumulate_dtype, device=weight.device)
        if accumulate_dtype != compute_dtype:
            partial = torch.empty(weight.shape, dtype=compute_dtype, device=weight.device)
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        h = hidden[rows].to(compute_dtype)
        logits = h @ w.t()
        losses[rows] = rows_fn(logits, targets[rows], scale, ignore_index, compute_grad)
        if want_dh:
            if grad_hidden.dtype == compute_dtype:
                torch.mm(logits, w, out=grad_hidden[rows])
            else:
                grad_hidden[rows] = logits @ w
        if want_dw:
            if partial is None:
                grad_weight.addmm_(logits.t(), h)
            else:
                torch.mm(logits.t(), h, out=partial)
                grad_weight += partial
        del logits, h
    total = losses.sum()
    loss = total / valid if reduction == "mean" else total
    if grad_weight is not None and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    return loss, grad_hidden, grad_weight

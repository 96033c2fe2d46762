"""Column sums of float32 partial-sum tables, in a fixed order: the last step of a deterministic
parameter gradient (LayerNorm's dW and dB, the MLP bias's dB).

A backward kernel gives each program its own row of a (programs × N) float32
table and adds its rows' contributions there; this kernel then sums the table's
rows, always in the same order, and writes the result in the parameter's dtype:

    out_j = Σ_p partial_pj          (and, with a second table, out2_j = Σ_p partial2_pj)

So the gradient is bit-for-bit repeatable (no atomics) and costs one small
launch instead of a torch ``sum`` and a cast per parameter.
"""

import triton
import triton.language as tl

from .runtime import run

BLOCK_N = 128  # columns per program
BLOCK_P = 16   # table rows summed per step


@triton.jit(do_not_specialize=["rows"])
def _column_sum_kernel(PARTIAL, OUT, PARTIAL2, OUT2, rows, N, TWO: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    total2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, rows, BLOCK_P):
        block = start + tl.arange(0, BLOCK_P)
        offsets = block[:, None] * N + cols[None, :]
        inside = (block[:, None] < rows) & (cols[None, :] < N)
        total += tl.sum(tl.load(PARTIAL + offsets, mask=inside, other=0.0), axis=0)
        if TWO:
            total2 += tl.sum(tl.load(PARTIAL2 + offsets, mask=inside, other=0.0), axis=0)
    tl.store(OUT + cols, total.to(OUT.dtype.element_ty), mask=cols < N)
    if TWO:
        tl.store(OUT2 + cols, total2.to(OUT2.dtype.element_ty), mask=cols < N)


def launch(partial, out, partial2=None, out2=None):
    """(grid, arguments, keyword arguments) summing ``partial`` into ``out`` (and ``partial2`` into ``out2``)."""
    rows, n = partial.shape
    two = partial2 is not None
    args = (partial, out, partial2 if two else partial, out2 if two else out, rows, n)
    return (triton.cdiv(n, BLOCK_N),), args, dict(TWO=two, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, num_warps=4)


def column_sum_(partial, out, partial2=None, out2=None) -> None:
    """out[:] = partial.sum(0) (and out2[:] = partial2.sum(0)), deterministically. The caller makes
    the device current (kernels/runtime.py on_device)."""
    run(_column_sum_kernel, launch(partial, out, partial2, out2))

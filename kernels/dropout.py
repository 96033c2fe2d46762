"""The dropout keep-mask shared by the attention and LayerNorm kernels: 16 decisions per Philox call.

Element (row i, column j) of stream s (the batch·head index in attention, 0 in
LayerNorm) under seed σ is kept iff

    byte_{j mod 16}( Philox4x32-10(key = σ, counter = (⌊j/16⌋, i, s, 0)) ) ≥ t,     t = round(256 · p)

Philox returns 128 random bits per counter; all of them are used, one byte per
decision, so an aligned group of 16 columns of a row costs one Philox call
(FlashAttention-2's scheme) instead of one call per element. The mask is a pure
function of (σ, s, i, j): the backward pass regenerates exactly the forward's
mask, whatever tile sizes either uses, and rows, columns and streams never
share a counter (no 32-bit offset i·T + j to overflow).

The drop probability is rounded to a multiple of 1/256: p_q = t / 256 (p = 0.1
becomes 26/256 = 0.1016). Kept values are scaled by 1 / (1 − p_q), so the
expectation is exactly the undropped value.
"""

import triton
import triton.language as tl

DROPOUT_LEVELS = 256  # one byte per decision
GROUP = 16            # columns decided by one Philox call (16 bytes)


def quantize(p: float) -> tuple[int, float]:
    """(threshold t, scale 1/(1 − t/256)) for drop probability p in [0, 1)."""
    threshold = min(round(p * DROPOUT_LEVELS), DROPOUT_LEVELS - 1)
    return threshold, 1.0 / (1.0 - threshold / DROPOUT_LEVELS)


@triton.jit
def keep_tile(seed, stream, rows, col_start, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask of rows × columns col_start .. col_start + BLOCK_N (col_start % 16 == 0, BLOCK_N % 16 == 0)."""
    groups: tl.constexpr = BLOCK_N // 16
    zero = tl.zeros([BLOCK_M, groups], dtype=tl.uint32)
    counter_col = (col_start // 16 + tl.arange(0, groups)).to(tl.uint32)[None, :] + zero
    counter_row = rows.to(tl.uint32)[:, None] + zero
    counter_stream = (zero + stream).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, counter_col, counter_row, counter_stream, zero)
    # Word w of group g decides columns 16g + 4w .. 16g + 4w + 3, one byte each. join
    # stacks along a new last axis, so [..., a, b] holds word 2a + b: r0, r1, r2, r3 in order.
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))          # [M, G, 2, 2]
    shifts = tl.arange(0, 4).to(tl.uint32) * 8                # byte c of a word: bits 8c .. 8c + 7
    random_bytes = (words[:, :, :, :, None] >> shifts[None, None, None, None, :]).to(tl.uint8)  # truncates
    # Bytes, not booleans, cross into the caller's layout; the compare happens there.
    return tl.reshape(random_bytes, [BLOCK_M, BLOCK_N]) >= threshold.to(tl.uint8)


@triton.jit
def keep_row(seed, stream, row, threshold, BLOCK_N: tl.constexpr):
    """The keep-mask of columns 0 .. BLOCK_N of one row (BLOCK_N % 16 == 0)."""
    groups: tl.constexpr = BLOCK_N // 16
    zero = tl.zeros([groups], dtype=tl.uint32)
    counter_col = tl.arange(0, groups).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, counter_col, (zero + row).to(tl.uint32), (zero + stream).to(tl.uint32), zero)
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))          # [G, 2, 2]: word 2a + b
    shifts = tl.arange(0, 4).to(tl.uint32) * 8
    random_bytes = (words[:, :, :, None] >> shifts[None, None, None, :]).to(tl.uint8)  # truncates
    return tl.reshape(random_bytes, [BLOCK_N]) >= threshold.to(tl.uint8)

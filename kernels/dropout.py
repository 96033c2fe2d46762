"""The dropout keep-mask shared by the attention and LayerNorm kernels: 16 decisions per Philox call.

Philox4x32-10 returns 128 random bits per counter; all of them are used, one
byte per decision, so 16 elements of a row cost one Philox call
(FlashAttention-2's scheme) instead of one call per element. Under seed σ an
element is kept iff its byte ≥ t, t = round(256 · p). The mask is a pure
function of (σ, stream s, row i, column j) -- the backward regenerates exactly
the forward's mask whatever tile sizes either uses -- and rows, columns and
streams never share a counter (no 32-bit offset i·T + j to overflow).

Which 16 columns share a call differs by kernel, chosen so the random bytes are
born where the kernel's tile needs them:

- **Attention** (``keep_tile``; s = batch·head): column j is byte 2·j₃ + j₀ of
  word 2·j₅ + j₄ (jₖ: bit k of j) of Philox(key σ, counter (4·⌊j/64⌋ + ⌊j/2⌋ mod 4, i, s, 0)).
  These are the 16 columns one thread holds of a row of a 64-column tensor-core
  accumulator (wgmma on sm_90, mma.sync on sm_80: pairs of columns 8 apart), so
  the forward builds the mask in registers with no shuffle through shared memory.
- **LayerNorm** (``keep_row``; s = 0): column 16g + 4w + c is byte c of word w of
  Philox(key σ, counter (g, i, 0, 0)).

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
def _bytes_of(words, NDIM: tl.constexpr):
    """words [..., 2(x), 2(y)] or [..., 2(y)] or [...] -> byte 2z + u of each word, on two new last axes
    [..., 2(z), 2(u)], as the top byte of a uint32 (the bits below it are the lower bytes: a compare
    with t·2²⁴ ignores them, so no mask is needed)."""
    shifts = (24 - tl.arange(0, 2)[:, None] * 16 - tl.arange(0, 2)[None, :] * 8).to(tl.uint32)  # [z, u]
    if NDIM == 5:
        return words[:, :, :, :, :, None, None] << shifts[None, None, None, None, None, :, :]
    elif NDIM == 3:
        return words[:, :, :, None, None] << shifts[None, None, None, :, :]
    else:
        return words[:, :, None, None] << shifts[None, None, :, :]


@triton.jit
def keep_tile(seed, stream, rows, col_start, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              TRANSPOSED: tl.constexpr = False):
    """The keep-mask of rows × columns col_start .. col_start + BLOCK_N (BLOCK_N in {16, 32} or a
    multiple of 64; col_start % BLOCK_N == 0). Two constructions of the same function: in place, the
    selects and shifts fold per register of a tensor-core accumulator; TRANSPOSED (the caller holds
    the tile transposed, so the values cross threads through shared memory), joins keep that
    shuffle to the Philox words."""
    if BLOCK_N >= 64 and TRANSPOSED:
        windows: tl.constexpr = BLOCK_N // 64
        zero3 = tl.zeros([BLOCK_M, windows, 4], dtype=tl.uint32)
        group = ((col_start // 64 + tl.arange(0, windows))[:, None] * 4 + tl.arange(0, 4)[None, :]).to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, group[None, :, :] + zero3, rows.to(tl.uint32)[:, None, None] + zero3,
                                   (zero3 + stream).to(tl.uint32), zero3)
        words = tl.join(tl.join(r0, r2), tl.join(r1, r3))        # [M, W, q, x, y]: word 2x + y
        random_bytes = _bytes_of(words, 5)                        # [M, W, q, x, y, z, u]
        ordered = tl.permute(random_bytes, (0, 1, 3, 4, 5, 2, 6))  # column 64W + 32x + 16y + 8z + 2q + u
    elif BLOCK_N >= 64:
        windows: tl.constexpr = BLOCK_N // 64
        # Axes [row, window, x, y, z, q, u]: column 64·window + 32x + 16y + 8z + 2q + u. In a
        # tensor-core accumulator x, y, z, u are one thread's registers: the selects fold.
        zero = tl.zeros([BLOCK_M, windows, 1, 1, 1, 4, 1], dtype=tl.uint32)
        window = (col_start // 64 + tl.arange(0, windows))[None, :, None, None, None, None, None]
        q = tl.arange(0, 4)[None, None, None, None, None, :, None]
        r0, r1, r2, r3 = tl.philox(seed, (window * 4 + q).to(tl.uint32) + zero,
                                   rows.to(tl.uint32)[:, None, None, None, None, None, None] + zero,
                                   (zero + stream).to(tl.uint32), zero)
        two = tl.arange(0, 2)
        x = two[None, None, :, None, None, None, None] != 0
        y = two[None, None, None, :, None, None, None] != 0
        words = tl.where(x, tl.where(y, r3, r2), tl.where(y, r1, r0))     # word 2x + y
        shift = (24 - 16 * two[None, None, None, None, :, None, None]
                 - 8 * two[None, None, None, None, None, None, :]).to(tl.uint32)  # byte 2z + u on top
        ordered = words << shift
    else:
        zero = tl.zeros([BLOCK_M, 4], dtype=tl.uint32)
        group = ((col_start // 64) * 4 + tl.arange(0, 4)).to(tl.uint32)[None, :] + zero
        r0, r1, r2, r3 = tl.philox(seed, group, rows.to(tl.uint32)[:, None] + zero, (zero + stream).to(tl.uint32), zero)
        upper = ((col_start // 32) % 2) != 0                      # x: the window's upper 32 columns
        if BLOCK_N == 32:
            words = tl.join(tl.where(upper, r2, r0), tl.where(upper, r3, r1))  # [M, q, y]
            ordered = tl.permute(_bytes_of(words, 3), (0, 2, 3, 1, 4))       # column 16y + 8z + 2q + u
        else:
            tl.static_assert(BLOCK_N == 16, "keep_tile: BLOCK_N must be 16, 32 or a multiple of 64")
            odd = ((col_start // 16) % 2) != 0                    # y
            words = tl.where(upper, tl.where(odd, r3, r2), tl.where(odd, r1, r0))  # [M, q]
            ordered = tl.permute(_bytes_of(words, 2), (0, 2, 1, 3))          # column 8z + 2q + u
    # Words, not booleans, cross into the caller's layout; the compare happens there:
    # byte >= t  <=>  (byte·2²⁴ + lower bits) >= t·2²⁴.
    return tl.reshape(ordered, [BLOCK_M, BLOCK_N]) >= (threshold.to(tl.uint32) << 24)


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

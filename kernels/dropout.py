"""The dropout keep-masks of the attention and LayerNorm kernels: every random bit used, one byte per decision.

Under seed σ an element is kept iff its random byte ≥ t, t = round(256 · p), and
every byte of each Philox call decides an element (FlashAttention-2's scheme)
instead of one call per element. The mask is a pure function of (σ, row i,
column j, and for attention the batch·head stream s) -- the backward regenerates
exactly the forward's mask whatever tile sizes either uses -- and rows, columns
and streams never share a counter (no 32-bit offset i·T + j to overflow).

Which columns share a call differs by kernel, chosen so the random bytes are
born in the registers of the thread that needs them (no shuffle through shared
memory):

- **Attention** (``keep_tile``): Philox4x32-10, key σ (64 bits), 16 columns per
  call. Column j is byte 2·j₃ + j₀ of word 2·j₅ + j₄ (jₖ: bit k of j) of
  counter (4·⌊j/64⌋ + ⌊j/2⌋ mod 4, i, s, 0): the 16 columns one thread holds of
  a row of a 64-column tensor-core accumulator (wgmma on sm_90, mma.sync on
  sm_80: pairs of columns 8 apart).
- **LayerNorm** (``keep_row``): Philox2x32-10, 8 columns per call, the 8
  contiguous columns one thread loads as a 16-byte vector of fp16/bf16. Column
  8g + 4w + c is byte c of word w of counter (g, i ⊕ ⌊σ/2³²⌋) under key σ mod 2³².
  Half the Philox width, half the work: an fp16 thread makes one call for its 8
  columns; an fp32 thread (4-column vectors) one call per vector, keeping one word.

The drop probability is rounded to a multiple of 1/256: p_q = t / 256 (p = 0.1
becomes 26/256 = 0.1016). Kept values are scaled by 1 / (1 − p_q), so the
expectation is exactly the undropped value.
"""

import triton
import triton.language as tl

DROPOUT_LEVELS = 256  # one byte per decision
# An X+dropout launch may cost at most this × the SASS instructions of its p = 0 twin, on sm_80 and sm_90
# (the report checks every case the catalogue holds to it: kernels/report/catalogue.py).
MAX_DROPOUT_COST = 1.5


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


# Philox2x32 (Salmon et al., SC'11): a 64-bit counter (c0, c1) and a 32-bit key, each round
#   (c0, c1) <- (hi(M·c0) ⊕ c1 ⊕ k, lo(M·c0)),   k <- k + W   (mod 2³²)
PHILOX2_M = tl.constexpr(0xD256D193)
PHILOX2_W = tl.constexpr(0x9E3779B9)


@triton.jit
def philox2x32_10(c0, c1, key):
    """Philox2x32-10 of uint32 counters (c0, c1) under a uint32 key: two random uint32 words."""
    for _ in tl.static_range(10):
        product_hi = tl.umulhi(c0, PHILOX2_M)
        product_lo = c0 * PHILOX2_M
        c0 = product_hi ^ c1 ^ key
        c1 = product_lo
        key = key + PHILOX2_W
    return c0, c1


@triton.jit
def keep_row(seed, row, threshold, BLOCK_N: tl.constexpr):
    """The keep-mask of columns 0 .. BLOCK_N of one row (BLOCK_N % 8 == 0)."""
    calls: tl.constexpr = BLOCK_N // 8
    # Axes [call, word, byte]: column 8·call + 4·word + byte. Where a thread holds 8 contiguous
    # columns, word and byte are its registers and the select and shifts fold (with 4, the
    # word is the thread's: one select).
    zero = tl.zeros([calls, 1, 1], dtype=tl.uint32)
    seed = seed.to(tl.uint64)
    key = (seed & 0xFFFFFFFF).to(tl.uint32)
    call = tl.arange(0, calls).to(tl.uint32)[:, None, None] + zero
    row_word = (zero + row).to(tl.uint32) ^ (seed >> 32).to(tl.uint32)
    r0, r1 = philox2x32_10(call, row_word, key)
    words = tl.where((tl.arange(0, 2) != 0)[None, :, None], r1, r0)
    shift = (24 - 8 * tl.arange(0, 4)).to(tl.uint32)[None, None, :]   # byte c on top
    return tl.reshape(words << shift, [BLOCK_N]) >= (threshold.to(tl.uint32) << 24)

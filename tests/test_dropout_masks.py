"""The dropout keep-mask of the attention and LayerNorm kernels (kernels/dropout.py).

The masks are documented pure functions of (seed, stream, row, column), one byte
per decision: attention one Philox4x32-10 call per 16 scores, LayerNorm one
Philox2x32-10 call per 8 elements. NumPy Philox written from the algorithm's
definition (checked against the published known-answer vectors) checks the
kernels bit for bit; statistics check the keep rate and that neighbouring rows,
columns (inside and across a call's group), heads and seeds are uncorrelated.
"""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import fastgpt.kernels.attention as attention_kernels
import fastgpt.kernels.layer_norm as layer_norm_kernels
from fastgpt import ops
from fastgpt.kernels.dropout import keep_tile, philox2x32_10, quantize
from helpers import kernel_device

DEVICE = kernel_device()
SEED = 0x1234_5678_9ABC  # wider than 32 bits: both key words matter

pytestmark = [pytest.mark.usefixtures("forced_triton"), pytest.mark.kernels]


def philox4x32_10(counters: np.ndarray, seed: int) -> np.ndarray:
    """Philox4x32 with 10 rounds (Salmon et al., SC'11) on uint32 counters (..., 4) -> (..., 4)."""
    mask = np.uint64(0xFFFFFFFF)
    c = [counters[..., i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p2 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p2 >> np.uint64(32)) ^ c[1] ^ k0, p2 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return np.stack(c, axis=-1).astype(np.uint32)


def philox2x32_10_reference(c0: np.ndarray, c1: np.ndarray, key: int) -> tuple[np.ndarray, np.ndarray]:
    """Philox2x32 with 10 rounds on uint32 counters (c0, c1) and a 32-bit key."""
    mask = np.uint64(0xFFFFFFFF)
    c0, c1, key = c0.astype(np.uint64), c1.astype(np.uint64), np.uint64(key)
    for _ in range(10):
        product = np.uint64(0xD256D193) * c0
        c0, c1 = ((product >> np.uint64(32)) ^ c1 ^ key) & mask, product & mask
        key = (key + np.uint64(0x9E3779B9)) & mask
    return c0.astype(np.uint32), c1.astype(np.uint32)


# Random123's known-answer vectors for philox2x32_10: (counter c0, c1, key) -> (word 0, word 1).
PHILOX2X32_10_KAT = [
    ((0x00000000, 0x00000000, 0x00000000), (0xFF1DAE59, 0x6CD10DF2)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0x2C3F628B, 0xAB4FD7AD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E), (0xDD7CE038, 0xF62A4C12)),
]


def reference_mask(seed: int, rows: int, cols: int, p: float) -> np.ndarray:
    """The LayerNorm kernel's keep-mask: column 8g + 4w + c of row i is byte c of word w of
    Philox2x32(counter = (g, i ⊕ ⌊σ / 2³²⌋), key = σ mod 2³²) >= round(256 p)."""
    threshold, _ = quantize(p)
    calls = -(-cols // 8)
    i, g = np.meshgrid(np.arange(rows, dtype=np.uint32), np.arange(calls, dtype=np.uint32), indexing="ij")
    words = np.stack(philox2x32_10_reference(g, i ^ np.uint32(seed >> 32), seed & 0xFFFFFFFF), axis=-1)
    as_bytes = words[..., :, None] >> (np.arange(4, dtype=np.uint32) * 8)  # (rows, calls, word, byte)
    decisions = (as_bytes & 0xFF) >= threshold
    return decisions.reshape(rows, calls * 8)[:, :cols]


def reference_tile_mask(seed: int, stream: int, rows: int, cols: int, p: float) -> np.ndarray:
    """The attention kernels' keep-mask (keep_tile): column j of row i is byte 2·j₃ + j₀ of word
    2·j₅ + j₄ (jₖ: bit k of j) of Philox(counter = (4·(j // 64) + (j // 2) mod 4, i, stream, 0))."""
    threshold, _ = quantize(p)
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    group = 4 * (j // 64) + (j // 2) % 4
    counters = np.stack([group, i, np.full_like(i, stream), np.zeros_like(i)], axis=-1).astype(np.uint32)
    words = philox4x32_10(counters, seed)                                  # (rows, cols, 4)
    word = 2 * ((j >> 5) & 1) + ((j >> 4) & 1)
    byte = 2 * ((j >> 3) & 1) + (j & 1)
    chosen = np.take_along_axis(words, word[..., None], axis=-1)[..., 0]
    return ((chosen >> (8 * byte).astype(np.uint32)) & 0xFF) >= threshold


@pytest.fixture
def fixed_seed(monkeypatch):
    """Every dropout call draws SEED (the kernels otherwise draw from torch's generator)."""
    def draw(device):
        return torch.tensor([SEED], dtype=torch.int64, device=device)
    monkeypatch.setattr(layer_norm_kernels, "dropout_seed", draw)
    monkeypatch.setattr(attention_kernels, "dropout_seed", draw)


def layer_norm_mask(rows: int, cols: int, p: float) -> np.ndarray:
    """The dropout+add+LayerNorm kernel's mask: with x = 0 and branch = 1, h = keep / (1 − p_q)."""
    zeros = torch.zeros(rows, cols, device=DEVICE)
    ones = torch.ones(rows, cols, device=DEVICE)
    h, _ = ops.dropout_add_layer_norm(zeros, ones, torch.ones(cols, device=DEVICE),
                                      torch.zeros(cols, device=DEVICE), 1e-5, p)
    kept = h.cpu().numpy()
    assert np.all((kept == 0) | np.isclose(kept, quantize(p)[1], rtol=1e-6)), "kept values scaled by 1/(1-p_q)"
    return kept != 0


def attention_mask(heads: int, t: int, p: float, d: int = 64) -> np.ndarray:
    """The attention kernel's mask (b = 1): with q = k = 0 the causal weights are 1/(i+1), and
    v = the identity's columns on keys c .. c + d makes the output P ∘ Z / (1 − p_q) there."""
    zeros = torch.zeros(1, heads, t, d, device=DEVICE)
    mask = np.zeros((heads, t, t), dtype=bool)
    for first_key in range(0, t, d):
        eye = torch.eye(t, d, device=DEVICE)
        v = torch.roll(eye, first_key, dims=0).expand(1, heads, t, d)  # key first_key + c -> column c
        out = ops.causal_attention(zeros, zeros, v, dropout_p=p)
        width = min(d, t - first_key)
        mask[:, :, first_key:first_key + width] = (out[0, :, :, :width] != 0).cpu().numpy()
    return mask


def test_layer_norm_mask_is_the_documented_philox_function(fixed_seed):
    p = 0.3
    got = layer_norm_mask(7, 100, p)  # 100 columns: 12 whole groups of 8 and a ragged one
    assert np.array_equal(got, reference_mask(SEED, 7, 100, p))
    assert ops.dispatch_counts[("dropout_add_layer_norm", "triton")] == 1


@pytest.mark.parametrize("t", [40, 150])  # inside one 64-key window; across three, the last ragged
def test_attention_mask_is_the_documented_philox_function_of_each_head(fixed_seed, t):
    p, heads = 0.2, 3
    got = attention_mask(heads, t, p)
    causal = np.tril(np.ones((t, t), dtype=bool))
    for head in range(heads):
        want = reference_tile_mask(SEED, head, t, t, p) & causal  # stream = batch·heads index
        assert np.array_equal(got[head], want), f"head {head}"
    assert ops.dispatch_counts[("causal_attention", "triton")] == -(-t // 64)


def test_attention_mask_keep_rate_and_independence_inside_and_across_philox_groups():
    p, t = 0.25, 192
    torch.manual_seed(2)
    mask = attention_mask(1, t, p)[0]
    rows = mask[128:]  # rows that see every key of the first two 64-key windows
    assert abs(rows[:, :128].mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / rows[:, :128].size)
    pairs = {  # keep_tile: column j is byte 2·j₃ + j₀ of word 2·j₅ + j₄ of group 4·(j // 64) + (j // 2) mod 4
        "next byte, same word": (rows[:, 0:128:2], rows[:, 1:128:2]),
        "next group": (rows[:, 0:126], rows[:, 2:128]),
        "byte 0 and byte 2 of a word": (rows[:, 0:120], rows[:, 8:128]),
        "next word": (rows[:, 0:112], rows[:, 16:128]),
        "next window": (rows[:, 0:64], rows[:, 64:128]),
        "next row": (rows[:-1, :128], rows[1:, :128]),
    }
    for name, (a, b) in pairs.items():
        assert abs(_correlation(a, b)) < 5 / math.sqrt(a.size), name


def test_numpy_philox2x32_matches_the_published_known_answers():
    for (c0, c1, key), want in PHILOX2X32_10_KAT:
        got = philox2x32_10_reference(np.array([c0]), np.array([c1]), key)
        assert (int(got[0][0]), int(got[1][0])) == want


@triton.jit
def _philox2x32_kernel(C0, C1, KEY, OUT0, OUT1, N: tl.constexpr):
    i = tl.arange(0, N)
    r0, r1 = philox2x32_10(tl.load(C0 + i).to(tl.uint32), tl.load(C1 + i).to(tl.uint32), tl.load(KEY).to(tl.uint32))
    tl.store(OUT0 + i, r0.to(tl.int64))  # zero-extended
    tl.store(OUT1 + i, r1.to(tl.int64))


def test_kernel_philox2x32_matches_the_published_known_answers():
    for (c0, c1, key), want in PHILOX2X32_10_KAT:
        c0s = torch.full((16,), c0, dtype=torch.int64, device=DEVICE)
        c1s = torch.full((16,), c1, dtype=torch.int64, device=DEVICE)
        out0, out1 = torch.zeros_like(c0s), torch.zeros_like(c0s)
        _philox2x32_kernel[(1,)](c0s, c1s, torch.tensor([key], dtype=torch.int64, device=DEVICE), out0, out1, N=16)
        assert set(out0.tolist()) == {want[0]} and set(out1.tolist()) == {want[1]}


def test_p_is_rounded_to_a_multiple_of_1_over_256_and_the_scale_stays_unbiased():
    assert quantize(0.0) == (0, 1.0)
    assert quantize(0.1) == (26, 1 / (1 - 26 / 256))
    assert quantize(0.5) == (128, 2.0)
    assert quantize(0.999)[0] == 255  # never drops everything


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def test_keep_rate_and_independence_across_rows_columns_and_seeds():
    p, rows, cols = 0.25, 256, 512
    torch.manual_seed(0)
    first = layer_norm_mask(rows, cols, p)
    second = layer_norm_mask(rows, cols, p)  # the next call draws the next seed
    assert abs(first.mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / first.size)
    # |correlation| of n pairs of independent bits stays below 5/sqrt(n) (5 sigma).
    pairs = {
        "next column, same word": (first[:, 0::8], first[:, 1::8]),
        "byte 3 and byte 4 (next word)": (first[:, 3::8], first[:, 4::8]),
        "next column, next group": (first[:, 7:-1:8], first[:, 8::8]),
        "same column of the next group": (first[:, :-8], first[:, 8:]),
        "next row": (first[:-1], first[1:]),
        "next seed": (first, second),
    }
    for name, (a, b) in pairs.items():
        assert abs(_correlation(a, b)) < 5 / math.sqrt(a.size), name


def test_heads_draw_independent_masks():
    p, heads, t = 0.5, 8, 64
    torch.manual_seed(1)
    masks = attention_mask(heads, t, p)
    causal = np.tril(np.ones((t, t), dtype=bool))
    kept = masks[:, causal]  # (heads, causal elements)
    assert abs(kept.mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / kept.size)
    for head in range(heads - 1):
        assert abs(_correlation(kept[head], kept[head + 1])) < 5 / math.sqrt(kept.shape[1]), head


@triton.jit
def _keep_tile_kernel(OUT, SEED, stream, first_row, first_col, threshold,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TRANSPOSED: tl.constexpr):
    rows = first_row + tl.arange(0, BLOCK_M)
    keep = keep_tile(tl.load(SEED), stream, rows, first_col, threshold, BLOCK_M, BLOCK_N, TRANSPOSED)
    tl.store(OUT + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], keep.to(tl.int8))


@pytest.mark.parametrize("transposed", [False, True])  # two constructions of one function
@pytest.mark.parametrize("block_n", [16, 32, 64, 128])  # every tile width the attention launchers use
def test_keep_tile_is_the_same_function_at_every_tile_width(block_n, transposed):
    p, stream, first_row, block_m = 0.3, 5, 3, 16
    want = reference_tile_mask(SEED, stream, first_row + block_m, 256, p)[first_row:]
    seed = torch.tensor([SEED], dtype=torch.int64, device=DEVICE)
    for first_col in range(0, 256, block_n):
        out = torch.full((block_m, block_n), 2, dtype=torch.int8, device=DEVICE)  # 2: never written
        _keep_tile_kernel[(1,)](out, seed, stream, first_row, first_col, quantize(p)[0],
                                BLOCK_M=block_m, BLOCK_N=block_n, TRANSPOSED=transposed)
        assert np.array_equal(out.cpu().numpy(), want[:, first_col:first_col + block_n]), first_col

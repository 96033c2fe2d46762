"""Fused causal attention, FlashAttention-2 style: forward, backward and in-kernel dropout.

For one (batch, head), queries Q ∈ R^{T×d}, keys and values K, V ∈ R^{S×d}
(S = T, or S > T for a chunked prefill over a KV cache), scale σ = 1/sqrt(d),
and c = σ·log2(e):

    S_ij = Q_i · K_j,   visible iff j ≤ i + (S − T)   (causal, aligned bottom-right)
    P = softmax_rows(σ S)                             O = (P ∘ Z / (1 − p)) V

Z is the dropout keep-mask (kernels/dropout.py): a pure function of (seed,
batch·head, i, j), one Philox call per 16 scores, p rounded to a multiple of
1/256 -- the backward regenerates exactly the forward's Z.

**Forward.** Each program owns BLOCK_M query rows and walks the key blocks
every row sees in full (no mask), then the diagonal band (masked), keeping in
float32 a running maximum m of the *raw* scores and a running sum l, so each
score costs one fused multiply-add, 2^(c·s − c·m), before its exp2. No T×T
matrix is stored; the row log-sum-exp in base 2, L = c·m + log2(l), is saved.
The query blocks sit on the slow grid axis in reverse, so the longest rows
(causal work grows along the diagonal) start first and the short ones fill
the tail. On sm_90 the Q, K, V and O tiles move through the tensor memory
accelerator (host-side tensor descriptors, TMA); elsewhere through pointers.

**Backward**, one kernel with P = exp2(c·Q Kᵀ − L) recomputed tile by tile:

    Δ_i = Σ_d dO_id O_id                   (a small preprocessing kernel)
    dV = (P∘Z/(1−p))ᵀ dO    dP = (dO Vᵀ) ∘ Z/(1−p)    dS = P ∘ (dP − Δ)
    dK = σ dSᵀ Q            dQ = σ dS K

With dropout no score is multiplied by 1/(1−p): the forward stores L − log2(1/(1−p)),
so the recomputed exp2(c·S − L) is P' = P/(1−p) itself, and Δ' = (1−p)Δ, so
dV = (P'∘Z)ᵀ dO and dS = P' ∘ (Z ∘ (dO Vᵀ) − Δ'): one select per score and per use.

Program j computes dK, dV of key block j (K, V resident, query blocks
streamed) and then dQ of query block j (Q, dO resident, key blocks streamed):
the first shrinks and the second grows with j, so every program does about the
same work and one launch stays balanced along the causal diagonal. Each output
tile has one writer: deterministic, no atomics. With BLOCK_N = 128 resident and
BLOCK_M = 64 streamed rows, every d = 64 matmul is a wgmma with N ≥ 64 on sm_90.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_configs import DELTA_BLOCK_M, FP32_HEAD_DIMS, HEAD_DIMS, arch_family, candidates, pinned
from .autotune import Tuner
from .dropout import keep_tile, quantize
from .outputs import new_output
from .runtime import DTYPES, LOG2_E, device_mismatch, dot_precision, dot_refusal, dropout_seed, on_device, run

try:  # host-side tensor descriptors (TMA), Triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointers everywhere
    TensorDescriptor = None

# Where the forward loads its tiles through TMA descriptors: "auto" (sm_90 and newer,
# half precision, aligned), "always" (also under the interpreter: tests) or "never".
TMA_POLICY = "auto"


# ---------------------------------------------------------------- tile helpers

@triton.jit
def _head(PTR, b, h, stride_b, stride_h):
    """Pointer to the (b, h) slice of a (B, H, T, d) tensor."""
    return PTR + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _load_rows(head, rows, stride_t, T, HEAD_DIM: tl.constexpr):
    """Rows ``rows`` × all head_dim columns of one head; rows ≥ T read as 0."""
    cols = tl.arange(0, HEAD_DIM)
    return tl.load(head + rows[:, None] * stride_t + cols[None, :], mask=rows[:, None] < T, other=0.0)


@triton.jit
def _store_rows(head, rows, stride_t, T, value, HEAD_DIM: tl.constexpr):
    cols = tl.arange(0, HEAD_DIM)
    tl.store(head + rows[:, None] * stride_t + cols[None, :], value.to(head.dtype.element_ty), mask=rows[:, None] < T)


@triton.jit
def _load_tile(X, b, h, start, stride_b, stride_h, stride_t, T, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               USE_TMA: tl.constexpr):
    """Rows start .. start + ROWS of head (b, h): a TMA copy of a descriptor's box, or masked loads."""
    if USE_TMA:  # rows past the tensor's end arrive as zeros
        return X.load([b, h, start, 0]).reshape(ROWS, HEAD_DIM)
    else:
        return _load_rows(_head(X, b, h, stride_b, stride_h), start + tl.arange(0, ROWS), stride_t, T, HEAD_DIM)


@triton.jit
def _load_row_stat(STAT, bh, rows, T, other):
    """Per-row float32 statistic (L or Δ) of one (batch, head); rows ≥ T read as ``other``."""
    return tl.load(STAT + bh.to(tl.int64) * T + rows, mask=rows < T, other=other)


# ---------------------------------------------------------------- forward

@triton.jit
def _fwd_step(acc, m_i, l_i, q, k, v, rows, cols, kv_offset, qk_scale, seed, bh, start_n, band, drop_threshold,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax: scores, running max and sum, accumulated P V."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)          # raw scores Q Kᵀ
    # A run-time branch, not a second copy of the loop: the code of a step (dropout's
    # Philox above all) exists once in the binary.
    if start_n >= band:  # query i (position i + kv_offset) sees keys j ≤ i + kv_offset
        s = tl.where(rows[:, None] + kv_offset >= cols[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.math.exp2(s * qk_scale - (m_new * qk_scale)[:, None])      # one FFMA per score
    alpha = tl.math.exp2((m_i - m_new) * qk_scale)
    l_i = l_i * alpha + tl.sum(p, axis=1)  # the softmax sum uses the undropped weights
    if HAS_DROPOUT:  # drop here, scale the kept weights by 1/(1 − p) once at the end
        p = tl.where(keep_tile(seed, bh, rows, start_n, drop_threshold, BLOCK_M, BLOCK_N), p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["T", "S", "kv_offset", "drop_threshold"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, SEED,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    H, T, S, kv_offset, qk_scale, drop_threshold, keep_scale, log2_keep_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    # Longest rows first: the last query block (most keys) has program_id(1) == 0.
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q, b, h, start_m, stride_qb, stride_qh, stride_qt, T, BLOCK_M, HEAD_DIM, USE_TMA)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    seed = tl.load(SEED) if HAS_DROPOUT else 0

    # Key blocks [0, band) are visible to every row of this block; the band up to the last
    # row's position is masked (it also hides keys ≥ S from the rows ≥ T, which are not stored).
    first_position = start_m + kv_offset
    band = ((first_position + 1) // BLOCK_N) * BLOCK_N
    end = tl.minimum(first_position + BLOCK_M, S)
    for start_n in tl.range(0, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, b, h, start_n, stride_kb, stride_kh, stride_kt, S, BLOCK_N, HEAD_DIM, USE_TMA)
        v = _load_tile(V, b, h, start_n, stride_vb, stride_vh, stride_vt, S, BLOCK_N, HEAD_DIM, USE_TMA)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, rows, cols, kv_offset, qk_scale, seed, bh, start_n, band,
                                  drop_threshold, BLOCK_M, BLOCK_N, HAS_DROPOUT, DOT_PRECISION)

    out = acc * ((keep_scale if HAS_DROPOUT else 1.0) / l_i)[:, None]
    if USE_TMA:  # the descriptor clips rows ≥ T
        O.store([b, h, start_m, 0], out.to(O.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))
    else:
        _store_rows(_head(O, b, h, stride_ob, stride_oh), rows, stride_ot, T, out, HEAD_DIM)
    # With dropout L is stored minus log2(1/(1 − p)): the backward's exp2(c·s − L) is then the kept
    # weights' value P/(1 − p) itself, and dV, dS need no scaling of their own.
    lse = m_i * qk_scale + tl.math.log2(l_i)
    if HAS_DROPOUT:
        lse -= log2_keep_scale
    tl.store(LSE + bh.to(tl.int64) * T + rows, lse, mask=rows < T)


# ---------------------------------------------------------------- backward

@triton.jit(do_not_specialize=["T"])
def _attn_bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                           H, T, delta_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Δ'_i = (1 − p) Σ_d dO_id · O_id for one block of rows of one (batch, head): Δ in the units of
    the backward's unscaled dropout products (delta_scale = 1 − p, or 1 without dropout)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_rows(_head(O, b, h, stride_ob, stride_oh), rows, stride_ot, T, HEAD_DIM)
    do = _load_rows(_head(DO, b, h, stride_dob, stride_doh), rows, stride_dot, T, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1) * delta_scale
    tl.store(DELTA + bh.to(tl.int64) * T + rows, delta, mask=rows < T)


@triton.jit
def _dkdv_step(dk, dv, k, v, q, do, lse, delta, rows, cols, qk_scale, seed, bh, start_n, masked, drop_threshold,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """dK, dV of the resident key block from one streamed block of BLOCK_M queries (transposed tiles).
    With dropout, exp2(c·s − L) is P/(1 − p) (the forward stored L that way) and Δ comes multiplied by
    (1 − p): dSᵀ = (P/(1 − p)) ∘ (Z ∘ dPᵀ − (1 − p)Δ) = P ∘ (Z ∘ dPᵀ/(1 − p) − Δ)."""
    p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
    if masked:  # a run-time branch: one copy of the step in the binary
        p_t = tl.where(rows[None, :] >= cols[:, None], p_t, 0.0)
    if HAS_DROPOUT:
        # dPᵀ before dV, so both selects follow the mask at once (no mask kept across a matmul):
        # dSᵀ = P ∘ (Z ∘ dP − Δ'), one select per score more than without dropout.
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        keep_t = tl.trans(keep_tile(seed, bh, rows, start_n, drop_threshold, BLOCK_M, BLOCK_N, True))
        dv += tl.dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (tl.where(keep_t, dp_t, 0.0) - delta[None, :])
    else:
        # dV first, so dPᵀ is not yet live while Pᵀ is: fewer registers at the peak.
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dq_step(dq, q, do, k, v, lse, delta, rows, cols, qk_scale, seed, bh, start_n, masked, drop_threshold,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ of the resident BLOCK_M queries from one streamed block of BLOCK_N keys (dropout as in _dkdv_step)."""
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
    if masked:
        p = tl.where(rows[:, None] >= cols[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        dp = tl.where(keep_tile(seed, bh, rows, start_n, drop_threshold, BLOCK_M, BLOCK_N), dp, 0.0)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=["T", "drop_threshold"])
def _attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, SEED,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt, stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    H, T, sm_scale, qk_scale, drop_threshold,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program j: dK, dV of keys [j·BLOCK_N, +BLOCK_N), then dQ of queries [j·BLOCK_N, +BLOCK_N).
    BLOCK_M rows are streamed in both halves (BLOCK_N % BLOCK_M == 0)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    block_start = tl.program_id(1) * BLOCK_N
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    q_head = _head(Q, b, h, stride_qb, stride_qh)
    k_head = _head(K, b, h, stride_kb, stride_kh)
    v_head = _head(V, b, h, stride_vb, stride_vh)
    do_head = _head(DO, b, h, stride_dob, stride_doh)

    # dK, dV: the queries overlapping this key block see part of it (masked), those below all of it.
    cols = block_start + tl.arange(0, BLOCK_N)
    k_resident = _load_rows(k_head, cols, stride_kt, T, HEAD_DIM)
    v_resident = _load_rows(v_head, cols, stride_vt, T, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    band_end = tl.minimum(block_start + BLOCK_N, T)
    for start_m in tl.range(block_start, T, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_head, rows, stride_qt, T, HEAD_DIM)
        do = _load_rows(do_head, rows, stride_dot, T, HEAD_DIM)
        # Padded query rows get L = +inf, hence P = 0: they contribute nothing.
        lse = _load_row_stat(LSE, bh, rows, T, float("inf"))
        delta = _load_row_stat(DELTA, bh, rows, T, 0.0)
        dk, dv = _dkdv_step(dk, dv, k_resident, v_resident, q, do, lse, delta, rows, cols, qk_scale, seed, bh,
                            block_start, start_m < band_end, drop_threshold, BLOCK_M, BLOCK_N, HAS_DROPOUT,
                            DOT_PRECISION)
    _store_rows(_head(DK, b, h, stride_dkb, stride_dkh), cols, stride_dkt, T, dk * sm_scale, HEAD_DIM)
    _store_rows(_head(DV, b, h, stride_dvb, stride_dvh), cols, stride_dvt, T, dv, HEAD_DIM)

    # dQ: the key blocks left of these queries unmasked, then the diagonal band masked.
    # (Fresh names: Triton treats a name assigned in a loop and live before it as loop-carried.)
    q_rows = block_start + tl.arange(0, BLOCK_N)
    q_resident = _load_rows(q_head, q_rows, stride_qt, T, HEAD_DIM)
    do_resident = _load_rows(do_head, q_rows, stride_dot, T, HEAD_DIM)
    lse_rows = _load_row_stat(LSE, bh, q_rows, T, float("inf"))
    delta_rows = _load_row_stat(DELTA, bh, q_rows, T, 0.0)
    dq = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_n in tl.range(0, band_end, BLOCK_M):
        keys = start_n + tl.arange(0, BLOCK_M)
        k = _load_rows(k_head, keys, stride_kt, T, HEAD_DIM)
        v = _load_rows(v_head, keys, stride_vt, T, HEAD_DIM)
        dq = _dq_step(dq, q_resident, do_resident, k, v, lse_rows, delta_rows, q_rows, keys, qk_scale, seed, bh,
                      start_n, start_n >= block_start, drop_threshold, BLOCK_N, BLOCK_M, HAS_DROPOUT, DOT_PRECISION)
    _store_rows(_head(DQ, b, h, stride_dqb, stride_dqh), q_rows, stride_dqt, T, dq * sm_scale, HEAD_DIM)


# ---------------------------------------------------------------- launch configuration
# The tiles each launch may take: kernels/attention_configs.py; the tuner times them once per shape.

TUNER = Tuner()
use_config = TUNER.use_config  # use_config("fwd", Config(...)): one config for a kernel, in a with-block


def _choose(kind, q, dropout_p, launch):
    b, h, t, d = q.shape
    dropout = quantize(dropout_p)[0] > 0
    key = TUNER.key_for(kind + ("+dropout" if dropout else ""), d, q.dtype, t, b * h * triton.cdiv(t, 128), q.device)
    family = arch_family(q.device)
    return TUNER.choose(kind, key, candidates(kind, family, d, q.dtype, dropout, q.device), launch,
                        pinned(kind, d, q.dtype == torch.float32, family))


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _like_bthd(t):
    """An output shaped like t (B, H, T, D) but laid out as (B, T, H, D): the layout the model reshapes for free."""
    b, h, n, d = t.shape
    return new_output((b, n, h, d), t.dtype, t.device).transpose(1, 2)


def _problem(q, k, v) -> "str | None":
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        return f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} (need (B, H, T, d) and (B, H, S, d))"
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        return f"keys {tuple(k.shape)} do not match queries {tuple(q.shape)} in batch, heads or head_dim"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (need one of float32, float16, bfloat16 for all three)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (supported: {', '.join(map(str, HEAD_DIMS))})"
    if q.dtype == torch.float32 and q.shape[-1] not in FP32_HEAD_DIMS:
        return (f"float32 with head_dim {q.shape[-1]} (float32 takes head_dim "
                f"{', '.join(map(str, FP32_HEAD_DIMS))}; use float16 or bfloat16)")
    if (problem := device_mismatch(q=q, k=k, v=v)) is not None:
        return problem
    if (problem := dot_refusal(q.device)) is not None:  # T4, V100: eager
        return problem
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return "bfloat16 under the Triton interpreter, whose bf16 tl.dot is wrong (Triton issue 11584)"
    return None


def supports(q, k, v, dropout_p=0.0) -> "str | None":
    if (problem := _problem(q, k, v)) is not None:
        return problem
    if k.shape != q.shape:
        return f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} (need equal (B, H, T, d))"
    return None


def supports_prefill(q, k, v) -> "str | None":
    """The forward kernel over a longer key history (chunked prefill): inference only."""
    if (problem := _problem(q, k, v)) is not None:
        return problem
    if q.shape[2] > k.shape[2]:
        return f"{q.shape[2]} queries but only {k.shape[2]} keys"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "inputs that require grad (a prefill over a cache has no backward)"
    return None


def _uses_tma(q, k, v, o) -> bool:
    if TensorDescriptor is None or TMA_POLICY == "never" or q.dtype == torch.float32:
        return False
    if TMA_POLICY == "always":
        return True
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    # TMA needs 16-byte aligned bases and strides (the model's layouts always are), and real
    # strides: a broadcast (expanded, stride 0) dimension goes through pointers.
    return all(t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 and (s > 0 or n == 1)
                       for s, n in zip(t.stride()[:-1], t.shape[:-1]))
               for t in (q, k, v, o))


def _descriptor(t, rows):
    """A host-side TMA descriptor of a (B, H, T, d) tensor with boxes of rows × d."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]])


# Each launch is described once, by a function returning (grid, positional
# arguments, keyword arguments); the launchers below run it (runtime.run), and the
# compile catalogue (kernels/report/catalogue.py) hands the same description (on
# meta tensors of GPT-2's shapes) to the ahead-of-time report, so the report
# compiles exactly the specialisation that Triton's launcher builds.

def fwd_launch(q, k, v, o, lse, seed, dropout_p, config, precision=None, use_tma=None):
    b, h, t, d = q.shape
    s = k.shape[2]
    if use_tma is None:
        use_tma = _uses_tma(q, k, v, o)
    tiles = ((_descriptor(q, config.block_m), _descriptor(k, config.block_n), _descriptor(v, config.block_n),
              _descriptor(o, config.block_m)) if use_tma else (q, k, v, o))
    grid = (b * h, triton.cdiv(t, config.block_m))
    threshold, keep_scale = quantize(dropout_p)
    args = (*tiles, lse, q if seed is None else seed, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            h, t, s, s - t, LOG2_E / math.sqrt(d), threshold, keep_scale, math.log2(keep_scale))
    meta = dict(HEAD_DIM=d, BLOCK_M=config.block_m, BLOCK_N=config.block_n, HAS_DROPOUT=threshold > 0,
                DOT_PRECISION=precision or dot_precision(q.dtype), USE_TMA=use_tma,
                num_warps=config.num_warps, num_stages=config.num_stages)
    return grid, args, meta


def delta_launch(o, do, delta, dropout_p=0.0):
    b, h, t, d = o.shape
    grid = (triton.cdiv(t, DELTA_BLOCK_M), b * h)
    delta_scale = 1.0 / quantize(dropout_p)[1]
    return grid, (o, do, delta, *_strides(o), *_strides(do), h, t, delta_scale), dict(
        HEAD_DIM=d, BLOCK_M=DELTA_BLOCK_M, num_warps=4)


def bwd_launch(q, k, v, do, lse, delta, dq, dk, dv, seed, dropout_p, config, precision=None):
    b, h, t, d = q.shape
    scale = 1.0 / math.sqrt(d)
    threshold, _ = quantize(dropout_p)
    args = (q, k, v, do, lse, delta, dq, dk, dv, q if seed is None else seed,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), *_strides(dk), *_strides(dv),
            h, t, scale, scale * LOG2_E, threshold)
    meta = dict(HEAD_DIM=d, BLOCK_M=config.block_m, BLOCK_N=config.block_n, HAS_DROPOUT=threshold > 0,
                DOT_PRECISION=precision or dot_precision(q.dtype), num_warps=config.num_warps,
                num_stages=config.num_stages)
    return (b * h, triton.cdiv(t, config.block_n)), args, meta


def _forward(q, k, v, dropout_p, seed):
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    b, h, t, d = q.shape
    o = _like_bthd(q)
    lse = new_output((b, h, t), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse

    def launch(config):
        run(_attn_fwd_kernel, fwd_launch(q, k, v, o, lse, seed, dropout_p, config))

    with on_device(q):
        launch(_choose("fwd", q, dropout_p, launch))
    return o, lse


def _backward(do, q, k, v, o, lse, dropout_p, seed):
    do, q, k, v = (_unit_last_stride(t) for t in (do, q, k, v))
    b, h, t, d = q.shape
    dq, dk, dv = _like_bthd(q), _like_bthd(k), _like_bthd(v)
    if q.numel() == 0:
        return dq, dk, dv
    delta = new_output((b, h, t), torch.float32, q.device)

    def launch(config):
        run(_attn_bwd_kernel, bwd_launch(q, k, v, do, lse, delta, dq, dk, dv, seed, dropout_p, config))

    with on_device(q):
        run(_attn_bwd_delta_kernel, delta_launch(o, do, delta, dropout_p))
        launch(_choose("bwd", q, dropout_p, launch))
    return dq, dk, dv


def prefill_attention(q, k, v):
    """The forward kernel for T queries over S ≥ T keys, query i at position S − T + i (no grad)."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    b, h, t, d = q.shape
    o = _like_bthd(q)
    lse = new_output((b, h, t), torch.float32, q.device)
    if o.numel() == 0:
        return o

    def launch(config):
        run(_attn_fwd_kernel, fwd_launch(q, k, v, o, lse, None, 0.0, config))

    with on_device(q):
        launch(_choose("fwd", q, 0.0, launch))
    return o


# ---------------------------------------------------------------- torch.library ops + autograd

@torch.library.custom_op("fastgpt::causal_attention", mutates_args=())
def causal_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                        seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, dropout_p, seed)


@causal_attention_op.register_fake
def _(q, k, v, dropout_p, seed):
    b, h, t, d = q.shape
    return q.new_empty((b, t, h, d)).transpose(1, 2), q.new_empty((b, h, t), dtype=torch.float32)


@torch.library.custom_op("fastgpt::causal_attention_backward", mutates_args=())
def causal_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 o: torch.Tensor, lse: torch.Tensor, dropout_p: float, seed: Optional[torch.Tensor]
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, dropout_p, seed)


@causal_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, dropout_p, seed):
    def like(t):
        b, h, n, d = t.shape
        return t.new_empty((b, n, h, d)).transpose(1, 2)
    return like(q), like(k), like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, dropout_p, seed = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.dropout_p = dropout_p


def _attention_grad(ctx, do, _dlse):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastgpt.causal_attention_backward(do, q, k, v, o, lse, ctx.dropout_p, seed)
    return dq, dk, dv, None, None


causal_attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


@torch.library.custom_op("fastgpt::prefill_attention", mutates_args=())
def prefill_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return prefill_attention(q, k, v)


@prefill_attention_op.register_fake
def _(q, k, v):
    b, h, t, d = q.shape
    return q.new_empty((b, t, h, d)).transpose(1, 2)


def causal_attention(q, k, v, dropout_p=0.0):
    """softmax(q kᵀ/sqrt(d), causal) with dropout on the weights, times v. (B, H, T, d), any strides."""
    # A device-side seed from torch's generator: torch.manual_seed makes dropout
    # repeatable, and a captured CUDA graph draws a new one at every replay.
    seed = dropout_seed(q.device) if dropout_p > 0.0 else None
    return torch.ops.fastgpt.causal_attention(q, k, v, dropout_p, seed)[0]

"""Fused causal attention, FlashAttention-2 style: forward, backward and in-kernel dropout.

For one (batch, head), queries Q, keys K, values V ∈ R^{T×d}, scale σ = 1/sqrt(d):

    S = σ · Q Kᵀ,  S_ij = −∞ for j > i (causal)     P = softmax_rows(S)
    O = (P ∘ Z / (1 − p)) V                          Z_ij ~ Bernoulli(1 − p): dropout keep-mask

Forward: each program owns BLOCK_M query rows and walks the key blocks left of
and on the diagonal (blocks above it are skipped; only diagonal blocks are
masked), keeping a running max m and sum l (online softmax) in float32, in
base 2 with σ·log2(e) folded into the scores. No T×T matrix is stored; the
row log-sum-exp (base 2) L = m + log2(l) is saved for the backward.

Backward recomputes P = exp2(σ·log2(e)·QKᵀ − L) tile by tile:

    Δ_i  = Σ_d dO_id O_id                        (preprocess kernel)
    dV   = (P ∘ Z/(1−p))ᵀ dO
    dP   = (dO Vᵀ) ∘ Z/(1−p)        dS = P ∘ (dP − Δ)
    dK   = σ dSᵀ Q                  dQ = σ dS K

One kernel computes dK and dV with its key block resident, walking the query
blocks below the diagonal; a second computes dQ with its query block resident.
Each output tile has exactly one writer: deterministic, no atomics.

Dropout: keep = rand(seed + batch·heads index, i·T + j) ≥ p, Triton's
counter-based Philox generator; the backward regenerates the same Z.
"""

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .cases import CompileCase
from .outputs import new_output

HEAD_DIMS = (32, 64, 128)
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_LOG2_E = 1.4426950408889634
# Dropout offsets i·T + j are 32-bit: T·T must stay below 2**31.
MAX_DROPOUT_T = 46340


# ---------------------------------------------------------------- tile helpers

@triton.jit
def _head(PTR, bh, H, stride_b, stride_h):
    """Pointer to the (batch, head) slice number bh = batch · H + head of a (B, H, T, d) tensor."""
    return PTR + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


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
def _load_row_stat(STAT, bh, rows, T, other):
    """Per-row float32 statistic (L or Δ) of one (batch, head); rows ≥ T read as ``other``."""
    return tl.load(STAT + bh.to(tl.int64) * T + rows, mask=rows < T, other=other)


@triton.jit
def _keep(seed, bh, rows, cols, T, dropout_p):
    """Dropout keep-mask Z for score rows × cols of one (batch, head): a pure function of its inputs."""
    return tl.rand(seed + bh, rows[:, None] * T + cols[None, :]) >= dropout_p


# ---------------------------------------------------------------- forward

@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    H, T, qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    rows = start_m + tl.arange(0, BLOCK_M)
    k_head = _head(K, bh, H, stride_kb, stride_kh)
    v_head = _head(V, bh, H, stride_vb, stride_vh)
    q = _load_rows(_head(Q, bh, H, stride_qb, stride_qh), rows, stride_qt, T, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    keep_scale = 1.0 / (1.0 - dropout_p)

    # Phase 0: key blocks entirely left of this query block -- no mask needed.
    # Phase 1: key blocks on the diagonal -- causal mask (which also hides keys ≥ T).
    for phase in tl.static_range(2):
        lo = 0 if phase == 0 else start_m
        hi = start_m if phase == 0 else tl.minimum(start_m + BLOCK_M, T)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(k_head, cols, stride_kt, T, HEAD_DIM)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            if phase == 1:
                s = tl.where(rows[:, None] >= cols[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)  # the softmax sum uses the undropped weights
            if HAS_DROPOUT:
                p = tl.where(_keep(seed, bh, rows, cols, T, dropout_p), p * keep_scale, 0.0)
            v = _load_rows(v_head, cols, stride_vt, T, HEAD_DIM)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    _store_rows(_head(O, bh, H, stride_ob, stride_oh), rows, stride_ot, T, acc / l_i[:, None], HEAD_DIM)
    tl.store(LSE + bh.to(tl.int64) * T + rows, m_i + tl.math.log2(l_i), mask=rows < T)


# ---------------------------------------------------------------- backward

@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                           H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Δ_i = Σ_d dO_id · O_id for one block of rows of one (batch, head)."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_rows(_head(O, bh, H, stride_ob, stride_oh), rows, stride_ot, T, HEAD_DIM)
    do = _load_rows(_head(DO, bh, H, stride_dob, stride_doh), rows, stride_dot, T, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * T + rows, delta, mask=rows < T)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    H, T, sm_scale, qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    """dK, dV for BLOCK_N keys (K, V resident), over the query blocks at and below the diagonal."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    cols = start_n + tl.arange(0, BLOCK_N)
    q_head = _head(Q, bh, H, stride_qb, stride_qh)
    do_head = _head(DO, bh, H, stride_dob, stride_doh)
    k = _load_rows(_head(K, bh, H, stride_kb, stride_kh), cols, stride_kt, T, HEAD_DIM)
    v = _load_rows(_head(V, bh, H, stride_vb, stride_vh), cols, stride_vt, T, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    keep_scale = 1.0 / (1.0 - dropout_p)

    # Queries before start_n see none of these keys. Phase 0: the query blocks
    # overlapping this key block (causal mask); phase 1: the blocks below it.
    for phase in tl.static_range(2):
        lo = start_n if phase == 0 else start_n + BLOCK_N
        hi = tl.minimum(start_n + BLOCK_N, T) if phase == 0 else T
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q = _load_rows(q_head, rows, stride_qt, T, HEAD_DIM)
            do = _load_rows(do_head, rows, stride_dot, T, HEAD_DIM)
            # Padded query rows get L = +inf, hence P = 0: they contribute nothing.
            lse = _load_row_stat(LSE, bh, rows, T, float("inf"))
            delta = _load_row_stat(DELTA, bh, rows, T, 0.0)
            p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])   # (keys, queries)
            if phase == 0:
                p_t = tl.where(rows[None, :] >= cols[:, None], p_t, 0.0)
            dp_t = tl.dot(v, tl.trans(do))
            if HAS_DROPOUT:
                keep_t = tl.trans(_keep(seed, bh, rows, cols, T, dropout_p))
                dv += tl.dot(tl.where(keep_t, p_t * keep_scale, 0.0).to(do.dtype), do)
                dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
            else:
                dv += tl.dot(p_t.to(do.dtype), do)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q)

    _store_rows(_head(DK, bh, H, stride_dkb, stride_dkh), cols, stride_dkt, T, dk * sm_scale, HEAD_DIM)
    _store_rows(_head(DV, bh, H, stride_dvb, stride_dvh), cols, stride_dvt, T, dv, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
    H, T, sm_scale, qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    """dQ for BLOCK_M queries (Q, dO resident), over the key blocks left of and on the diagonal."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    rows = start_m + tl.arange(0, BLOCK_M)
    k_head = _head(K, bh, H, stride_kb, stride_kh)
    v_head = _head(V, bh, H, stride_vb, stride_vh)
    q = _load_rows(_head(Q, bh, H, stride_qb, stride_qh), rows, stride_qt, T, HEAD_DIM)
    do = _load_rows(_head(DO, bh, H, stride_dob, stride_doh), rows, stride_dot, T, HEAD_DIM)
    lse = _load_row_stat(LSE, bh, rows, T, float("inf"))
    delta = _load_row_stat(DELTA, bh, rows, T, 0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    keep_scale = 1.0 / (1.0 - dropout_p)

    for phase in tl.static_range(2):
        lo = 0 if phase == 0 else start_m
        hi = start_m if phase == 0 else tl.minimum(start_m + BLOCK_M, T)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(k_head, cols, stride_kt, T, HEAD_DIM)
            v = _load_rows(v_head, cols, stride_vt, T, HEAD_DIM)
            p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
            if phase == 1:
                p = tl.where(rows[:, None] >= cols[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v))
            if HAS_DROPOUT:
                dp = tl.where(_keep(seed, bh, rows, cols, T, dropout_p), dp * keep_scale, 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)

    _store_rows(_head(DQ, bh, H, stride_dqb, stride_dqh), rows, stride_dqt, T, dq * sm_scale, HEAD_DIM)


# ---------------------------------------------------------------- launch configuration

@dataclass(frozen=True)
class Config:
    """Tile sizes and launch parameters of one attention kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __repr__(self):
        return f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} warps={self.num_warps} stages={self.num_stages}"

    def shared_bytes(self, head_dim, itemsize):
        # Pipelined K and V tiles plus the resident query tile: a conservative estimate for pruning.
        return (self.num_stages * 2 * self.block_n + self.block_m) * head_dim * itemsize


# Config lists by (head_dim, float32 operands?). Every entry compiles without
# register spills for sm_80 and sm_90, with and without dropout (checked by
# python -m fastgpt.kernels.report). float32 operands (tf32 dots) need about
# twice the registers and shared memory of fp16/bf16, so they get smaller tiles.
C = Config
# Forward: BLOCK_M % BLOCK_N == 0 (the diagonal phase steps BLOCK_N across BLOCK_M).
FWD_CONFIGS = {
    (32, False): [C(128, 64, 8, 3), C(64, 32, 4, 3)],
    (64, False): [C(128, 64, 8, 3), C(64, 64, 4, 3), C(128, 32, 8, 3)],
    (128, False): [C(64, 64, 8, 3), C(64, 32, 8, 3)],
    (32, True): [C(64, 32, 4, 3)],
    (64, True): [C(64, 32, 4, 2)],
    (128, True): [C(32, 16, 4, 2)],
}
# dK/dV: BLOCK_N keys resident, BLOCK_M queries streamed, BLOCK_N % BLOCK_M == 0.
DKDV_CONFIGS = {
    (32, False): [C(32, 128, 8, 3), C(32, 64, 4, 3)],
    (64, False): [C(16, 64, 4, 3), C(16, 32, 4, 2)],
    (128, False): [C(32, 64, 8, 3), C(16, 32, 4, 2)],
    (32, True): [C(16, 64, 4, 2)],
    (64, True): [C(16, 32, 4, 2)],
    (128, True): [C(16, 32, 4, 2)],
}
# dQ: BLOCK_M queries resident, BLOCK_N keys streamed, BLOCK_M % BLOCK_N == 0.
DQ_CONFIGS = {
    (32, False): [C(128, 32, 8, 3), C(64, 64, 4, 3)],
    (64, False): [C(128, 32, 8, 3), C(128, 64, 8, 3), C(64, 64, 4, 3), C(64, 32, 4, 3)],
    (128, False): [C(32, 32, 4, 3), C(32, 16, 8, 2)],
    (32, True): [C(64, 32, 4, 2), C(64, 16, 4, 2)],
    (64, True): [C(64, 32, 8, 2), C(64, 16, 4, 2)],
    (128, True): [C(32, 16, 8, 2), C(32, 32, 8, 2)],
}
del C
# The one config per kernel the tests (and the interpreter) run: small tiles,
# so short sequences still cross several tile boundaries (the divisibility
# rules above hold). FASTGPT_ATTENTION_PINNED=1 pins them on a GPU too.
PINNED = {"fwd": Config(32, 16, 4, 2), "dkdv": Config(16, 32, 4, 2), "dq": Config(32, 16, 8, 2)}
DELTA_BLOCK_M = 32  # 64 spilled on sm_80 (fp16, head_dim 64)

for _key in FWD_CONFIGS:  # the loop bounds in the kernels rely on these tile ratios
    assert all(c.block_m % c.block_n == 0 for c in FWD_CONFIGS[_key] + DQ_CONFIGS[_key] + [PINNED["fwd"], PINNED["dq"]])
    assert all(c.block_n % c.block_m == 0 for c in DKDV_CONFIGS[_key] + [PINNED["dkdv"]])


def _pinned() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or os.environ.get("FASTGPT_ATTENTION_PINNED") == "1"


_tuned: dict = {}  # (kernel name, head_dim, T bucket, dtype, device) -> Config, chosen by timing
_forced: dict = {}  # kernel name -> Config, set by use_config()


@contextmanager
def use_config(kind: str, config: Config):
    """Run kernel ``kind`` ("fwd", "dkdv", "dq") with one given config (tests of every tuned config)."""
    _forced[kind] = config
    try:
        yield
    finally:
        del _forced[kind]


def _choose(kind, configs, head_dim, t, dtype, device, launch):
    """The fastest config for this (kernel, head_dim, T rounded up to a power of two, dtype).

    Configs whose shared memory would not fit the device are pruned before timing.
    """
    if kind in _forced:
        return _forced[kind]
    if _pinned():
        return PINNED[kind]
    key = (kind, head_dim, triton.next_power_of_2(t), dtype, device)
    if key not in _tuned:
        limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
        itemsize = torch.empty((), dtype=dtype).element_size()
        listed = configs[(head_dim, dtype == torch.float32)]
        candidates = [c for c in listed if c.shared_bytes(head_dim, itemsize) <= limit] or [PINNED[kind]]
        timings = []
        for config in candidates:
            try:
                timings.append((triton.testing.do_bench(lambda: launch(config), warmup=5, rep=20), config))
            except Exception:  # out of resources on this device: not a candidate
                continue
        _tuned[key] = min(timings, key=lambda pair: pair[0])[1] if timings else PINNED[kind]
    return _tuned[key]


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _like_bthd(t):
    """An output shaped like t (B, H, T, D) but laid out as (B, T, H, D): the layout the model reshapes for free."""
    b, h, n, d = t.shape
    return new_output((b, n, h, d), t.dtype, t.device).transpose(1, 2)


def supports(q, k, v, dropout_p=0.0) -> "str | None":
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        return f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} (need equal (B, H, T, d))"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (need one of float32, float16, bfloat16 for all three)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (supported: {', '.join(map(str, HEAD_DIMS))})"
    if not (q.device == k.device == v.device):
        return "q, k, v on different devices"
    if dropout_p > 0.0 and q.shape[2] > MAX_DROPOUT_T:
        return f"dropout with sequence length {q.shape[2]} > {MAX_DROPOUT_T}"
    return None


def _forward(q, k, v, dropout_p, seed):
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    b, h, t, d = q.shape
    o = _like_bthd(q)
    lse = new_output((b, h, t), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse
    scale = 1.0 / math.sqrt(d)

    def launch(config):
        _attn_fwd_kernel[(triton.cdiv(t, config.block_m), b * h)](
            q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            h, t, scale * _LOG2_E, dropout_p, seed,
            HEAD_DIM=d, BLOCK_M=config.block_m, BLOCK_N=config.block_n, HAS_DROPOUT=dropout_p > 0.0,
            num_warps=config.num_warps, num_stages=config.num_stages)

    launch(_choose("fwd", FWD_CONFIGS, d, t, q.dtype, q.device, launch))
    return o, lse


def _backward(do, q, k, v, o, lse, dropout_p, seed):
    do, q, k, v = (_unit_last_stride(t) for t in (do, q, k, v))
    b, h, t, d = q.shape
    dq, dk, dv = _like_bthd(q), _like_bthd(k), _like_bthd(v)
    if q.numel() == 0:
        return dq, dk, dv
    delta = new_output((b, h, t), torch.float32, q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(t, DELTA_BLOCK_M), b * h)](
        o, do, delta, *_strides(o), *_strides(do), h, t, HEAD_DIM=d, BLOCK_M=DELTA_BLOCK_M)
    scale = 1.0 / math.sqrt(d)
    common = (h, t, scale, scale * _LOG2_E, dropout_p, seed)

    def launch_dkdv(config):
        _attn_bwd_dkdv_kernel[(triton.cdiv(t, config.block_n), b * h)](
            q, k, v, do, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *_strides(dk), *_strides(dv), *common,
            HEAD_DIM=d, BLOCK_M=config.block_m, BLOCK_N=config.block_n, HAS_DROPOUT=dropout_p > 0.0,
            num_warps=config.num_warps, num_stages=config.num_stages)

    def launch_dq(config):
        _attn_bwd_dq_kernel[(triton.cdiv(t, config.block_m), b * h)](
            q, k, v, do, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *_strides(dq), *common,
            HEAD_DIM=d, BLOCK_M=config.block_m, BLOCK_N=config.block_n, HAS_DROPOUT=dropout_p > 0.0,
            num_warps=config.num_warps, num_stages=config.num_stages)

    launch_dkdv(_choose("dkdv", DKDV_CONFIGS, d, t, q.dtype, q.device, launch_dkdv))
    launch_dq(_choose("dq", DQ_CONFIGS, d, t, q.dtype, q.device, launch_dq))
    return dq, dk, dv


# ---------------------------------------------------------------- torch.library ops + autograd

@torch.library.custom_op("fastgpt::causal_attention", mutates_args=())
def causal_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, seed: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, dropout_p, int(seed))


@causal_attention_op.register_fake
def _(q, k, v, dropout_p, seed):
    b, h, t, d = q.shape
    return q.new_empty((b, t, h, d)).transpose(1, 2), q.new_empty((b, h, t), dtype=torch.float32)


@torch.library.custom_op("fastgpt::causal_attention_backward", mutates_args=())
def causal_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 o: torch.Tensor, lse: torch.Tensor, dropout_p: float, seed: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, dropout_p, int(seed))


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


def causal_attention(q, k, v, dropout_p=0.0):
    """softmax(q kᵀ/sqrt(d), causal) with dropout on the weights, times v. (B, H, T, d), any strides."""
    # Per-call seed from torch's default generator: torch.manual_seed makes dropout repeatable.
    seed = torch.randint(0, 2**30, (1,)) if dropout_p > 0.0 else torch.zeros(1, dtype=torch.int64)
    return torch.ops.fastgpt.causal_attention(q, k, v, dropout_p, seed)[0]


# ---------------------------------------------------------------- ahead-of-time compile cases

_INT_ARGS = {"H", "T", "seed"}
_FLOAT_ARGS = {"qk_scale", "sm_scale", "dropout_p"}
_FP32_POINTERS = {"LSE", "DELTA"}
_CONSTEXPRS = {"HEAD_DIM", "BLOCK_M", "BLOCK_N", "HAS_DROPOUT"}


def _signature(fn, dtype_name):
    """Triton types of fn's arguments: tensors of dtype_name, float32 statistics, i32 sizes and strides."""
    def arg_type(name):
        if name in _CONSTEXPRS:
            return "constexpr"
        if name.startswith("stride_") or name in _INT_ARGS:
            return "i32"
        if name in _FLOAT_ARGS:
            return "fp32"
        return "*fp32" if name in _FP32_POINTERS else f"*{dtype_name}"
    return {name: arg_type(name) for name in fn.arg_names}


def compile_cases() -> list:
    """Every config the launchers can pick (each tuned list plus the pinned one) × head_dim × dtype × dropout."""
    cases = []
    kernels = (("attention_fwd", _attn_fwd_kernel, FWD_CONFIGS, "fwd"),
               ("attention_bwd_dkdv", _attn_bwd_dkdv_kernel, DKDV_CONFIGS, "dkdv"),
               ("attention_bwd_dq", _attn_bwd_dq_kernel, DQ_CONFIGS, "dq"))
    for dtype_name in _DTYPES.values():
        for d in HEAD_DIMS:
            for name, fn, configs, kind in kernels:
                # dict.fromkeys: the tuned list may already hold the pinned config.
                for config in dict.fromkeys(configs[(d, dtype_name == "fp32")] + [PINNED[kind]]):
                    for dropout in (False, True):
                        cases.append(CompileCase(
                            kernel=name + ("+dropout" if dropout else ""), fn=fn, signature=_signature(fn, dtype_name),
                            constexprs={"HEAD_DIM": d, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                                        "HAS_DROPOUT": dropout},
                            num_warps=config.num_warps, num_stages=config.num_stages,
                            config=f"{dtype_name} d={d} {config!r}", expects_tensor_cores=True))
            cases.append(CompileCase(
                kernel="attention_bwd_delta", fn=_attn_bwd_delta_kernel,
                signature=_signature(_attn_bwd_delta_kernel, dtype_name),
                constexprs={"HEAD_DIM": d, "BLOCK_M": DELTA_BLOCK_M}, num_warps=4,
                config=f"{dtype_name} d={d} BLOCK_M={DELTA_BLOCK_M} warps=4"))
    return cases

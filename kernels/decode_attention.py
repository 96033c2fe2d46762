"""Decode attention (flash-decoding): a few new query tokens against a long KV cache.

During generation each step has 1 (or a few, ≤ 16) queries per (batch, head)
and S cached keys; one program per (batch, head) would leave most of the GPU
idle. So the key axis is split into chunks, each program reduces one chunk,
and a second kernel merges the partial results:

    per chunk c:  m_c = max_j s_j,  l_c = Σ_j 2^(s_j − m_c),  o_c = Σ_j 2^(s_j − m_c) v_j / l_c
                  L_c = m_c + log2(l_c)                        (s = σ·log2(e) · q·k, base 2)
    merge:        M = max_c L_c,  w_c = 2^(L_c − M),  o = Σ_c w_c o_c / Σ_c w_c

The queries are the last T_q of the S positions, so query i sees keys
0 .. S − T_q + i (the causal mask aligned bottom-right). Inference only: no
dropout, no backward. More than 16 new tokens (a chunked prefill) go to the
attention forward kernel, which takes the same bottom-right offset.

K and V are read once each: the kernel is bound by memory bandwidth, and the
number of chunks is chosen (``plan``) so that at least 4 programs share each
SM where the cache is long enough, in as whole waves as the cache's key
blocks allow. Only the real query rows of each partial result
are written (one row per chunk when decoding one token).
"""

import math

import torch
import triton
import triton.language as tl

from . import attention
from .outputs import new_output
from .runtime import DTYPES, LOG2_E, device_mismatch, dot_precision, dot_refusal, on_device, run, sm_count

BLOCK_Q = 16   # queries per tile (padded): tl.dot needs 16 rows
BLOCK_NS = (64, 32, 16)  # keys per step, largest first: smaller only where the cache is too short to split
FP32_BLOCK_NS = (32, 16)  # float32 at 64 keys per step spills (tf32x3 keeps three splits of each operand)


def block_sizes(dtype: torch.dtype) -> tuple:
    return FP32_BLOCK_NS if dtype == torch.float32 else BLOCK_NS
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4  # enough loads in flight per SM to keep HBM busy
NUM_WARPS = 4
HEAD_DIMS = (32, 64, 128)


@triton.jit(do_not_specialize=["TQ", "S", "num_splits"])
def _decode_partial_kernel(
    Q, K, V, O_PART, L_PART,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    H, TQ, S, split_len, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qt + offs_d[None, :],
                mask=offs_q[:, None] < TQ, other=0.0)
    # Query i sits at position S − TQ + i and sees keys up to there.
    last_visible = S - TQ + offs_q
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_DIM], dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    lo = split * split_len
    hi = tl.minimum(lo + split_len, S)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_range = cols[:, None] < hi
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=in_range, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=in_range, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where((cols[None, :] <= last_visible[:, None]) & (cols[None, :] < hi), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row may see none of this chunk's keys yet: keep its exponents finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    part = bh.to(tl.int64) * num_splits + split
    real = offs_q < TQ  # padded query rows are not stored
    tl.store(O_PART + (part * TQ + offs_q[:, None]) * HEAD_DIM + offs_d[None, :], o, mask=real[:, None])
    tl.store(L_PART + part * TQ + offs_q, lse, mask=real)


@triton.jit(do_not_specialize=["TQ", "num_splits"])
def _decode_merge_kernel(
    O_PART, L_PART, O, stride_ob, stride_oh, stride_ot, H, TQ, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    bh = tl.program_id(1)
    i = tl.program_id(0)  # query row
    offs_c = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    part = bh.to(tl.int64) * num_splits + offs_c
    lse = tl.load(L_PART + part * TQ + i, mask=offs_c < num_splits, other=float("-inf"))
    m = tl.max(lse, axis=0)  # finite: every query sees key 0, in chunk 0
    w = tl.math.exp2(lse - m)
    o_parts = tl.load(O_PART + (part[:, None] * TQ + i) * HEAD_DIM + offs_d[None, :],
                      mask=offs_c[:, None] < num_splits, other=0.0)
    o = tl.sum(o_parts * w[:, None], axis=0) / tl.sum(w, axis=0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    tl.store(O + b * stride_ob + h * stride_oh + i * stride_ot + offs_d, o.to(O.dtype.element_ty))


def supports(q, k, v, dropout_p=0.0) -> "str | None":
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        return f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)}"
    b, h, tq, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d:
        return f"cache shape {tuple(k.shape)} does not match queries {tuple(q.shape)}"
    if not 1 <= tq <= k.shape[2]:
        return f"{tq} query tokens over {k.shape[2]} cached positions (need 1 .. the cache length)"
    if q.dtype not in DTYPES or k.dtype not in DTYPES or v.dtype != k.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}"
    if q.dtype != k.dtype and not torch.is_autocast_enabled(q.device.type):
        # Under autocast the queries come half precision from a Linear while the cache keeps
        # the model's dtype; the launcher casts the (few) queries. Elsewhere eager refuses it too.
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (mixed only under autocast)"
    if d not in HEAD_DIMS:
        return f"head_dim {d} (supported: {', '.join(map(str, HEAD_DIMS))})"
    if dropout_p > 0.0:
        return "dropout (the decode kernel is for inference)"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "inputs that require grad (the decode kernel has no backward)"
    if (problem := device_mismatch(q=q, k=k, v=v)) is not None:
        return problem
    if (problem := dot_refusal(q.device)) is not None:  # T4, V100: eager
        return problem
    if k.dtype == torch.bfloat16 and k.device.type == "cpu":
        return "bfloat16 under the Triton interpreter, whose bf16 tl.dot is wrong (Triton issue 11584)"
    if tq > BLOCK_Q:  # a chunked prefill: the attention forward kernel with a bottom-right offset
        return attention.supports_prefill(q.to(k.dtype), k, v)
    return None


def plan(bh: int, s: int, sms: int, block_ns: tuple = BLOCK_NS) -> tuple[int, int, int]:
    """(keys per step, chunks, keys per chunk) for bh (batch·head) rows over a cache of s keys.

    Chunks hold whole key blocks, of equal size but the last, so the achievable chunk
    counts are cdiv(blocks, blocks per chunk). Among those giving at least
    PROGRAMS_PER_SM programs per SM (with 64-key steps if the cache has enough blocks,
    else 32 or 16), take the one whose programs fill their last wave best (ties: fewer
    chunks, less to merge). A cache too short for that takes as many chunks as it has
    blocks (of 16 keys).
    """
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, bh)
    block_n = next((n for n in block_ns if min(triton.cdiv(s, n), MAX_SPLITS) >= wanted), block_ns[-1])
    blocks = triton.cdiv(s, block_n)
    achievable = sorted({triton.cdiv(blocks, per_chunk) for per_chunk in range(1, blocks + 1)})
    achievable = [n for n in achievable if n <= MAX_SPLITS]
    enough = [n for n in achievable if n >= wanted]
    if not enough:
        splits = achievable[-1]
    else:
        def wave_fill(n):
            programs = n * bh
            return programs / (triton.cdiv(programs, sms) * sms)
        splits = max(enough, key=lambda n: (round(wave_fill(n), 6), -n))
    return block_n, splits, triton.cdiv(blocks, splits) * block_n


def partial_launch(q, k, v, o_part, l_part, block_n, splits, split_len, precision=None):
    b, h, tq, d = q.shape
    args = (q, k, v, o_part, l_part, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            h, tq, k.shape[2], split_len, splits, LOG2_E / math.sqrt(d))
    meta = dict(HEAD_DIM=d, BLOCK_Q=BLOCK_Q, BLOCK_N=block_n, DOT_PRECISION=precision or dot_precision(q.dtype),
                num_warps=NUM_WARPS)
    return (splits, b * h), args, meta


def merge_launch(o_part, l_part, out, splits):
    b, h, tq, d = out.shape
    args = (o_part, l_part, out, *out.stride()[:3], h, tq, splits)
    meta = dict(HEAD_DIM=d, BLOCK_SPLITS=max(2, triton.next_power_of_2(splits)), num_warps=NUM_WARPS)
    return (tq, b * h), args, meta


@torch.library.custom_op("fastgpt::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, h, tq, d = q.shape
    out = new_output((b, tq, h, d), q.dtype, q.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    # The interpreter plans for a pretend 4-SM GPU: a few chunks, enough to exercise
    # the merge and, for short caches, the 32- and 16-key steps.
    sms = sm_count(q.device, elsewhere=4)
    block_n, splits, split_len = plan(b * h, k.shape[2], sms, block_sizes(k.dtype))
    o_part = new_output((b * h, splits, tq, d), torch.float32, q.device)
    l_part = new_output((b * h, splits, tq), torch.float32, q.device)
    with on_device(q):
        run(_decode_partial_kernel, partial_launch(q, k, v, o_part, l_part, block_n, splits, split_len))
        run(_decode_merge_kernel, merge_launch(o_part, l_part, out, splits))
    return out


@decode_attention_op.register_fake
def _(q, k, v):
    b, h, tq, d = q.shape
    return q.new_empty((b, tq, h, d)).transpose(1, 2)


def decode_attention(q, k, v, dropout_p=0.0):
    """Attention of the last q_len positions over all kv_len cached ones (bottom-right causal):
    flash-decoding for up to 16 new tokens, the attention forward kernel for a longer chunk."""
    # One dtype for the kernels (the compile catalogue's cases): the cache's, the queries being few.
    if q.shape[2] > BLOCK_Q:
        return torch.ops.fastgpt.prefill_attention(q.to(k.dtype), k, v).to(q.dtype)
    return torch.ops.fastgpt.decode_attention(q.to(k.dtype), k, v).to(q.dtype)

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
dropout, no backward. K and V are read once each: the kernel is bound by
memory bandwidth, and the number of chunks is chosen to fill every SM.
"""

import math

import torch
import triton
import triton.language as tl

from .cases import CompileCase
from .outputs import new_output

BLOCK_Q = 16   # queries per tile (padded): tl.dot needs 16 rows
BLOCK_N = 64   # keys per step
NUM_WARPS = 4
HEAD_DIMS = (32, 64, 128)
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_LOG2_E = 1.4426950408889634


@triton.jit
def _decode_partial_kernel(
    Q, K, V, O_PART, L_PART,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    H, TQ, S, split_len, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
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
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where((cols[None, :] <= last_visible[:, None]) & (cols[None, :] < hi), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row may see none of this chunk's keys yet: keep its exponents finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    part = bh.to(tl.int64) * num_splits + split
    tl.store(O_PART + (part * BLOCK_Q + offs_q[:, None]) * HEAD_DIM + offs_d[None, :], o)
    tl.store(L_PART + part * BLOCK_Q + offs_q, lse)


@triton.jit
def _decode_merge_kernel(
    O_PART, L_PART, O, stride_ob, stride_oh, stride_ot, H, TQ, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    bh = tl.program_id(1)
    i = tl.program_id(0)  # query row
    offs_c = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    part = bh.to(tl.int64) * num_splits + offs_c
    lse = tl.load(L_PART + part * BLOCK_Q + i, mask=offs_c < num_splits, other=float("-inf"))
    m = tl.max(lse, axis=0)  # finite: every query sees key 0, in chunk 0
    w = tl.math.exp2(lse - m)
    o_parts = tl.load(O_PART + (part[:, None] * BLOCK_Q + i) * HEAD_DIM + offs_d[None, :],
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
    if not 1 <= tq <= min(BLOCK_Q, k.shape[2]):
        return f"{tq} query tokens (the decode kernel takes 1..{BLOCK_Q}, at most the cache length)"
    if q.dtype not in _DTYPES or k.dtype not in _DTYPES or v.dtype != k.dtype:
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
    if not (q.device == k.device == v.device):
        return "q, k, v on different devices"
    return None


def _num_splits(bh: int, s: int, device: torch.device) -> int:
    blocks = triton.cdiv(s, BLOCK_N)
    if device.type != "cuda":
        return min(blocks, 3)  # the interpreter: a few chunks, enough to exercise the merge
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(blocks, triton.cdiv(2 * sms, bh), 64))


@torch.library.custom_op("fastgpt::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, h, tq, d = q.shape
    s = k.shape[2]
    out = new_output((b, tq, h, d), q.dtype, q.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    splits = _num_splits(b * h, s, q.device)
    split_len = triton.cdiv(triton.cdiv(s, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(s, split_len)
    o_part = new_output((b * h, splits, BLOCK_Q, d), torch.float32, q.device)
    l_part = new_output((b * h, splits, BLOCK_Q), torch.float32, q.device)
    _decode_partial_kernel[(splits, b * h)](
        q, k, v, o_part, l_part, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        h, tq, s, split_len, splits, _LOG2_E / math.sqrt(d),
        HEAD_DIM=d, BLOCK_Q=BLOCK_Q, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    _decode_merge_kernel[(tq, b * h)](
        o_part, l_part, out, *out.stride()[:3], h, tq, splits,
        HEAD_DIM=d, BLOCK_Q=BLOCK_Q, BLOCK_SPLITS=max(2, triton.next_power_of_2(splits)), num_warps=NUM_WARPS)
    return out


@decode_attention_op.register_fake
def _(q, k, v):
    b, h, tq, d = q.shape
    return q.new_empty((b, tq, h, d)).transpose(1, 2)


def decode_attention(q, k, v, dropout_p=0.0):
    """Attention of the last q_len positions over all kv_len cached ones (bottom-right causal)."""
    # One dtype for the kernel (the compile catalogue's cases): the cache's, the queries being few.
    return torch.ops.fastgpt.decode_attention(q.to(k.dtype), k, v).to(q.dtype)


def compile_cases() -> list:
    cases = []
    for t in _DTYPES.values():
        for d in HEAD_DIMS:
            partial_sig = {name: "i32" for name in _decode_partial_kernel.arg_names}
            partial_sig.update({"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "O_PART": "*fp32", "L_PART": "*fp32",
                                "qk_scale": "fp32", "HEAD_DIM": "constexpr", "BLOCK_Q": "constexpr",
                                "BLOCK_N": "constexpr"})
            cases.append(CompileCase(
                kernel="decode_attention_partial", fn=_decode_partial_kernel, signature=partial_sig,
                constexprs={"HEAD_DIM": d, "BLOCK_Q": BLOCK_Q, "BLOCK_N": BLOCK_N}, num_warps=NUM_WARPS,
                config=f"{t} d={d} BLOCK_Q={BLOCK_Q} BLOCK_N={BLOCK_N} warps={NUM_WARPS}",
                expects_tensor_cores=True))
            for block_splits in (2, 4, 8, 16, 32, 64):
                merge_sig = {name: "i32" for name in _decode_merge_kernel.arg_names}
                merge_sig.update({"O_PART": "*fp32", "L_PART": "*fp32", "O": f"*{t}", "HEAD_DIM": "constexpr",
                                  "BLOCK_Q": "constexpr", "BLOCK_SPLITS": "constexpr"})
                cases.append(CompileCase(
                    kernel="decode_attention_merge", fn=_decode_merge_kernel, signature=merge_sig,
                    constexprs={"HEAD_DIM": d, "BLOCK_Q": BLOCK_Q, "BLOCK_SPLITS": block_splits},
                    num_warps=NUM_WARPS, config=f"{t} d={d} BLOCK_SPLITS={block_splits} warps={NUM_WARPS}"))
    return cases

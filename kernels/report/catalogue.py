"""The compile catalogue: every kernel × specialisation the library can launch, as compile cases.

One function per kernel module lists every configuration its launchers can pick
(block sizes, warps, dtypes, constexpr flags), each as a *launch*: the kernel
module's own launch description (``fwd_launch``, ``bwd_launch``...) called on
meta tensors of GPT-2's shapes and of a ragged one, so the report compiles
exactly the specialisation Triton's launcher builds. ``KERNELS`` names them in
the report's order; ``all_cases()`` is the whole catalogue.

``representative_cases()`` is the named subset ``representative``: each
kernel's cases that a rule beside its loop marks (every dtype at GPT-2 small's
d = 64 / N = 768, with and without dropout, each arch family's pinned tile and
first tuned tile, the TMA forward on sm_90), plus the p = 0 twin of every
dropout case it holds. CI compiles the whole catalogue with the GPU machines'
Triton and this subset with the installed one.

Importing this file imports the kernel modules, hence Triton.
"""

from __future__ import annotations

import itertools

import torch
import triton

from .. import attention, column_sum, cross_entropy, decode_attention, gelu, layer_norm
from ..attention_configs import ARCH_FAMILIES, DELTA_BLOCK_M, FP32_HEAD_DIMS, HEAD_DIMS, configs, pinned
from ..dropout import MAX_DROPOUT_COST
from ..runtime import DTYPES
from .case import CompileCase, Pruning, TensorArg


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


# ---------------------------------------------------------------- column_sum

def column_sum_cases() -> list:
    """One and two tables, into each parameter dtype, on 4 × 132 programs' partials of GPT-2's widths
    and of a ragged one."""
    cases = []
    for dtype, name in DTYPES.items():
        for n in (768, 3072, 100):
            partial = _meta(4 * 132, n, dtype=torch.float32)
            out = _meta(n, dtype=dtype)
            for two in (False, True):
                cases.append(CompileCase.of_launch(
                    f"column_sum{'+2' if two else ''}", column_sum._column_sum_kernel,
                    column_sum.launch(partial, out, partial if two else None, out if two else None),
                    config=f"{name} BLOCK_N={column_sum.BLOCK_N}",
                    shape=f"{'ragged' if n == 100 else 'gpt2'} N={n}", representative=n == 768))
    return cases


# ---------------------------------------------------------------- layer_norm

# (residual, branch, weight) dtypes launched: one dtype throughout, or a half-precision
# branch into a float32 residual with float32 weights (autocast). The plain LayerNorm
# also takes half-precision activations with float32 weights.
_HALF = (torch.float16, torch.bfloat16)
_FUSED_DTYPES = [(t, t, t) for t in DTYPES] + [(torch.float32, t, torch.float32) for t in _HALF]
_PLAIN_DTYPES = [(t, t) for t in DTYPES] + [(t, torch.float32) for t in _HALF]
# Row widths: one per block size (GPT-2 small's 768 and XL's 1600 among them), plus two ragged
# ones: 100 (rows 4-element aligned: ROW_ALIGN 4) and 99 (unaligned: ROW_ALIGN 1).
_WIDTHS = {"gpt2": (96, 192, 384, 768, 1600, 3072), "ragged": (99, 100)}


def layer_norm_cases() -> list:
    """Every specialisation the launchers produce: dtypes × row width (one per block size) × fusion flags,
    launched on 8 × 1024 rows of the widths above (and 100 rows of the ragged ones)."""
    cases = []
    seed = _meta(1, dtype=torch.int64)
    for shape, widths in _WIDTHS.items():
        for n in widths:
            block = layer_norm.block_n(n)
            m = 8 * 1024 if shape == "gpt2" else 100
            where = f"{shape} M={m} N={n}"
            stats = _meta(m, dtype=torch.float32)
            partial = _meta(4 * 132, n, dtype=torch.float32)

            def label(x_dtype, branch_dtype, w_dtype):
                names = ([DTYPES[x_dtype]] + ([f"branch {DTYPES[branch_dtype]}"] if branch_dtype != x_dtype else [])
                         + ([f"weights {DTYPES[w_dtype]}"] if w_dtype != x_dtype else []))
                return f"{' '.join(names)} BLOCK_N={block} warps={layer_norm.num_warps_for(block)}"

            def add(fused, x_dtype, branch_dtype, w_dtype, p):
                x, w, branch = _meta(m, n, dtype=x_dtype), _meta(n, dtype=w_dtype), _meta(m, n, dtype=branch_dtype)
                has_branch = fused != ""
                own_dbranch = has_branch and (p > 0 or branch_dtype != x_dtype)
                config = label(x_dtype, branch_dtype, w_dtype)
                # The subset: GPT-2 small's width, one dtype throughout.
                representative = n == 768 and x_dtype == branch_dtype == w_dtype
                # Held to the dropout cost limit, but for the unaligned width: its 1-element vectors
                # put 4 Philox calls in each thread, over the limit on sm_80 under Triton 3.9. It is
                # compiled (every case is checked for spills) and its cost printed, not held.
                cost = MAX_DROPOUT_COST if p and layer_norm.row_alignment(n) > 1 else None
                cases.append(CompileCase.of_launch(
                    f"layer_norm_fwd{fused}", layer_norm._layer_norm_fwd_kernel,
                    layer_norm.fwd_launch(x, branch if has_branch else x, x, x, w, w, stats, stats,
                                          seed if p else None, 1e-5, p),
                    config=config, shape=where, expects_max_dropout_cost=cost, representative=representative))
                cases.append(CompileCase.of_launch(
                    f"layer_norm_bwd{fused}", layer_norm._layer_norm_bwd_kernel,
                    layer_norm.bwd_launch(x, x, w, stats, stats, x if has_branch else None, x,
                                          branch if own_dbranch else None, partial, partial, seed if p else None, p),
                    config=config, shape=where, expects_max_dropout_cost=cost, representative=representative))

            for x_dtype, w_dtype in _PLAIN_DTYPES:
                if shape == "gpt2" or w_dtype == x_dtype:
                    add("", x_dtype, x_dtype, w_dtype, 0.0)
            for x_dtype, branch_dtype, w_dtype in _FUSED_DTYPES:
                if shape == "gpt2" or branch_dtype == x_dtype:
                    add("+add", x_dtype, branch_dtype, w_dtype, 0.0)
                    add("+add+dropout", x_dtype, branch_dtype, w_dtype, 0.1)
    return cases


# ---------------------------------------------------------------- gelu

def gelu_cases() -> list:
    """Forward and backward, with and without the fused bias, per dtype, launched on GPT-2 small's
    MLP activations (8 × 1024 tokens × 3072) and on a ragged width (100 tokens × 100)."""
    cases = []
    block, warps, rows = gelu.BLOCK, gelu.NUM_WARPS, gelu.BIAS_ROWS
    for dtype, t in DTYPES.items():
        for shape, (m, n) in (("gpt2 M=8192 N=3072", (8192, 3072)), ("ragged M=100 N=100", (100, 100))):
            x = _meta(m, n, dtype=dtype)
            bias = _meta(n, dtype=dtype)
            partial = _meta(triton.cdiv(m, rows), n, dtype=torch.float32)
            label = f"{t} BLOCK={block} warps={warps}"
            gpt2 = shape.startswith("gpt2")
            for b in (None, bias):
                cases.append(CompileCase.of_launch(f"gelu_fwd{'' if b is None else '+bias'}", gelu._gelu_fwd_kernel,
                                                   gelu.fwd_launch(x, b, x), config=label, shape=shape,
                                                   representative=gpt2))
            cases.append(CompileCase.of_launch("gelu_bwd", gelu._gelu_bwd_kernel, gelu.bwd_launch(x, x, x),
                                               config=label, shape=shape, representative=gpt2))
            cases.append(CompileCase.of_launch("gelu_bwd+bias", gelu._bias_gelu_bwd_kernel,
                                               gelu.bias_bwd_launch(x, x, bias, x, partial),
                                               config=f"{t} ROWS={rows} BLOCK={block} warps={warps}",
                                               shape=shape, representative=gpt2))
    return cases


# ---------------------------------------------------------------- attention

def _meta_qkv(dtype, b, t, h, d):
    """q, k, v as the model hands them over: (B, H, T, d) views of (B, T, H·d) projections."""
    return [_meta(b, t, h, d, dtype=dtype).transpose(1, 2) for _ in range(3)]


def _like_bthd(t):
    """A (B, H, T, d) tensor laid out as (B, T, H, d): the attention launchers' outputs."""
    b, h, n, d = t.shape
    return _meta(b, n, h, d, dtype=t.dtype).transpose(1, 2)


def _placeholder_descriptors(launch):
    """The launch with its TMA descriptors' meta-tensor bases replaced by dtype-only placeholders
    (a meta tensor has no address; the report needs only the dtype and the box)."""
    descriptor = attention.TensorDescriptor
    grid, args, meta = launch
    args = tuple(descriptor(TensorArg(a.base.dtype), a.shape, a.strides, a.block_shape)
                 if descriptor is not None and isinstance(a, descriptor) else a for a in args)
    return grid, args, meta


def _configs_by_archs(kind, d, fp32, dropout):
    """{config: the archs whose tuned list (or pinned tile) holds it}, in list order."""
    found: dict = {}
    for family, arch in ARCH_FAMILIES.items():
        for config in configs(kind, family, d, fp32, dropout) + [pinned(kind, d, fp32, family)]:
            found.setdefault(config, set()).add(arch)
    return found


def _representative_configs(kind, d, fp32, dropout) -> set:
    """Each arch family's pinned tile and the first of its tuned list (its default where tuning cannot run)."""
    return ({pinned(kind, d, fp32, family) for family in ARCH_FAMILIES}
            | {configs(kind, family, d, fp32, dropout)[0] for family in ARCH_FAMILIES})


def _pruning(kind, kernel, label, d, dtype, dropout, config) -> "Pruning | None":
    """How the launcher treats ``config`` on sm_86/sm_89 (the sm80 family with 99 KB per block): pruned by
    its estimate from the family's tuned list (attention_configs.candidates); None when that list lacks it."""
    fp32 = dtype == torch.float32
    listed = configs(kind, "sm80", d, fp32, dropout)
    if config not in listed:
        return None
    return Pruning(group=f"{kernel} {label}", size=len(listed),
                   estimate=config.shared_bytes(d, torch.empty((), dtype=dtype).element_size()),
                   last=config == listed[-1], pinned=config == pinned(kind, d, fp32, "sm80"))


def attention_cases() -> list:
    """Every config the launchers can pick (each arch family's tuned list and the pinned one) × head_dim
    × dtype × dropout (× both fp32 dot precisions, × TMA or pointers for the half-precision forward on
    sm_90), launched on GPT-2's shapes (batch 8 × 1024 tokens, 768 wide) and on a ragged one (batch 1 ×
    100 tokens). Every bf16/fp16 d = 64 tile sm_90 runs must be wgmma with N >= 64; TMA tiles must use TMA."""
    cases = []
    has_tma = attention.TensorDescriptor is not None
    for dtype, dtype_name in DTYPES.items():
        fp32 = dtype == torch.float32
        precisions = ("tf32x3", "tf32") if fp32 else (None,)
        for d in FP32_HEAD_DIMS if fp32 else HEAD_DIMS:
            h = 768 // d
            for shape, (b, t) in (("gpt2 B=8 T=1024", (8, 1024)), ("ragged B=1 T=100", (1, 100))):
                q, k, v = _meta_qkv(dtype, b, t, h, d)
                o, do = _like_bthd(q), _like_bthd(q)
                lse = _meta(b, h, t, dtype=torch.float32)
                seed = _meta(1, dtype=torch.int64)
                # The subset: GPT-2 small's d = 64, its default fp32 precision.
                gpt2_d64 = d == 64 and shape.startswith("gpt2")
                for precision, dropout_p in itertools.product(precisions, (0.0, 0.1)):
                    drop = "+dropout" if dropout_p else ""
                    label = f"{dtype_name}{'/' + precision if precision else ''} d={d}"
                    run_seed = seed if dropout_p else None
                    for kind in ("fwd", "bwd"):
                        subset_configs = _representative_configs(kind, d, fp32, dropout_p > 0)
                        for config, on in _configs_by_archs(kind, d, fp32, dropout_p > 0).items():
                            archs = None if on == set(ARCH_FAMILIES.values()) else tuple(sorted(on))
                            tuned_n64 = 64 if not fp32 and d == 64 else None  # every tile sm_90 runs
                            variants = [False] + ([True] if kind == "fwd" and not fp32 and 90 in on
                                                  and has_tma else [])
                            for use_tma in variants:
                                if kind == "fwd":
                                    launch = _placeholder_descriptors(attention.fwd_launch(
                                        q, k, v, o, lse, run_seed, dropout_p, config, precision, use_tma))
                                    fn = attention._attn_fwd_kernel
                                else:
                                    launch = attention.bwd_launch(q, k, v, do, lse, lse, q, k, v, run_seed, dropout_p,
                                                                  config, precision)
                                    fn = attention._attn_bwd_kernel
                                cases.append(CompileCase.of_launch(
                                    f"attention_{kind}{drop}", fn, launch, shape=shape,
                                    pruning=None if use_tma else _pruning(kind, f"attention_{kind}{drop}", label, d,
                                                                          dtype, dropout_p > 0, config),
                                    config=f"{label} {config!r}{' TMA' if use_tma else ''}",
                                    expects_tensor_cores=True, archs=(90,) if use_tma else archs,
                                    expects_min_wgmma_n=tuned_n64, expects_tma=use_tma,
                                    expects_max_dropout_cost=MAX_DROPOUT_COST if dropout_p else None,
                                    representative=(gpt2_d64 and precision in (None, "tf32x3")
                                                    and config in subset_configs)))
                cases.append(CompileCase.of_launch(
                    "attention_bwd_delta", attention._attn_bwd_delta_kernel, attention.delta_launch(o, do, lse),
                    config=f"{dtype_name} d={d} BLOCK_M={DELTA_BLOCK_M} warps=4", shape=shape,
                    representative=gpt2_d64))
    return cases


# ---------------------------------------------------------------- decode_attention

def decode_attention_cases() -> list:
    """The partial kernel per dtype × head size × key step, and the merge per chunk-count bucket,
    launched on one decoding step of GPT-2 (batch 8, a 1024-slot cache holding 1000 tokens)."""
    cases = []
    block_q, warps = decode_attention.BLOCK_Q, decode_attention.NUM_WARPS
    for dtype, t in DTYPES.items():
        for d in decode_attention.HEAD_DIMS:
            h = 768 // d
            q = _meta(8, 1, h, d, dtype=dtype).transpose(1, 2)
            cache = _meta(8, h, 1024, d, dtype=dtype)[:, :, :1000]
            block_sizes = decode_attention.block_sizes(dtype)
            for block_n, precision in itertools.product(block_sizes, ("tf32x3", "tf32") if t == "fp32" else (None,)):
                splits = 8
                o_part = _meta(8 * h, splits, 1, d, dtype=torch.float32)
                l_part = _meta(8 * h, splits, 1, dtype=torch.float32)
                cases.append(CompileCase.of_launch(
                    "decode_attention_partial", decode_attention._decode_partial_kernel,
                    decode_attention.partial_launch(q, cache, cache, o_part, l_part, block_n, splits, block_n * 2,
                                                    precision),
                    config=f"{t}{'/' + precision if precision else ''} d={d} BLOCK_Q={block_q} BLOCK_N={block_n} "
                           f"warps={warps}",
                    shape="gpt2 B=8 S=1000", expects_tensor_cores=True,
                    representative=d == 64 and block_n == block_sizes[0] and precision in (None, "tf32x3")))
            for splits in (2, 4, 8, 16, 32, 64):
                o_part = _meta(8 * h, splits, 1, d, dtype=torch.float32)
                l_part = _meta(8 * h, splits, 1, dtype=torch.float32)
                out = _meta(8, 1, h, d, dtype=dtype).transpose(1, 2)
                launch = decode_attention.merge_launch(o_part, l_part, out, splits)
                cases.append(CompileCase.of_launch(
                    "decode_attention_merge", decode_attention._decode_merge_kernel, launch,
                    config=f"{t} d={d} BLOCK_SPLITS={launch[2]['BLOCK_SPLITS']} warps={warps}",
                    shape="gpt2 B=8 S=1000", representative=d == 64 and splits == 8))
    return cases


# ---------------------------------------------------------------- cross_entropy

# (label, rows, vocabulary): a chunk of GPT-2's logits (BLOCK 4096) and a narrow test
# vocabulary (BLOCK 1024). Rows only set the grid; the compiled variant is the same.
_CROSS_ENTROPY_SHAPES = (("gpt2 chunk 256×50257", 256, 50257), ("ragged 37×97", 37, 97))


def cross_entropy_cases() -> list:
    """Every dtype × block × with/without the gradient pass."""
    cases = []
    for dtype, t in DTYPES.items():
        for shape, rows, n_cols in _CROSS_ENTROPY_SHAPES:
            logits = _meta(rows, n_cols, dtype=dtype)
            targets = _meta(rows, dtype=torch.int64)
            losses = _meta(rows, dtype=torch.float32)
            scale = _meta(1, dtype=torch.float32)
            for compute_grad in (False, True):
                launch = cross_entropy.launch(logits, targets, losses, scale, -100, compute_grad)
                cases.append(CompileCase.of_launch(
                    "cross_entropy_rows" + ("+grad" if compute_grad else ""), cross_entropy._cross_entropy_rows_kernel,
                    launch, config=f"{t} BLOCK={launch[2]['BLOCK']} warps={cross_entropy.NUM_WARPS}", shape=shape,
                    representative=shape.startswith("gpt2")))
    return cases


# ---------------------------------------------------------------- the catalogue and its subsets

# Kernel module -> the function listing its cases, in the report's order.
KERNELS = {
    "column_sum": column_sum_cases,
    "layer_norm": layer_norm_cases,
    "gelu": gelu_cases,
    "attention": attention_cases,
    "decode_attention": decode_attention_cases,
    "cross_entropy": cross_entropy_cases,
}


def all_cases() -> list[CompileCase]:
    return [case for cases in KERNELS.values() for case in cases()]


def dropout_twin_key(case: CompileCase) -> tuple:
    """What an ``X+dropout`` case and its p = 0 twin ``X`` share (the report pairs their rows so)."""
    return case.kernel.replace("+dropout", ""), case.config, case.shape


def representative_cases(cases: list[CompileCase] | None = None) -> list[CompileCase]:
    """The catalogue's (or ``cases``') representative cases, in catalogue order: those marked
    ``representative``, and the p = 0 twin of each dropout case among them, so every dropout cost
    the subset holds can be checked."""
    cases = all_cases() if cases is None else cases
    marked = [case.representative for case in cases]
    wanted = {dropout_twin_key(case) for case, chosen in zip(cases, marked) if chosen and "+dropout" in case.kernel}
    return [case for case, chosen in zip(cases, marked)
            if chosen or ("+dropout" not in case.kernel and dropout_twin_key(case) in wanted)]


# Named subsets of the catalogue, for ``--subset NAME``.
SUBSETS = {"representative": representative_cases}

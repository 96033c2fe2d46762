"""Fused causal attention kernels: parity with float64 forward and backward, dropout, strided inputs;
hypothesis properties over shapes, dtypes, layouts and dropout rates; every tuned tile on a GPU.

Without a GPU these run under the Triton interpreter with the pinned tile
config (kernels/attention_configs.py: pinned()), small enough that every T ≥ 64 below crosses
several tiles (on sm_90 half-precision d = 64 pins the 64 × 64 wgmma tile: T ≥ 100 cross). bfloat16 is not tested here: the interpreter's tl.dot on bf16
is broken (docs/design.md, Triton issue 11584); the GPU run covers it.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastgpt
from catalogue_launches import launches_in_the_catalogue
from fastgpt import ops
from fastgpt.kernels.dropout import quantize
from helpers import TF32_TOLERANCES, TOLERANCES, kernel_device, rel_err
from op_cases import DOT_DTYPES, assert_triton_ran, bottom_right_reference, check_grad, fresh_counts, kernel_settings

DEVICE = kernel_device()


pytestmark = [pytest.mark.usefixtures("forced_triton"), pytest.mark.kernels]


def _qkv(b, h, t, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g).to(dtype).to(DEVICE) for _ in range(3)]


def _reference(q, k, v, keep=None, p=0.0):
    """Explicit float64 attention: masked softmax, optional fixed keep-mask."""
    t, d = q.shape[-2], q.shape[-1]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    if keep is not None:  # the kernels round p to a multiple of 1/256 and scale by 1/(1 − p rounded)
        weights = weights * keep * quantize(p)[1]
    return weights @ v


def _check(out, ref, tol, name):
    if ref.norm() == 0:  # e.g. dQ at T = 1: a one-key softmax has no gradient
        assert out.double().abs().max() <= 1e-6, name
    else:
        assert rel_err(out, ref) <= tol, name


def _run_and_compare(q, k, v, dtype, keep=None, p=0.0, torch_seed=0):
    fwd_tol, grad_tol = TOLERANCES[dtype]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(torch_seed)
    out = ops.causal_attention(*leaves, dropout_p=p)
    do = torch.randn_like(out)
    out.backward(do)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _reference(*leaves64, keep, p)
    ref.backward(do.double())
    assert out.dtype == dtype and out.shape == q.shape
    _check(out, ref, fwd_tol, "out")
    for leaf, ref_leaf, name in zip(leaves, leaves64, ("dq", "dk", "dv")):
        _check(leaf.grad, ref_leaf.grad, grad_tol, name)
    assert ops.dispatch_counts[("causal_attention", "triton")] >= 1
    assert ops.dispatch_counts[("causal_attention", "eager")] == 0


CASES = ([(t, 64, torch.float32) for t in (1, 17, 64, 100, 256)]
         + [(t, 64, torch.float16) for t in (1, 17, 100)]
         + [(33, 32, torch.float32), (33, 128, torch.float16), (40, 128, torch.float16)])


@pytest.mark.parametrize("t,d,dtype", CASES, ids=str)
def test_attention_forward_and_backward_match_float64(t, d, dtype):
    q, k, v = _qkv(2, 3, t, d, dtype, seed=t)
    _run_and_compare(q, k, v, dtype)


def _forward_paths(launches):
    return {launch["bound"]["USE_TMA"] for fn, launch in launches if fn.__name__ == "_attn_fwd_kernel"}


@pytest.mark.parametrize("t", [1, 17, 100, 256])
def test_the_tma_forward_matches_float64_on_the_projection_layout(monkeypatch, t):
    # The sm_90 path (host-side tensor descriptors), forced under the interpreter on the
    # model's (B, T, H·d) projection layout; the backward is the same either way.
    from fastgpt.kernels import attention
    monkeypatch.setattr(attention, "TMA_POLICY", "always")
    monkeypatch.setattr(attention, "arch_family", lambda device: "sm90")  # and sm_90's pinned tile
    b, h, d = 2, 3, 64
    q, k, v = (torch.randn(b, t, h, d, generator=torch.Generator().manual_seed(i)).half().to(DEVICE).transpose(1, 2)
               for i in range(3))
    with launches_in_the_catalogue() as launches:
        _run_and_compare(q, k, v, torch.float16)
    assert _forward_paths(launches) == {True}
    monkeypatch.setattr(attention, "TMA_POLICY", "never")
    with launches_in_the_catalogue() as launches:
        ops.causal_attention(q, k, v)
    assert _forward_paths(launches) == {False}


@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize("q_len,kv_len", [(17, 40), (40, 41), (33, 100), (64, 64)])
def test_a_chunked_prefill_runs_the_forward_kernel_with_a_bottom_right_mask(monkeypatch, q_len, kv_len, use_tma):
    from fastgpt.kernels import attention
    monkeypatch.setattr(attention, "TMA_POLICY", "always" if use_tma else "never")
    if use_tma:  # an sm_90 launch: its pinned tile too
        monkeypatch.setattr(attention, "arch_family", lambda device: "sm90")
    g = torch.Generator().manual_seed(q_len)
    dtype = torch.float16
    q = torch.randn(2, 3, q_len, 64, generator=g).to(dtype).to(DEVICE)
    k, v = (torch.randn(2, 3, kv_len, 64, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    with torch.no_grad():
        out = ops.cached_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, bottom_right_reference(q, k, v)) <= TOLERANCES[dtype][0]
    counted = "causal_attention" if q_len == kv_len else "cached_attention"
    assert ops.dispatch_counts == {(counted, "triton"): 1}


def test_attention_takes_the_projection_layout_without_copies():
    # The model's Q/K/V: (B, T, H·d) projections viewed as (B, H, T, d) -- strided, not contiguous.
    b, t, h, d = 2, 45, 3, 32
    projection = torch.randn(b, t, 3, h, d, device=DEVICE)  # one fused QKV matmul's output
    q, k, v = (projection[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    from fastgpt.kernels.attention import _unit_last_stride
    assert _unit_last_stride(q) is q  # no hidden .contiguous() copy
    _run_and_compare(q, k, v, torch.float32)


def test_attention_output_is_laid_out_for_a_free_reshape():
    q, k, v = _qkv(2, 3, 20, 32, torch.float32)
    out = ops.causal_attention(q, k, v)
    merged = out.transpose(1, 2)  # (B, T, H, d): what the model reshapes to (B, T, H·d)
    assert merged.is_contiguous()


def _keep_mask(b, h, t, d, p, dtype, torch_seed):
    """The kernel's dropout keep-mask, reproduced by running it again with the same seed.

    With q = k = 0 every causal weight is 1/(i+1) > 0, and with v = the one-hot
    columns c..c+d of the identity the output is exactly (P ∘ Z/(1−p)) for those
    key columns: Z = output ≠ 0. The mask depends only on the seed and the
    element's position, not on q, k, v.
    """
    keep = torch.zeros(b, h, t, t, dtype=torch.float64, device=DEVICE)
    zeros = torch.zeros(b, h, t, d, dtype=dtype, device=DEVICE)
    for start in range(0, t, d):
        width = min(d, t - start)
        one_hot = torch.zeros(t, d, dtype=dtype, device=DEVICE)
        one_hot[start:start + width, :width] = torch.eye(width, dtype=dtype, device=DEVICE)
        torch.manual_seed(torch_seed)
        out = ops.causal_attention(zeros, zeros, one_hot.expand(b, h, t, d), dropout_p=p)
        keep[..., start:start + width] = (out[..., :width] != 0).double()
    ops.dispatch_counts[("causal_attention", "triton")] -= math.ceil(t / d)  # not calls under test
    return keep


@pytest.mark.parametrize("t,dtype", [(17, torch.float32), (100, torch.float32), (64, torch.float16)], ids=str)
def test_dropout_inside_the_kernel_matches_the_reference_with_its_keep_mask(t, dtype):
    b, h, d, p = 2, 2, 32, 0.2
    keep = _keep_mask(b, h, t, d, p, dtype, torch_seed=3)
    causal = torch.ones(t, t, dtype=torch.bool, device=DEVICE).tril()
    assert torch.all(keep[..., ~causal] == 0), "no weight above the diagonal"
    q, k, v = _qkv(b, h, t, d, dtype, seed=4)
    _run_and_compare(q, k, v, dtype, keep=keep, p=p, torch_seed=3)


def test_dropout_keep_rate_is_right_and_masks_differ_across_heads_and_calls():
    b, h, t, d, p = 2, 3, 64, 64, 0.3
    keep = _keep_mask(b, h, t, d, p, torch.float32, torch_seed=9)
    causal = torch.ones(t, t, dtype=torch.bool, device=DEVICE).tril()
    kept = keep[..., causal]
    n = kept.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept.mean().item() - (1 - p)) < 5 * sigma
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    other = _keep_mask(b, h, t, d, p, torch.float32, torch_seed=10)
    assert not torch.equal(keep, other)


def test_unsupported_cases_are_refused_when_forced():
    q, k, v = _qkv(1, 2, 8, 48, torch.float32)
    with pytest.raises(fastgpt.BackendError, match="head_dim 48"):
        ops.causal_attention(q, k, v)
    q, k, v = _qkv(1, 2, 8, 32, torch.float32)
    with pytest.raises(fastgpt.BackendError, match="dtypes"):
        ops.causal_attention(q, k.half(), v)


def test_attention_custom_op_passes_torch_library_opcheck():
    from fastgpt.kernels import attention  # noqa: F401  (registers the ops)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 20, 32, torch.float32))
    torch.library.opcheck(torch.ops.fastgpt.causal_attention.default, (q, k, v, 0.0, None))
    seed = torch.tensor([7], device=DEVICE)
    torch.library.opcheck(torch.ops.fastgpt.causal_attention.default, (q, k, v, 0.25, seed))


def _tuned_configs():
    """Every (kind, head_dim, dtype, dropout, config) some arch family's table lists."""
    from fastgpt.kernels import attention_configs
    seen = set()
    for kind, table in attention_configs.TABLES.items():
        for (_, d, fp32, dropout), configs in table.items():
            for config in configs:
                for p in ((0.0, 0.1) if dropout is None else (0.1 if dropout else 0.0,)):
                    dtype = torch.float32 if fp32 else torch.bfloat16
                    if (kind, d, dtype, p, config) not in seen:
                        seen.add((kind, d, dtype, p, config))
                        yield pytest.param(kind, d, dtype, p, config,
                                           id=f"{kind}-d{d}-{str(dtype)[6:]}-p{p}-{config!r}")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: the interpreter runs only the pinned config (bf16 dots are broken there too)")
@pytest.mark.parametrize("kind,d,dtype,p,config", list(_tuned_configs()))
def test_every_tuned_config_is_correct_on_gpu(kind, d, dtype, p, config):
    from fastgpt.kernels.attention import use_config
    with use_config(kind, config):
        if p == 0.0:
            _run_and_compare(*_qkv(2, 3, 300, d, dtype, seed=d), dtype)
        else:
            keep = _keep_mask(2, 3, 130, d, p, dtype, torch_seed=1)
            _run_and_compare(*_qkv(2, 3, 130, d, dtype, seed=1), dtype, keep=keep, p=p, torch_seed=1)


def _fp32_precision(setting):
    """Context: torch.set_float32_matmul_precision(setting), restored after."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(setting)
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(saved)
    return scope()


@pytest.mark.parametrize("setting,precision", [("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32")])
def test_float32_dots_follow_pytorchs_tf32_switch(setting, precision):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 20, 32, torch.float32))
    with _fp32_precision(setting), launches_in_the_catalogue() as launches:
        ops.causal_attention(q, k, v, dropout_p=0.1).sum().backward()
    dots = {fn.__name__: launch["bound"]["DOT_PRECISION"] for fn, launch in launches
            if "DOT_PRECISION" in launch["bound"]}
    assert dots == {"_attn_fwd_kernel": precision, "_attn_bwd_kernel": precision}


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: the interpreter multiplies exactly at any setting")
def test_float32_is_full_precision_by_default_and_tf32_only_when_allowed_on_gpu():
    q, k, v = _qkv(2, 3, 300, 64, torch.float32, seed=5)
    ref = _reference(q.double(), k.double(), v.double())
    with _fp32_precision("highest"):
        full = rel_err(ops.causal_attention(q, k, v), ref)
    with _fp32_precision("high"):
        tf32 = rel_err(ops.causal_attention(q, k, v), ref)
    assert full <= TOLERANCES[torch.float32][0]
    assert TOLERANCES[torch.float32][0] < tf32 <= TF32_TOLERANCES[0]  # TF32 really ran, within its bound


# ---------------------------------------------------------------- properties (hypothesis)

ATTENTION_LAYOUTS = ["contiguous", "projection", "fused qkv", "broadcast batch"]


def attention_inputs(b, h, t, d, dtype, layout, seed):
    """Three (leaf, view) pairs for q, k, v of shape (b, h, t, d) in one of the layouts the model makes."""
    g = torch.Generator().manual_seed(seed)

    def randn(*dims):
        return torch.randn(*dims, generator=g).to(dtype).to(DEVICE).requires_grad_()

    if layout == "projection":  # (B, T, H·d) projections viewed as (B, H, T, d)
        return [(randn(b, t, h, d), lambda x: x.transpose(1, 2)) for _ in range(3)]
    if layout == "fused qkv":  # one (B, T, 3, H, d) matmul output, sliced
        leaf = randn(b, t, 3, h, d)
        return [(leaf, lambda x, i=i: x[:, :, i].transpose(1, 2)) for i in range(3)]
    if layout == "broadcast batch":  # stride 0 across the batch
        return [(randn(1, h, t, d), lambda x: x.expand(b, h, t, d)) for _ in range(3)]
    return [(randn(b, h, t, d), lambda x: x) for _ in range(3)]


@kernel_settings(10)
@given(b=st.integers(1, 2), h=st.integers(1, 2), t=st.integers(1, 64), d=st.sampled_from([32, 64]),
       dtype=st.sampled_from(DOT_DTYPES), layout=st.sampled_from(ATTENTION_LAYOUTS),
       p=st.one_of(st.just(0.0), st.floats(0.05, 0.5)), seed=st.integers(0, 2**16))
def test_causal_attention_matches_float64(b, h, t, d, dtype, layout, p, seed):
    fresh_counts()
    inputs = attention_inputs(b, h, t, d, dtype, layout, seed)
    with launches_in_the_catalogue():
        torch.manual_seed(seed)
        out = ops.causal_attention(*(view(leaf) for leaf, view in inputs), dropout_p=p)
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
        out.backward(do)
        keep = _keep_mask(b, h, t, d, p, dtype, torch_seed=seed) if p > 0 else None
    # One float64 copy per distinct leaf: with fused qkv one leaf holds all three gradients.
    leaves = {id(leaf): (leaf, leaf.detach().double().requires_grad_()) for leaf, _ in inputs}
    ref = _reference(*(view(leaves[id(leaf)][1]) for leaf, view in inputs), keep, p)
    ref.backward(do.double())

    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert out.shape == (b, h, t, d) and out.dtype == dtype
    assert rel_err(out, ref) <= fwd_tol
    for leaf, leaf64 in leaves.values():
        check_grad(leaf.grad, leaf64.grad, grad_tol, "dq/dk/dv")
    assert_triton_ran("causal_attention")

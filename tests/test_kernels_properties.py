"""Property-based kernel tests: hypothesis draws shapes, dtypes, memory layouts and dropout
rates; every kernel must match float64 within DESIGN.md's tolerances, forward and backward,
and launch only specialisations the ahead-of-time compile catalogue holds.

Without a GPU the kernels run under the Triton interpreter (~1000x slower than
a GPU), so sizes stay tiny (attention: T <= 64, B*H <= 4) and example counts
small; examples are derandomized, so CI runs the same ones every time.
bfloat16 attention is drawn only on a GPU: the interpreter's bf16 tl.dot is
broken (DESIGN.md, Triton issue 11584).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from catalogue_launches import launches_in_the_catalogue
from fastgpt import ops
from helpers import TOLERANCES, kernel_device, rel_err
from test_kernels_attention import _keep_mask as attention_keep_mask
from test_kernels_attention import _reference as attention_reference
from test_kernels_decode_attention import _bottom_right_reference
from test_kernels_layer_norm import _check_grad, _dropout_add_reference
from test_kernels_layer_norm import _keep_mask as residual_keep_mask

pytestmark = [pytest.mark.usefixtures("forced_triton"), pytest.mark.kernels]

DEVICE = kernel_device()
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DOT_DTYPES = ALL_DTYPES if torch.cuda.is_available() else [torch.float32, torch.float16]


def kernel_settings(max_examples: int):
    # No shrinking: each interpreted kernel call costs seconds, and shrinking one
    # failure can take many minutes; the failing example is reported as drawn.
    # The forced_triton fixture's state (backend, NaN poison) holds for every example.
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------- memory layouts

LAYOUTS = ["contiguous", "padded rows", "strided columns", "transposed", "broadcast"]


def make_input(shape, dtype, layout, seed, scale=1.0, shift=0.0):
    """(leaf, view): a leaf tensor to take gradients of, and the view of it shaped ``shape``
    with the given memory layout (what the op under test receives)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)

    def randn(*dims):
        return (torch.randn(dims, generator=g) * scale + shift).to(dtype).to(DEVICE).requires_grad_()

    if layout == "padded rows" and shape:  # row stride wider than the row
        leaf = randn(*shape[:-1], shape[-1] + 3)
        return leaf, lambda t: t[..., :shape[-1]]
    if layout == "strided columns" and shape:  # last-dim stride 2
        leaf = randn(*shape[:-1], 2 * shape[-1])
        return leaf, lambda t: t[..., ::2]
    if layout == "transposed" and len(shape) >= 2:
        leaf = randn(shape[1], shape[0], *shape[2:])
        return leaf, lambda t: t.transpose(0, 1)
    if layout == "broadcast" and shape:  # stride 0 in the leading dim
        leaf = randn(1, *shape[1:])
        return leaf, lambda t: t.expand(shape)
    return randn(*shape), lambda t: t


def as_float64(leaf, view):
    leaf64 = leaf.detach().double().requires_grad_()
    return leaf64, view(leaf64)


def assert_triton_ran(op):
    assert ops.dispatch_counts[(op, "triton")] >= 1 and ops.dispatch_counts[(op, "eager")] == 0, \
        dict(ops.dispatch_counts)


def fresh_counts():
    ops.reset_dispatch_counts()


# ---------------------------------------------------------------- LayerNorm

rows = st.lists(st.integers(1, 5), min_size=1, max_size=2)
widths = st.one_of(st.integers(1, 300), st.sampled_from([768, 1600, 4096]))


@kernel_settings(12)
@given(rows=rows, width=widths, dtype=st.sampled_from(ALL_DTYPES), layout=st.sampled_from(LAYOUTS),
       float32_params=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_norm_matches_float64(rows, width, dtype, layout, float32_params, seed):
    fresh_counts()
    shape = (*rows, width)
    x_leaf, view = make_input(shape, dtype, layout, seed, scale=3.0, shift=1.0)
    param_dtype = torch.float32 if float32_params else dtype  # float32 params: autocast's mix
    w_leaf, _ = make_input((width,), param_dtype, "contiguous", seed + 1, scale=0.5, shift=1.0)
    b_leaf, _ = make_input((width,), param_dtype, "contiguous", seed + 2)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 3)).to(dtype).to(DEVICE)

    with launches_in_the_catalogue():
        y = ops.layer_norm(view(x_leaf), w_leaf, b_leaf, 1e-5)
        y.backward(dy)
    x64, xv64 = as_float64(x_leaf, view)
    w64, b64 = (t.detach().double().requires_grad_() for t in (w_leaf, b_leaf))
    ref = F.layer_norm(xv64, (width,), w64, b64, 1e-5)
    ref.backward(dy.double())

    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert y.shape == shape and y.dtype == dtype
    assert rel_err(y, ref) <= fwd_tol
    for leaf, leaf64, name in ((x_leaf, x64, "dx"), (w_leaf, w64, "dw"), (b_leaf, b64, "db")):
        assert leaf.grad.dtype == leaf.dtype, name
        _check_grad(leaf.grad, leaf64.grad, grad_tol, name)
    assert_triton_ran("layer_norm")


@kernel_settings(10)
@given(rows=rows, width=st.integers(1, 200), dtype=st.sampled_from(ALL_DTYPES), layout=st.sampled_from(LAYOUTS),
       p=st.one_of(st.just(0.0), st.floats(0.05, 0.6)), seed=st.integers(0, 2**16))
def test_dropout_add_layer_norm_matches_float64_with_its_keep_mask(rows, width, dtype, layout, p, seed):
    fresh_counts()
    shape = (*rows, width)
    x_leaf, x_view = make_input(shape, dtype, layout, seed, scale=2.0)
    branch_leaf, branch_view = make_input(shape, dtype, "contiguous", seed + 1)
    w_leaf, _ = make_input((width,), dtype, "contiguous", seed + 2, scale=0.5, shift=1.0)
    b_leaf, _ = make_input((width,), dtype, "contiguous", seed + 3)
    g = torch.Generator().manual_seed(seed + 4)
    dh, dy = (torch.randn(shape, generator=g).to(dtype).to(DEVICE) for _ in range(2))

    with launches_in_the_catalogue():
        torch.manual_seed(seed)
        h, y = ops.dropout_add_layer_norm(x_view(x_leaf), branch_view(branch_leaf), w_leaf, b_leaf, 1e-5, p)
        (h.float() * dh.float()).sum().add((y.float() * dy.float()).sum()).backward()
        keep = residual_keep_mask(shape, dtype, p, torch_seed=seed)  # the same seed draws the same mask
    leaves64 = [as_float64(x_leaf, x_view), as_float64(branch_leaf, branch_view)]
    w64, b64 = (t.detach().double().requires_grad_() for t in (w_leaf, b_leaf))
    h_ref, y_ref = _dropout_add_reference(leaves64[0][1], leaves64[1][1], w64, b64, keep, p)
    (h_ref * dh.double()).sum().add((y_ref * dy.double()).sum()).backward()

    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert rel_err(h, h_ref) <= fwd_tol and rel_err(y, y_ref) <= fwd_tol
    pairs = ((x_leaf, leaves64[0][0], "dx"), (branch_leaf, leaves64[1][0], "dbranch"), (w_leaf, w64, "dw"),
             (b_leaf, b64, "db"))
    for leaf, leaf64, name in pairs:
        _check_grad(leaf.grad, leaf64.grad, grad_tol, name)
    if p > 0:
        assert torch.all(branch_leaf.grad[keep == 0] == 0), "backward drops exactly what forward dropped"
    assert_triton_ran("dropout_add_layer_norm")


# ---------------------------------------------------------------- GELU

@kernel_settings(10)
@given(shape=st.lists(st.integers(1, 40), min_size=0, max_size=3), dtype=st.sampled_from(ALL_DTYPES),
       layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_gelu_matches_float64(shape, dtype, layout, seed):
    fresh_counts()
    x_leaf, view = make_input(shape, dtype, layout, seed, scale=3.0)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
    with launches_in_the_catalogue():
        y = ops.gelu(view(x_leaf))
        y.backward(dy)
    x64, xv64 = as_float64(x_leaf, view)
    ref = F.gelu(xv64, approximate="tanh")
    ref.backward(dy.double())
    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert y.shape == tuple(shape) and y.dtype == dtype
    assert rel_err(y, ref) <= fwd_tol
    _check_grad(x_leaf.grad, x64.grad, grad_tol, "dx")
    assert_triton_ran("gelu")


@kernel_settings(8)
@given(rows=rows, width_in=st.integers(1, 64), width_out=st.integers(1, 300), dtype=st.sampled_from(ALL_DTYPES),
       layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_linear_gelu_matches_float64(rows, width_in, width_out, dtype, layout, seed):
    fresh_counts()
    x_leaf, view = make_input((*rows, width_in), dtype, layout, seed)
    w_leaf, _ = make_input((width_out, width_in), dtype, "contiguous", seed + 1, scale=width_in ** -0.5)
    b_leaf, _ = make_input((width_out,), dtype, "contiguous", seed + 2)
    dy = torch.randn(*rows, width_out, generator=torch.Generator().manual_seed(seed + 3)).to(dtype).to(DEVICE)
    with launches_in_the_catalogue():
        y = ops.linear_gelu(view(x_leaf), w_leaf, b_leaf)
        y.backward(dy)
    x64, xv64 = as_float64(x_leaf, view)
    w64, b64 = (t.detach().double().requires_grad_() for t in (w_leaf, b_leaf))
    ref = F.gelu(F.linear(xv64, w64, b64), approximate="tanh")
    ref.backward(dy.double())
    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert rel_err(y, ref) <= fwd_tol
    for leaf, leaf64, name in ((x_leaf, x64, "dx"), (w_leaf, w64, "dw"), (b_leaf, b64, "db")):
        _check_grad(leaf.grad, leaf64.grad, grad_tol, name)
    assert_triton_ran("linear_gelu")


# ---------------------------------------------------------------- attention

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
        keep = attention_keep_mask(b, h, t, d, p, dtype, torch_seed=seed) if p > 0 else None
    # One float64 copy per distinct leaf: with fused qkv one leaf holds all three gradients.
    leaves = {id(leaf): (leaf, leaf.detach().double().requires_grad_()) for leaf, _ in inputs}
    ref = attention_reference(*(view(leaves[id(leaf)][1]) for leaf, view in inputs), keep, p)
    ref.backward(do.double())

    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert out.shape == (b, h, t, d) and out.dtype == dtype
    assert rel_err(out, ref) <= fwd_tol
    for leaf, leaf64 in leaves.values():
        _check_grad(leaf.grad, leaf64.grad, grad_tol, "dq/dk/dv")
    assert_triton_ran("causal_attention")


@kernel_settings(8)
@given(b=st.integers(1, 2), h=st.integers(1, 2), q_len=st.integers(1, 16), extra=st.integers(1, 150),
       d=st.sampled_from([32, 64]), dtype=st.sampled_from(DOT_DTYPES), seed=st.integers(0, 2**16))
def test_decode_attention_matches_float64(b, h, q_len, extra, d, dtype, seed):
    fresh_counts()
    kv_len = q_len + extra
    g = torch.Generator().manual_seed(seed)
    # A preallocated cache filled to kv_len (strided views), queries in the projection layout.
    k_cache, v_cache = (torch.randn(b, h, kv_len + 7, d, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
    q = torch.randn(b, q_len, h, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    with launches_in_the_catalogue(), torch.no_grad():
        out = ops.cached_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, _bottom_right_reference(q, k, v)) <= TOLERANCES[dtype][0]
    assert_triton_ran("cached_attention")


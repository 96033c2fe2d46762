"""LayerNorm kernels (plain, and fused with residual add + dropout): parity with float64, forward and
backward; hypothesis properties over shapes, dtypes and memory layouts; autocast's dtype mixes.

Without a GPU these run under the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1); every test checks the Triton path really ran.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastgpt
from catalogue_launches import launches_in_the_catalogue
from fastgpt import ops
from fastgpt.kernels.dropout import quantize
from helpers import TOLERANCES, kernel_device, rel_err
from op_cases import (ALL_DTYPES, HALF_DTYPES, LAYOUTS, as_float64, assert_triton_ran, autocast_cases,
                      check_autocast_case, check_grad, fresh_counts, kernel_settings, make_input, rows)

DEVICE = kernel_device()


pytestmark = [pytest.mark.usefixtures("forced_triton"), pytest.mark.kernels]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g).mul(3).add(1).to(dtype)  # non-zero mean, non-unit variance
    w = torch.randn(n, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return [t.to(DEVICE) for t in (x, w, b, dy)]


def _reference_grads(fn, tensors, dy):
    """fn on float64 copies of tensors; returns (output, grads)."""
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(dy.double())
    return out.detach(), [leaf.grad for leaf in leaves]


SHAPES = [(1, 1), (1, 17), (1, 768), (1, 1600), (1000, 17), (37, 768), (5, 1600), (2, 3, 100)]
# float32 on every shape; the half types on all but the 1000-row one (interpreter time).
CASES = [(shape, torch.float32) for shape in SHAPES] + [
    (shape, dtype) for dtype in (torch.float16, torch.bfloat16) for shape in SHAPES if shape[0] != 1000]


@pytest.mark.parametrize("shape,dtype", CASES, ids=str)
def test_layer_norm_forward_and_backward_match_float64(shape, dtype):
    x, w, b, dy = _inputs(shape, dtype)
    fwd_tol, grad_tol = TOLERANCES[dtype]
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = ops.layer_norm(*leaves, 1e-5)
    y.backward(dy)
    ref, ref_grads = _reference_grads(lambda x, w, b: F.layer_norm(x, (shape[-1],), w, b, 1e-5), (x, w, b), dy)
    assert y.dtype == dtype and y.shape == shape
    assert rel_err(y, ref) <= fwd_tol
    for leaf, ref_grad, name in zip(leaves, ref_grads, ("dx", "dw", "db")):
        assert leaf.grad.dtype == dtype
        check_grad(leaf.grad, ref_grad, grad_tol, name)
    assert ops.dispatch_counts == {("layer_norm", "triton"): 1}


def test_row_alignment_is_the_largest_power_of_two_up_to_16_dividing_width_and_strides():
    from fastgpt.kernels.layer_norm import row_alignment
    assert row_alignment(768, 768, 2304) == 16 and row_alignment(4096, 4096) == 16
    assert row_alignment(100, 100) == 4 and row_alignment(34, 80) == 2 and row_alignment(33, 80) == 1


@pytest.mark.parametrize("layout", ["strided rows", "strided even rows", "strided columns", "transposed leading dims"])
def test_layer_norm_handles_non_contiguous_inputs(layout):
    base, w, b, dy = _inputs((6, 4, 80), torch.float32, seed=1)
    x = {"strided rows": base[:, :, :33],            # row stride 80, width 33
         "strided even rows": base[:, :, :34],       # rows 2-element aligned: the kernels are told so
         "strided columns": base[:, :, ::2],          # column stride 2
         "transposed leading dims": base.transpose(0, 1)}[layout]
    assert not x.is_contiguous()
    n = x.shape[-1]
    w, b = w[:n], b[:n]
    dy = torch.randn(x.shape, device=DEVICE)
    x = x.detach().requires_grad_()
    y = ops.layer_norm(x, w, b, 1e-5)
    y.backward(dy)
    ref, (ref_dx,) = _reference_grads(lambda x: F.layer_norm(x, (n,), w.double(), b.double(), 1e-5), (x,), dy)
    assert rel_err(y, ref) <= 1e-5 and rel_err(x.grad, ref_dx) <= 1e-4


def _keep_mask(shape, dtype, p, torch_seed):
    """The kernel's keep-mask for this shape and torch seed, reproduced by running it
    again (same seed, same element offsets) on x = 0, branch = 1: h = keep / (1 − p)."""
    torch.manual_seed(torch_seed)
    h, _ = ops.dropout_add_layer_norm(torch.zeros(shape, dtype=dtype, device=DEVICE),
                                      torch.ones(shape, dtype=dtype, device=DEVICE),
                                      torch.ones(shape[-1], dtype=dtype, device=DEVICE),
                                      torch.zeros(shape[-1], dtype=dtype, device=DEVICE), 1e-5, p)
    ops.dispatch_counts[("dropout_add_layer_norm", "triton")] -= 1  # not the call under test
    return (h != 0).to(torch.float64)


def _dropout_add_reference(x, branch, w, b, keep, p):
    # The kernels round p to a multiple of 1/256 and scale by 1 / (1 − p rounded): unbiased.
    scale = quantize(p)[1]
    h = x + branch * keep * scale
    return h, F.layer_norm(h, (h.shape[-1],), w, b, 1e-5)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape,dtype", [((3, 17), torch.float32), ((2, 9, 768), torch.float32),
                                         ((64, 1600), torch.float32), ((4, 100), torch.float16),
                                         ((4, 100), torch.bfloat16)], ids=str)
def test_dropout_add_layer_norm_matches_the_reference_with_its_keep_mask(shape, dtype, p):
    x, w, b, dy = _inputs(shape, dtype, seed=2)
    branch, _, _, dh = _inputs(shape, dtype, seed=3)
    fwd_tol, grad_tol = TOLERANCES[dtype]
    leaves = [t.clone().requires_grad_() for t in (x, branch, w, b)]
    torch.manual_seed(11)
    h, y = ops.dropout_add_layer_norm(*leaves, 1e-5, p)
    (h.float() * dh.float()).sum().add((y.float() * dy.float()).sum()).backward()
    keep = _keep_mask(shape, dtype, p, torch_seed=11)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, branch, w, b)]
    h_ref, y_ref = _dropout_add_reference(*leaves64, keep.to(DEVICE), p)
    (h_ref * dh.double()).sum().add((y_ref * dy.double()).sum()).backward()
    assert rel_err(h, h_ref) <= fwd_tol and rel_err(y, y_ref) <= fwd_tol
    for leaf, ref_leaf, name in zip(leaves, leaves64, ("dx", "dbranch", "dw", "db")):
        check_grad(leaf.grad, ref_leaf.grad, grad_tol, name)
    if p > 0:
        assert torch.all(leaves[1].grad[keep == 0] == 0), "backward must drop exactly what forward dropped"
    assert ops.dispatch_counts == {("dropout_add_layer_norm", "triton"): 1}


def test_dropout_keep_rate_and_reproducibility():
    n, p = 200 * 500, 0.25
    x = torch.zeros(200, 500, device=DEVICE)
    branch = torch.ones(200, 500, device=DEVICE)
    w, b = torch.ones(500, device=DEVICE), torch.zeros(500, device=DEVICE)
    torch.manual_seed(0)
    h1, _ = ops.dropout_add_layer_norm(x, branch, w, b, 1e-5, p)
    torch.manual_seed(0)
    h2, _ = ops.dropout_add_layer_norm(x, branch, w, b, 1e-5, p)
    h3, _ = ops.dropout_add_layer_norm(x, branch, w, b, 1e-5, p)
    kept = (h1 != 0).double().mean().item()
    threshold, scale = quantize(p)
    assert threshold == 64  # 0.25 is a multiple of 1/256: no rounding
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma, f"keep rate {kept:.4f}, expected {1 - p} ± {5 * sigma:.4f}"
    assert torch.equal(h1, h2), "same torch seed, same mask"
    assert not torch.equal(h1, h3), "next draw, new mask"
    assert torch.allclose(h1[h1 != 0], torch.full_like(h1[h1 != 0], 1 / (1 - p)))
    # Rows must not repeat one pattern (the offset includes the row).
    assert not torch.equal(h1[0], h1[1])


def test_unsupported_cases_are_refused_when_forced():
    x = torch.randn(2, 5000, device=DEVICE)
    with pytest.raises(fastgpt.BackendError, match="hidden size 5000"):
        ops.layer_norm(x, torch.ones(5000, device=DEVICE), torch.zeros(5000, device=DEVICE))
    with pytest.raises(fastgpt.BackendError, match="dtype torch.float64"):
        ops.layer_norm(x[:, :8].double(), torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE))


def test_custom_ops_pass_torch_library_opcheck():
    from fastgpt.kernels import layer_norm  # noqa: F401  (registers the ops)
    x, w, b, _ = _inputs((3, 24), torch.float32, seed=5)
    branch = torch.randn(3, 24, device=DEVICE)
    args = [t.requires_grad_() for t in (x, w, b)]
    torch.library.opcheck(torch.ops.fastgpt.layer_norm.default, (*args, 1e-5))
    seed = torch.tensor([1234], device=DEVICE)
    torch.library.opcheck(torch.ops.fastgpt.dropout_add_layer_norm.default,
                          (x, branch.requires_grad_(), w, b, 1e-5, 0.0, seed))


# ---------------------------------------------------------------- properties (hypothesis)

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
        check_grad(leaf.grad, leaf64.grad, grad_tol, name)
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
        keep = _keep_mask(shape, dtype, p, torch_seed=seed)  # the same seed draws the same mask
    leaves64 = [as_float64(x_leaf, x_view), as_float64(branch_leaf, branch_view)]
    w64, b64 = (t.detach().double().requires_grad_() for t in (w_leaf, b_leaf))
    h_ref, y_ref = _dropout_add_reference(leaves64[0][1], leaves64[1][1], w64, b64, keep, p)
    (h_ref * dh.double()).sum().add((y_ref * dy.double()).sum()).backward()

    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert rel_err(h, h_ref) <= fwd_tol and rel_err(y, y_ref) <= fwd_tol
    pairs = ((x_leaf, leaves64[0][0], "dx"), (branch_leaf, leaves64[1][0], "dbranch"), (w_leaf, w64, "dw"),
             (b_leaf, b64, "db"))
    for leaf, leaf64, name in pairs:
        check_grad(leaf.grad, leaf64.grad, grad_tol, name)
    if p > 0:
        assert torch.all(branch_leaf.grad[keep == 0] == 0), "backward drops exactly what forward dropped"
    assert_triton_ran("dropout_add_layer_norm")


# ---------------------------------------------------------------- mixed precision

@pytest.mark.parametrize("case", autocast_cases("layer_norm", "dropout_add_layer_norm"))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_takes_autocast_dtype_mixes_like_eager(dtype, case):
    check_autocast_case(case, dtype)

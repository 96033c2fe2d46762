"""GELU kernels (plain, and with the FeedForward bias fused in): parity with float64, forward and backward;
hypothesis properties over shapes, dtypes and memory layouts; autocast's dtype mixes."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import fastgpt
from catalogue_launches import launches_in_the_catalogue
from fastgpt import ops
from helpers import TOLERANCES, kernel_device, rel_err
from op_cases import (ALL_DTYPES, HALF_DTYPES, LAYOUTS, as_float64, assert_triton_ran, autocast_cases,
                      check_autocast_case, check_grad, fresh_counts, kernel_settings, make_input, rows)

DEVICE = kernel_device()


pytestmark = [pytest.mark.usefixtures("forced_triton"), pytest.mark.kernels]


def _randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype).to(DEVICE)  # wide range: tails and the centre


CASES = [((1,), torch.float32), ((17,), torch.float32), ((3, 1000), torch.float32), ((2, 5, 3072), torch.float32),
         ((7, 129), torch.float16), ((7, 129), torch.bfloat16), ((2, 3, 768), torch.bfloat16)]


@pytest.mark.parametrize("shape,dtype", CASES, ids=str)
def test_gelu_forward_and_backward_match_float64(shape, dtype):
    fwd_tol, grad_tol = TOLERANCES[dtype]
    x, dy = _randn(shape, dtype, 0), _randn(shape, dtype, 1)
    leaf = x.clone().requires_grad_()
    y = ops.gelu(leaf)
    y.backward(dy)
    x64 = x.double().requires_grad_()
    ref = F.gelu(x64, approximate="tanh")
    ref.backward(dy.double())
    assert y.dtype == dtype and rel_err(y, ref) <= fwd_tol
    assert rel_err(leaf.grad, x64.grad) <= grad_tol
    assert ops.dispatch_counts == {("gelu", "triton"): 1}


def test_gelu_of_extreme_inputs_is_finite_and_exact_in_the_limits():
    x = torch.tensor([-1e4, -50.0, -10.0, 0.0, 10.0, 50.0, 1e4], device=DEVICE).requires_grad_()
    y = ops.gelu(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y[[0, 1, 3]], torch.zeros(3, device=DEVICE))
    torch.testing.assert_close(y[[-3, -2, -1]], x.detach()[[-3, -2, -1]])
    torch.testing.assert_close(x.grad[[0, 1, -2, -1]], torch.tensor([0.0, 0.0, 1.0, 1.0], device=DEVICE))


def test_gelu_of_a_non_contiguous_input():
    base = _randn((8, 64), torch.float32, 2)
    x = base.t()[:, ::3]  # transposed and strided
    assert not x.is_contiguous()
    torch.testing.assert_close(ops.gelu(x), F.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,dtype", [((1, 8), torch.float32), ((37, 24), torch.float32),
                                         ((2, 9, 64), torch.float32), ((5, 24), torch.float16),
                                         ((5, 24), torch.bfloat16)], ids=str)
def test_linear_gelu_fuses_the_bias_and_matches_float64(shape, dtype):
    fwd_tol, grad_tol = TOLERANCES[dtype]
    width_out = 4 * shape[-1] + 3  # not a multiple of the block
    x, w = _randn(shape, dtype, 3), _randn((width_out, shape[-1]), dtype, 4) / shape[-1] ** 0.5
    b, dy = _randn((width_out,), dtype, 5), _randn((*shape[:-1], width_out), dtype, 6)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = ops.linear_gelu(*leaves)
    y.backward(dy)
    leaves64 = [t.double().requires_grad_() for t in (x, w, b)]
    ref = F.gelu(F.linear(*leaves64), approximate="tanh")
    ref.backward(dy.double())
    assert rel_err(y, ref) <= fwd_tol
    for leaf, ref_leaf, name in zip(leaves, leaves64, ("dx", "dw", "dbias")):
        assert rel_err(leaf.grad, ref_leaf.grad) <= grad_tol, name
    assert ops.dispatch_counts == {("linear_gelu", "triton"): 1}


def test_gelu_custom_op_passes_torch_library_opcheck():
    from fastgpt.kernels import gelu  # noqa: F401  (registers the ops)
    x, b = _randn((4, 24), torch.float32, 7).requires_grad_(), _randn((24,), torch.float32, 8).requires_grad_()
    torch.library.opcheck(torch.ops.fastgpt.gelu.default, (x, b))
    torch.library.opcheck(torch.ops.fastgpt.gelu.default, (x, None))


def test_linear_gelu_refuses_mismatched_shapes_when_forced():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(fastgpt.BackendError, match="does not fit input width 8"):
        ops.linear_gelu(x, torch.randn(16, 9, device=DEVICE), torch.randn(16, device=DEVICE))


# ---------------------------------------------------------------- properties (hypothesis)

def _rounding(ref, dtype):
    """The relative error of ``ref`` rounded to ``dtype``, allowed on top of the tolerance: GELU's far
    negative tail (and its slope there) lies below float16's smallest subnormal, where even the
    exact answer rounds to 0."""
    return rel_err(ref.to(dtype), ref)


@kernel_settings(10)
@given(shape=st.lists(st.integers(1, 40), min_size=0, max_size=3), dtype=st.sampled_from(ALL_DTYPES),
       layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
@example(shape=[13], dtype=torch.float16, layout="broadcast", seed=46178)  # one x near -6.5: every y rounds to -0
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
    assert rel_err(y, ref) <= fwd_tol + _rounding(ref, dtype)
    check_grad(x_leaf.grad, x64.grad, grad_tol + _rounding(x64.grad, dtype), "dx")
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
        check_grad(leaf.grad, leaf64.grad, grad_tol, name)
    assert_triton_ran("linear_gelu")


# ---------------------------------------------------------------- mixed precision

@pytest.mark.parametrize("case", autocast_cases("linear_gelu"))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_takes_autocast_dtype_mixes_like_eager(dtype, case):
    check_autocast_case(case, dtype)

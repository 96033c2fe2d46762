"""What the per-op test files (tests/test_<op>.py) share: the gradient check, the bottom-right
attention reference, the property-test machinery (hypothesis settings, memory layouts) and the
autocast harness (the dtype mixes torch.autocast hands the ops).

Property tests: without a GPU the kernels run under the Triton interpreter (~1000x slower
than a GPU), so sizes stay tiny (attention: T <= 64, B*H <= 4) and example counts small;
examples are derandomized, so CI runs the same ones every time. bfloat16 attention is drawn
only on a GPU: the interpreter's bf16 tl.dot is broken (docs/design.md, Triton issue 11584).

Autocast: the parameters and the residual stream stay float32 while the Linear layers hand
half-precision activations to our ops; each op must take those mixes, give eager's dtypes
and stay within docs/design.md's half-precision tolerances.
"""

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

import fastgpt
from catalogue_launches import launches_in_the_catalogue
from fastgpt import ops
from helpers import TOLERANCES, kernel_device, rel_err

DEVICE = kernel_device()
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DOT_DTYPES = ALL_DTYPES if torch.cuda.is_available() else [torch.float32, torch.float16]
HALF_DTYPES = [torch.bfloat16, torch.float16]


def check_grad(out_grad, ref_grad, tol, name):
    if ref_grad.norm() < 1e-9:
        # e.g. dx of a width-1 row: zero in exact arithmetic.
        assert out_grad.double().abs().max() <= 1e-5, name
    else:
        assert rel_err(out_grad, ref_grad) <= tol, name


def bottom_right_reference(q, k, v):
    """float64 attention where query i (of q_len) sits at position kv_len − q_len + i."""
    q_len, kv_len, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(diagonal=kv_len - q_len)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v.double()


# ---------------------------------------------------------------- property tests

def kernel_settings(max_examples: int):
    # No shrinking: each interpreted kernel call costs seconds, and shrinking one
    # failure can take many minutes; the failing example is reported as drawn.
    # The forced_triton fixture's state (backend, NaN poison) holds for every example.
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


rows = st.lists(st.integers(1, 5), min_size=1, max_size=2)

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


# ---------------------------------------------------------------- autocast's dtype mixes

def _autocast_cases(dtype):
    """(op, float64 reference, arguments): the dtype mixes autocast hands our ops."""
    g = torch.Generator().manual_seed(3)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    n = 48
    half_x, x, branch = randn(3, 5, n, dtype=dtype), randn(3, 5, n), randn(3, 5, n, dtype=dtype)
    w, b = 1 + 0.1 * randn(n), 0.1 * randn(n)
    w_ff, b_ff = randn(2 * n, n) / n**0.5, randn(2 * n)

    def layer_norm(x, w, b):
        return F.layer_norm(x, (n,), w, b, 1e-5)

    def linear_gelu(x, w, b):
        return F.gelu(F.linear(x, w, b), approximate="tanh")

    def dropout_add_layer_norm(x, branch, w, b):
        h = x + branch
        return h, layer_norm(h, w, b)

    return {
        "layer_norm of a half-precision activation": (ops.layer_norm, layer_norm, (half_x, w, b)),
        "linear_gelu of the float32 residual": (ops.linear_gelu, linear_gelu, (x, w_ff, b_ff)),
        "linear_gelu of a half-precision activation": (ops.linear_gelu, linear_gelu, (half_x, w_ff, b_ff)),
        "residual add of a half-precision branch": (ops.dropout_add_layer_norm, dropout_add_layer_norm,
                                                    (x, branch, w, b)),
        "half-precision residual, float32 branch": (ops.dropout_add_layer_norm, dropout_add_layer_norm,
                                                    (half_x, x, w, b)),
    }


def autocast_cases(*op_names):
    """The names of the autocast cases that call one of ``op_names``."""
    return [name for name, (op, _, _) in _autocast_cases(torch.float32).items() if op.__name__ in op_names]


def check_autocast_case(case, dtype):
    """Under torch.autocast(dtype) the Triton op takes the case's dtype mix (forced_triton must be
    active), gives eager's dtypes and matches float64 forward and backward."""
    op, reference, args = _autocast_cases(dtype)[case]

    def run(backend, args):
        leaves = [a.detach().clone().requires_grad_() for a in args]
        with fastgpt.use_backend(backend), torch.autocast(DEVICE, dtype=dtype):
            out = op(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        sum((o.double() * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        return outs, [leaf.grad for leaf in leaves]

    with launches_in_the_catalogue() as launched:
        triton_outs, triton_grads = run("triton", args)
    assert launched
    assert sum(ops.dispatch_counts.values()) == ops.dispatch_counts[(op.__name__, "triton")] == 1
    eager_outs, _ = run("eager", args)
    leaves64 = [a.detach().double().requires_grad_() for a in args]
    ref_outs = reference(*leaves64)
    ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
    sum((o * (i + 1)).sum() for i, o in enumerate(ref_outs)).backward()

    fwd_tol, grad_tol = TOLERANCES[dtype]
    for out, eager, ref in zip(triton_outs, eager_outs, ref_outs, strict=True):
        assert out.dtype == eager.dtype  # the same dtype whichever path runs
        assert rel_err(out, ref) <= fwd_tol
    for grad, arg, leaf in zip(triton_grads, args, leaves64):
        assert grad.dtype == arg.dtype
        assert rel_err(grad, leaf.grad) <= grad_tol

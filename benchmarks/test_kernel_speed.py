"""LayerNorm, GELU and their fusions: Triton vs eager PyTorch vs torch.compile, time and GB/s.

GB/s counts the bytes each op must read and write once (activations and their
gradients; parameters and per-row statistics are small and left out). GPU
targets (H100, bf16, 8192 rows × 768–1600): LayerNorm forward ≥ 85% and
forward+backward ≥ 70% of measured HBM bandwidth; the fused add+LayerNorm and
bias+GELU ≥ 1.5× their eager sequences.

    pytest benchmarks/test_kernel_speed.py --benchmark-group-by=group --benchmark-json out.json
"""

import pytest
import torch
import torch.nn.functional as F

from fastgpt import ops
from timing import ON_GPU, record_bandwidth, synchronized

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
ROWS = 8192 if ON_GPU else 256
WIDTHS = [768, 1024, 1280, 1600] if ON_GPU else [768]
# Without a GPU only the eager forms run (Triton's interpreter is not a speed).
IMPLEMENTATIONS = ["triton", "eager", "torch.compile"] if ON_GPU else ["eager"]


def _implementation(impl, fn):
    """fn under the chosen backend; torch.compile compiles the eager form."""
    if impl == "torch.compile":
        compiled = torch.compile(fn)

        def run():
            with ops.use_backend("eager"):
                return compiled()
        return run

    def run():
        with ops.use_backend(impl):
            return fn()
    return run


def _bench(benchmark, impl, fn, bytes_moved):
    run = synchronized(_implementation(impl, fn), DEVICE)
    run()  # warm-up: compilation, autotuning, allocator
    benchmark.pedantic(run, rounds=20 if ON_GPU else 5, warmup_rounds=2)
    record_bandwidth(benchmark, bytes_moved)
    benchmark.extra_info.update(impl=impl, dtype=str(DTYPE), device=str(DEVICE))


def _tensor(*shape, grad=False):
    t = torch.randn(*shape, device=DEVICE, dtype=DTYPE)
    return t.requires_grad_() if grad else t


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("width", WIDTHS)
def test_layer_norm_forward(benchmark, impl, width):
    benchmark.group = f"layer_norm fwd {ROWS}x{width}"
    x, w, b = _tensor(ROWS, width), _tensor(width), _tensor(width)
    _bench(benchmark, impl, lambda: ops.layer_norm(x, w, b), 2 * x.numel() * x.element_size())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("width", WIDTHS)
def test_layer_norm_forward_backward(benchmark, impl, width):
    benchmark.group = f"layer_norm fwd+bwd {ROWS}x{width}"
    x, w, b = _tensor(ROWS, width, grad=True), _tensor(width, grad=True), _tensor(width, grad=True)
    dy = _tensor(ROWS, width)

    def step():
        ops.layer_norm(x, w, b).backward(dy)

    # forward: read x, write y; backward: read dy and x, write dx
    _bench(benchmark, impl, step, 5 * x.numel() * x.element_size())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("width", WIDTHS)
def test_dropout_add_layer_norm_forward(benchmark, impl, width):
    benchmark.group = f"add+layer_norm fwd {ROWS}x{width}"
    x, branch, w, b = _tensor(ROWS, width), _tensor(ROWS, width), _tensor(width), _tensor(width)
    # read x and branch, write h and y
    _bench(benchmark, impl, lambda: ops.dropout_add_layer_norm(x, branch, w, b), 4 * x.numel() * x.element_size())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("width", WIDTHS)
def test_bias_gelu_forward(benchmark, impl, width):
    # The FeedForward activation: a (rows × 4·width) matmul output plus bias, then GELU.
    # Timed without the matmul, which is the same for every implementation.
    benchmark.group = f"bias+gelu fwd {ROWS}x{4 * width}"
    z, bias = _tensor(ROWS, 4 * width), _tensor(4 * width)
    if impl == "triton":
        from fastgpt.kernels.gelu import gelu_op

        def fn():
            return gelu_op(z, bias)
    else:
        def fn():
            return F.gelu(z + bias, approximate="tanh")
    _bench(benchmark, impl, fn, 2 * z.numel() * z.element_size())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("width", WIDTHS)
def test_gelu_forward_backward(benchmark, impl, width):
    benchmark.group = f"gelu fwd+bwd {ROWS}x{4 * width}"
    z, dy = _tensor(ROWS, 4 * width, grad=True), _tensor(ROWS, 4 * width)

    def step():
        ops.gelu(z).backward(dy)

    # forward: read z, write y; backward: read dy and z, write dz
    _bench(benchmark, impl, step, 5 * z.numel() * z.element_size())

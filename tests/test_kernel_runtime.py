"""What every launch relies on besides the kernel (kernels/runtime.py): the device guard, the
device checks, dropout seeds on the tensors' device, float32 dot precision from PyTorch's switch.
"""

import contextlib

import pytest
import torch

import fastgpt
from fastgpt import ops
from fastgpt.kernels import runtime
from helpers import kernel_device

DEVICE = kernel_device()
pytestmark = pytest.mark.kernels


# ---------------------------------------------------------------- the device guard

@pytest.mark.parametrize("module_name,call", [
    ("attention", lambda: ops.causal_attention(*(torch.randn(1, 2, 9, 32, device=DEVICE, requires_grad=True)
                                                 for _ in range(3)), dropout_p=0.1).sum().backward()),
    ("layer_norm", lambda: ops.dropout_add_layer_norm(
        torch.randn(3, 40, device=DEVICE, requires_grad=True), torch.randn(3, 40, device=DEVICE),
        torch.ones(40, device=DEVICE), torch.zeros(40, device=DEVICE), 1e-5, 0.1)[1].sum().backward()),
    ("gelu", lambda: ops.linear_gelu(torch.randn(3, 8, device=DEVICE, requires_grad=True),
                                     torch.randn(16, 8, device=DEVICE), torch.randn(16, device=DEVICE)
                                     ).sum().backward()),
    ("decode_attention", lambda: ops.cached_attention(*(torch.randn(1, 2, n, 32, device=DEVICE)
                                                        for n in (1, 30, 30)))),
])
def test_every_launch_runs_under_its_tensors_device(monkeypatch, forced_triton, module_name, call):
    """Triton launches on the current CUDA device: each launcher must make the tensors' device
    current first. Here the guard is recorded and the kernels' launches checked to run inside it."""
    import importlib
    module = importlib.import_module(f"fastgpt.kernels.{module_name}")
    inside, launched_inside, launched_outside = [], [], []

    @contextlib.contextmanager
    def recording_guard(t):
        inside.append(t.device)
        try:
            with runtime.on_device(t):
                yield
        finally:
            inside.pop()

    jit_functions = [value for value in vars(module).values() if hasattr(value, "run") and hasattr(value, "arg_names")]
    for fn in jit_functions:
        original = fn.run

        def run(*args, _original=original, **kwargs):
            (launched_inside if inside else launched_outside).append(kwargs.get("grid"))
            return _original(*args, **kwargs)
        monkeypatch.setattr(fn, "run", run, raising=False)
    monkeypatch.setattr(module, "on_device", recording_guard)
    with torch.no_grad() if module_name == "decode_attention" else contextlib.nullcontext():
        call()
    assert launched_inside, "no kernel ran"
    assert not launched_outside, f"{len(launched_outside)} launches outside the device guard"


def test_inputs_on_different_devices_are_refused_by_name(forced_triton):
    q = torch.randn(1, 2, 8, 32, device=DEVICE)
    elsewhere = torch.empty(1, 2, 8, 32, device="meta")
    with pytest.raises(fastgpt.BackendError, match=r"inputs on different devices \(q on .*, k on meta"):
        ops.causal_attention(q, elsewhere, q)
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(fastgpt.BackendError, match="weight on meta"):
        ops.layer_norm(x, torch.ones(16, device="meta"), torch.zeros(16, device=DEVICE))
    with pytest.raises(ValueError, match="op: inputs on different devices"):
        runtime.same_device("op", a=q, b=elsewhere)
    assert runtime.device_mismatch(a=q, b=None, c=q) is None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices: a model on cuda:1, cuda:0 current")
def test_a_model_on_the_second_gpu_computes_what_it_computes_on_the_first():
    from fastgpt import GPTModel
    from helpers import TINY, rel_err
    torch.manual_seed(0)
    model = GPTModel({**TINY, "n_heads": 2}).eval()
    idx = torch.randint(0, TINY["vocab_size"], (2, 17))
    with torch.no_grad():
        on_first = model.to("cuda:0")(idx.to("cuda:0")).cpu()
        torch.cuda.set_device(0)
        on_second = model.to("cuda:1")(idx.to("cuda:1"))
        torch.cuda.synchronize("cuda:1")
    assert on_second.device == torch.device("cuda:1")
    assert rel_err(on_second.cpu(), on_first) <= 1e-5


# ---------------------------------------------------------------- seeds and precision

def test_dropout_seeds_live_on_the_tensors_device_and_follow_torch_manual_seed():
    torch.manual_seed(3)
    a = runtime.dropout_seed(torch.device(DEVICE))
    torch.manual_seed(3)
    b = runtime.dropout_seed(torch.device(DEVICE))
    c = runtime.dropout_seed(torch.device(DEVICE))
    assert a.device.type == DEVICE and a.dtype == torch.int64 and a.shape == (1,)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA-graph capture")
def test_dropout_masks_change_at_every_cuda_graph_replay():
    fastgpt.set_backend("triton")
    q, k, v = (torch.randn(1, 2, 64, 64, device="cuda") for _ in range(3))
    ops.causal_attention(q, k, v, dropout_p=0.5)  # compile and tune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.causal_attention(q, k, v, dropout_p=0.5)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out), "a captured graph must draw a new seed at every replay"


def test_fp32_dot_precision_follows_pytorchs_switch():
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert runtime.dot_precision(torch.float32) == "tf32x3"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert runtime.dot_precision(torch.float32) == "tf32"
        assert runtime.dot_precision(torch.bfloat16) == "tf32"  # no choice for half operands
    finally:
        torch.set_float32_matmul_precision(saved)

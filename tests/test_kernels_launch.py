"""What every launch relies on besides the kernel: the device guard, the device checks,
dropout seeds on the tensors' device, and the tile-config tuner (kernels/runtime.py,
kernels/autotune.py). The tuner's timing runs on a GPU only, so here it times with a
stand-in clock; the rules around it (capture, failures, cache, keys) are the same.
"""

import contextlib
import json

import pytest
import torch

import fastgpt
from fastgpt import ops
from fastgpt.kernels import autotune, runtime
from fastgpt.kernels.autotune import Config, Tuner
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


# ---------------------------------------------------------------- the tuner

A, B, C = Config(64, 32, 4, 2), Config(128, 64, 8, 3), Config(32, 16, 4, 2)


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """The tuner as on a GPU: not pinned, not in the interpreter, a stand-in clock."""
    monkeypatch.setattr(autotune, "interpreter_on", lambda: False)
    monkeypatch.delenv(autotune.PINNED_ENV, raising=False)
    monkeypatch.delenv(autotune.TUNE_CACHE_ENV, raising=False)
    times = {A: 2.0, B: 1.0, C: 3.0}
    timed = []

    def bench(fn):
        config = fn()
        timed.append(config)
        if isinstance(times[config], Exception):
            raise times[config]
        return times[config]
    monkeypatch.setattr(autotune, "_bench", bench)
    return times, timed


def launch(config):
    return config  # the stand-in clock reads which config "ran"


def test_the_fastest_candidate_wins_and_is_remembered(tuning):
    times, timed = tuning
    tuner = Tuner()
    assert tuner.choose("fwd", "key", [A, B], launch, C) == B
    assert timed == [A, B]
    assert tuner.choose("fwd", "key", [A, B], launch, C) == B and timed == [A, B]  # cached: no second tuning
    [record] = tuner.records
    assert record.chosen == repr(B) and record.timings_ms == {repr(A): 2.0, repr(B): 1.0} and record.seconds >= 0


def test_no_tuning_while_capturing_or_tracing(tuning, monkeypatch):
    times, timed = tuning
    tuner = Tuner()
    monkeypatch.setattr(autotune, "_capturing_or_tracing", lambda: True)
    assert tuner.choose("fwd", "key", [A, B], launch, C) == A  # the heuristic default: the first candidate
    assert timed == [] and tuner.table == {}  # nothing timed, nothing cached
    monkeypatch.setattr(autotune, "_capturing_or_tracing", lambda: False)
    assert tuner.choose("fwd", "key", [A, B], launch, C) == B
    # Captured later at another length or grid: the config tuned for this kernel already
    # (compiled: nothing compiles inside a capture), not the untimed first candidate.
    tuner.table = {"fwd|d=64|bfloat16|T=1024|fill=2^0|gpu": B}
    monkeypatch.setattr(autotune, "_capturing_or_tracing", lambda: True)
    assert tuner.choose("fwd", "fwd|d=64|bfloat16|T=4096|fill=2^2|gpu", [A, B], launch, C) == B
    assert tuner.choose("fwd", "fwd|d=32|bfloat16|T=4096|fill=2^2|gpu", [A, B], launch, C) == A


def test_a_failing_candidate_is_reported_and_skipped_and_all_failing_raises(tuning):
    times, _ = tuning
    times[B] = RuntimeError("out of resource: shared memory")
    tuner = Tuner()
    with pytest.warns(RuntimeWarning, match=r"config BLOCK_M=128 BLOCK_N=64 .* failed .*out of resource"):
        assert tuner.choose("fwd", "key", [A, B], launch, C) == A
    assert "out of resource" in tuner.records[0].failures[repr(B)]
    times[A] = RuntimeError("out of resource: registers")
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="every candidate config failed"):
        Tuner().choose("fwd", "other key", [A, B], launch, C)


def test_a_broken_cuda_context_is_raised_not_skipped(tuning):
    times, _ = tuning
    times[A] = RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        Tuner().choose("fwd", "key", [A, B], launch, C)


def test_forced_and_pinned_configs_come_first(tuning, monkeypatch):
    tuner = Tuner()
    with tuner.use_config("fwd", A):
        assert tuner.choose("fwd", "key", [A, B], launch, C) == A
    monkeypatch.setenv(autotune.PINNED_ENV, "1")
    assert tuner.choose("fwd", "key", [A, B], launch, C) == C


def test_the_tune_cache_file_is_written_and_read_back(tuning, tmp_path, monkeypatch):
    _, timed = tuning
    path = tmp_path / "not yet" / "tune.json"  # the folder is made when the first choice is saved
    monkeypatch.setenv(autotune.TUNE_CACHE_ENV, str(path))
    Tuner().choose("fwd", "key", [A, B], launch, C)
    saved = json.loads(path.read_text())
    assert saved["configs"] == {"key": {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}}
    timed.clear()
    assert Tuner().choose("fwd", "key", [A, B], launch, C) == B  # a new process reads it
    assert timed == []
    # A cached choice that is no longer a candidate is tuned afresh.
    assert Tuner().choose("fwd", "key", [A, C], launch, C) == A
    # Two processes saving: neither loses the other's choices.
    first, second = Tuner(), Tuner()
    first.choose("fwd", "first key", [A, B], launch, C)
    second.choose("fwd", "second key", [A, B], launch, C)
    assert {"key", "first key", "second key"} <= set(json.loads(path.read_text())["configs"])
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{autotune.TUNE_CACHE_ENV}=.*not a fastgpt tune cache"):
        Tuner().choose("fwd", "key", [A, B], launch, C)


def test_the_key_tells_grid_fullness_apart(monkeypatch):
    monkeypatch.setattr(autotune, "_device_name_and_sms", lambda device: ("NVIDIA H200", 132))
    cpu = torch.device("cpu")
    key = Tuner.key_for
    assert key("fwd", 64, torch.bfloat16, 1000, 96, cpu) == key("fwd", 64, torch.bfloat16, 1024, 96, cpu)
    assert key("fwd", 64, torch.bfloat16, 1024, 96, cpu) != key("fwd", 64, torch.bfloat16, 1024, 8 * 96, cpu)
    assert key("fwd", 64, torch.bfloat16, 1024, 96, cpu) != key("fwd", 64, torch.float16, 1024, 96, cpu)
    assert [autotune.fill_bucket(p, 132) for p in (1, 33, 132, 264, 528, 10_000)] == [-2, -2, 0, 1, 2, 3]

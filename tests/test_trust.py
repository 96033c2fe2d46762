"""Measured auto (fastgpt/trust.py): a kernel is checked against eager and timed before auto trusts it.

On CPU through the test seam: ``ops._measure_on_cpu`` lets auto treat interpreter
CPU tensors as a device, ``ops._triton_kernel`` injects a wrong, failing or
"slow" kernel, and ``trust.clock`` is a fake clock (no assertion reads a real one).
"""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from fastgpt import ops, trust, verdicts
from helpers import kernel_device

WIDTH = 64
DEVICE = kernel_device()  # CUDA when present (measured for real); else CPU tensors under the interpreter


def randn(*shape, generator=None, requires_grad=False):
    return torch.randn(*shape, generator=generator).to(DEVICE).requires_grad_(requires_grad)


def fake_clock(triton_ms, eager_ms):
    def clock(which, fn, reps, device):
        fn()  # the timed work still runs
        return [triton_ms if which == "triton" else eager_ms] * reps
    return clock


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Measured auto on CPU tensors, a verdict file in tmp_path, Triton 'faster' on the fake clock."""
    path = tmp_path / "verdicts.json"
    monkeypatch.setenv("FASTGPT_VERDICTS", str(path))
    monkeypatch.setattr(trust, "_policy", "check")
    monkeypatch.setattr(ops, "_measure_on_cpu", True)
    monkeypatch.setattr(trust, "clock", fake_clock(1.0, 2.0))
    trust.reset()
    verdicts.reset()
    ops.set_backend("auto")
    yield path
    trust.reset()
    verdicts.reset()


def inject(monkeypatch, op, run):
    """Give ``op`` the kernel ``run`` (counted in run.calls); other ops keep theirs."""
    real = ops._triton_kernel
    calls = []

    def counted(*args):
        calls.append(args)
        return run(*args)
    counted.calls = calls
    monkeypatch.setattr(ops, "_triton_kernel", lambda name: (counted, lambda *a, **k: None) if name == op
                        else real(name))
    return counted


def ln_args(rows=8, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = randn(rows, WIDTH, generator=g, requires_grad=requires_grad)
    return x, randn(WIDTH, generator=g) + 1, randn(WIDTH, generator=g), 1e-5


def wrong_layer_norm(x, w, b, eps):
    return F.layer_norm(x, x.shape[-1:], w, b, eps) + 0.1


def test_a_wrong_kernel_is_caught_runs_eager_warns_once_and_is_recorded(measured, monkeypatch):
    kernel = inject(monkeypatch, "layer_norm", wrong_layer_norm)
    x, w, b, eps = ln_args()
    with pytest.warns(RuntimeWarning, match=r"layer_norm's Triton kernel disagrees .*rows=8 width=64 float32 on "
                                            r".*Triton error .* eager error"):
        out = ops.layer_norm(x, w, b, eps)
    torch.testing.assert_close(out, F.layer_norm(x, (WIDTH,), w, b, eps))  # the call got eager's numbers
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second check
        ops.layer_norm(x, w, b, eps)
    assert ops.dispatch_counts[("layer_norm", "eager")] == 2 and ops.dispatch_counts[("layer_norm", "triton")] == 0
    assert trust.measured["layer_norm"] == 1 and len(kernel.calls) == 1
    saved = json.loads(measured.read_text())["verdicts"]
    (entry,) = saved.values()
    assert entry["op"] == "layer_norm" and entry["path"] == "eager" and entry["status"] == "disagree"
    assert entry["triton_err"] > 1e-3 > entry["eager_err"]


def test_nan_never_passes(measured, monkeypatch):
    inject(monkeypatch, "gelu", lambda x: torch.full_like(x, float("nan")))
    with pytest.warns(RuntimeWarning, match="gelu's Triton kernel disagrees"):
        ops.gelu(randn(4, WIDTH))
    assert ops.dispatch_counts[("gelu", "eager")] == 1


def test_a_kernel_that_raises_is_an_eager_verdict_with_its_reason_not_a_crash(measured, monkeypatch):
    def broken(x):
        raise RuntimeError("out of resources: shared memory")
    inject(monkeypatch, "gelu", broken)
    x = randn(4, WIDTH)
    with pytest.warns(RuntimeWarning, match="failed its check .*out of resources"):
        out = ops.gelu(x)
    torch.testing.assert_close(out, F.gelu(x, approximate="tanh"))
    (verdict,) = trust._session.values()
    assert (verdict.path, verdict.status) == ("eager", "error") and "shared memory" in verdict.reason


def test_slower_on_the_clock_keeps_eager_faster_takes_triton(measured, monkeypatch):
    inject(monkeypatch, "gelu", lambda x: F.gelu(x, approximate="tanh"))
    monkeypatch.setattr(trust, "clock", fake_clock(2.0, 1.0))
    ops.gelu(randn(4, WIDTH))
    assert ops.dispatch_counts[("gelu", "eager")] == 1
    monkeypatch.setattr(trust, "clock", fake_clock(1.0, 2.0))
    ops.gelu(randn(64, WIDTH))  # another rows bucket: another key
    assert ops.dispatch_counts[("gelu", "triton")] == 1
    statuses = sorted(v.status for v in trust._session.values())
    assert statuses == ["faster", "slower"]
    # A near tie (3% faster) is not a win: the margin keeps eager.
    monkeypatch.setattr(trust, "clock", fake_clock(0.97, 1.0))
    ops.gelu(randn(1024, WIDTH))
    assert ops.dispatch_counts[("gelu", "eager")] == 2


def test_the_real_interpreter_kernel_passes_its_check(measured):
    x, w, b, eps = ln_args(rows=16, requires_grad=True)
    out = ops.layer_norm(x, w, b, eps)
    out.sum().backward()
    assert ops.dispatch_counts[("layer_norm", "triton")] == 1
    (verdict,) = trust._session.values()
    assert verdict.status == "faster" and verdict.grad and verdict.triton_err < 1e-4
    assert trust.describe("layer_norm") == "2.0× eager, checked"


def test_a_check_leaves_rng_states_and_inputs_as_they_were(measured):
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(1)
    q, k, v = (randn(1, 2, 16, 32, generator=g, requires_grad=True) for _ in range(3))
    before = [t.detach().clone() for t in (q, k, v)]
    state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state() if DEVICE == "cuda" else None
    trust.measure("causal_attention", ops._triton_kernel("causal_attention")[0], (q, k, v, 0.1))
    assert torch.equal(torch.get_rng_state(), state)
    if cuda_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    assert all(torch.equal(t, b) for t, b in zip((q, k, v), before))
    assert all(t.grad is None for t in (q, k, v))
    assert not ops.dispatch_counts  # the check's own eager runs are not counted


def test_dropout_is_compared_at_zero_and_its_keep_rate_checked(measured, monkeypatch):
    # Right at p = 0, but drops nothing at p = 0.1: the keep rate gives it away.
    inject(monkeypatch, "dropout_add_layer_norm", lambda x, br, w, b, eps, p: (
        x + br, F.layer_norm(x + br, x.shape[-1:], w, b, eps)))
    x, w, b, eps = ln_args(rows=64)
    with pytest.warns(RuntimeWarning, match="dropout keeps 1.000"):
        ops.dropout_add_layer_norm(x, torch.randn_like(x), w, b, eps, 0.1)
    (verdict,) = trust._session.values()
    assert verdict.status == "disagree" and verdict.dropout


def test_the_real_attention_kernel_with_dropout_passes_the_keep_rate(measured):
    g = torch.Generator().manual_seed(2)
    q, k, v = (randn(2, 2, 32, 32, generator=g) for _ in range(3))
    ops.causal_attention(q, k, v, 0.1)
    (verdict,) = trust._session.values()
    assert verdict.status == "faster", verdict.reason


def test_under_torch_compile_nothing_is_measured_and_a_recorded_verdict_is_used(measured, monkeypatch):
    kernel = inject(monkeypatch, "layer_norm", wrong_layer_norm)
    x, w, b, eps = ln_args()

    def f(x):
        return ops.layer_norm(x, w, b, eps)
    # No verdict yet: the default (Triton), one warning, no check while tracing.
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="no recorded verdict"):
        out = torch.compile(f, backend="eager", fullgraph=True)(x)
    assert trust.measured["layer_norm"] == 0
    torch.testing.assert_close(out, wrong_layer_norm(x, w, b, eps))
    # Checked once outside (the wrong kernel is caught), then a new trace takes the recorded verdict.
    with pytest.warns(RuntimeWarning, match="disagrees"):
        f(x)
    torch._dynamo.reset()
    calls = len(kernel.calls)
    out = torch.compile(f, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(out, F.layer_norm(x, (WIDTH,), w, b, eps))
    assert trust.measured["layer_norm"] == 1 and len(kernel.calls) == calls


def test_under_a_cuda_graph_capture_nothing_is_measured(measured, monkeypatch):
    kernel = inject(monkeypatch, "layer_norm", wrong_layer_norm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    x, w, b, eps = ln_args()
    with pytest.warns(RuntimeWarning, match="no recorded verdict"):
        ops.layer_norm(x, w, b, eps)
    assert ops.dispatch_counts[("layer_norm", "triton")] == 1 and trust.measured["layer_norm"] == 0
    # A verdict recorded earlier (here: in the file, by another process) is what the capture uses.
    key = trust.full_key(trust.short_key("layer_norm", (x, w, b, eps)))
    verdicts.store().put(key, trust.Verdict(key=key, op="layer_norm", shape="", dtype="float32", device="cpu",
                                            path="eager", status="disagree").to_dict())
    trust.reset()
    ops.layer_norm(x, w, b, eps)
    assert ops.dispatch_counts[("layer_norm", "eager")] == 1 and len(kernel.calls) == 1


def test_too_large_for_free_memory_is_unmeasured_and_keeps_the_default(measured, monkeypatch):
    kernel = inject(monkeypatch, "gelu", lambda x: F.gelu(x, approximate="tanh"))
    monkeypatch.setattr(trust, "_free_bytes", lambda device: 10_000)  # a fake torch.cuda.mem_get_info
    ops.gelu(randn(64, WIDTH))
    (verdict,) = trust._session.values()
    assert (verdict.path, verdict.status) == ("triton", "unmeasured") and "MiB free" in verdict.reason
    assert len(kernel.calls) == 1  # the call itself, no check
    assert not measured.exists()   # unmeasured is not a verdict to keep


def test_policies_trust_and_always_check(measured, monkeypatch):
    kernel = inject(monkeypatch, "gelu", lambda x: F.gelu(x, approximate="tanh"))
    x = randn(4, WIDTH)
    trust.set_policy("trust")
    ops.gelu(x)
    assert trust.measured["gelu"] == 0 and ops.dispatch_counts[("gelu", "triton")] == 1
    trust.set_policy("always-check")
    ops.gelu(x)
    ops.gelu(x)
    assert trust.measured["gelu"] == 2
    assert len(kernel.calls) > 2
    with pytest.raises(ValueError, match="unknown trust policy"):
        trust.set_policy("sometimes")
    for value, expected in (("", "check"), ("Always-Check", "always-check"), ("trust", "trust")):
        monkeypatch.setenv("FASTGPT_TRUST", value)
        assert trust.policy_from_environment() == expected
    monkeypatch.setenv("FASTGPT_TRUST", "sometimes")
    with pytest.raises(ValueError, match="FASTGPT_TRUST='sometimes'"):
        trust.policy_from_environment()


def test_forced_triton_is_never_measured_and_cpu_without_the_seam_stays_eager(measured, monkeypatch):
    kernel = inject(monkeypatch, "layer_norm", wrong_layer_norm)
    x, w, b, eps = ln_args()
    with ops.use_backend("triton"):
        ops.layer_norm(x, w, b, eps)
    assert trust.measured["layer_norm"] == 0 and ops.dispatch_counts[("layer_norm", "triton")] == 1
    monkeypatch.setattr(ops, "_measure_on_cpu", False)
    ops.layer_norm(x, w, b, eps)
    assert ops.dispatch_counts[("layer_norm", "eager")] == 1 and trust.measured["layer_norm"] == 0
    assert len(kernel.calls) == 1


def test_keys_bucket_shapes_and_tell_training_and_dropout_apart():
    key = trust.short_key
    x = torch.randn(100, 768)
    assert key("gelu", (x,))[1] == (("rows", 128), ("width", 1024))
    assert key("gelu", (x,)) == key("gelu", (torch.randn(120, 700),))
    assert key("gelu", (x,)) != key("gelu", (x.half(),))
    assert key("gelu", (x,)) != key("gelu", (x.requires_grad_(),))
    q = torch.randn(2, 12, 300, 64)
    assert key("causal_attention", (q, q, q, 0.0))[1] == (("BH", 32), ("T", 512), ("d", 64))
    assert key("causal_attention", (q, q, q, 0.0)) != key("causal_attention", (q, q, q, 0.1))
    k = torch.randn(2, 12, 3000, 64)
    assert key("cached_attention", (q[:, :, :1], k, k, 0.0))[1] == (("BH", 32), ("Tq", 1), ("cache", 4096), ("d", 64))
    full = trust.full_key(key("gelu", (torch.randn(4, 8),)))
    assert "cpu (Triton interpreter)" in full and "fastgpt " in full and "triton " in full


def test_profile_shows_the_verdict_behind_each_path(measured, monkeypatch):
    from fastgpt.profiling.report_text import format_paths
    inject(monkeypatch, "gelu", lambda x: F.gelu(x, approximate="tanh"))
    ops.gelu(randn(4, WIDTH))
    verdicts_shown = {op: trust.describe(op) for op in ("gelu", "layer_norm") if trust.describe(op)}
    text = format_paths({"gelu": {"triton": 12}, "layer_norm": {"eager": 13}}, verdicts=verdicts_shown)
    assert text == "gelu triton×12 (2.0× eager, checked), layer_norm eager×13"
    monkeypatch.setattr(trust, "clock", fake_clock(3.0, 2.0))
    ops.gelu(randn(64, WIDTH))
    assert trust.describe("gelu") == "kept on eager: Triton 0.67×, checked"


def test_attention_too_large_for_a_float64_reference_is_checked_on_a_slice_of_heads(measured, monkeypatch):
    monkeypatch.setattr(trust, "REFERENCE_SCORES_BYTES", 16 * 16 * 8 * 3 * 3)  # three (batch, head) pairs
    g = torch.Generator().manual_seed(3)
    q, k, v = (randn(2, 4, 16, 32, generator=g, requires_grad=True) for _ in range(3))
    assert trust._reference_view("causal_attention", (q, k, v, 0.0))(q).shape == (1, 3, 16, 32)
    # Wrong in the last head only (outside the slice): not seen, as the slice is what is compared...
    def wrong_outside(q, k, v, p):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.cat([out[:, :3], out[:, 3:] + 1], dim=1)
    inject(monkeypatch, "causal_attention", wrong_outside)
    ops.causal_attention(q, k, v, 0.0)
    assert list(trust._session.values())[-1].status == "faster"
    # ...and wrong in the first head: caught, forward and gradients compared on the slice.
    trust.reset()
    measured.unlink()  # forget the recorded verdict too
    verdicts.reset()
    def wrong_inside(q, k, v, p):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.cat([out[:, :1] * 1.1, out[:, 1:]], dim=1)
    inject(monkeypatch, "causal_attention", wrong_inside)
    with pytest.warns(RuntimeWarning, match="disagrees"):
        ops.causal_attention(q, k, v, 0.0)

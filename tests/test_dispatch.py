"""Dispatch: backend selection, the record of which path ran, and forced-Triton failures."""

import asyncio
import contextlib
import os
import subprocess
import sys
import threading

import pytest
import torch

import fastgpt
from fastgpt import GPTModel, ops
from helpers import TINY


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter, outside the repository root (kept off sys.path)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=os.path.dirname(sys.executable), timeout=300)


def test_cpu_forward_records_the_eager_path_for_every_op_call():
    model = GPTModel(TINY).eval()
    ops.reset_dispatch_counts()
    with torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long))
    layers = TINY["n_layers"]
    assert dict(ops.dispatch_counts) == {
        ("layer_norm", "eager"): layers + 1,  # norm1 of each block, final_norm
        ("dropout_add_layer_norm", "eager"): layers,  # residual add + norm2
        ("linear_gelu", "eager"): layers,
        ("causal_attention", "eager"): layers,
    }


def test_set_get_and_scoped_backends():
    assert fastgpt.get_backend() == "auto"
    fastgpt.set_backend("eager")
    assert fastgpt.get_backend("gelu") == "eager"
    with fastgpt.use_backend("triton", op="causal_attention"):
        assert fastgpt.get_backend("causal_attention") == "triton"
        assert fastgpt.get_backend("layer_norm") == "eager"
    assert fastgpt.get_backend("causal_attention") == "eager"
    with pytest.raises(ValueError, match="unknown backend 'cuda'; choose one of auto, triton, eager"):
        fastgpt.set_backend("cuda")
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        fastgpt.set_backend("eager", op="softmax")


def test_backend_spec_parsing():
    assert ops.parse_backend_spec("") == ("auto", {})
    assert ops.parse_backend_spec("eager") == ("eager", {})
    assert ops.parse_backend_spec(" triton , gelu=eager") == ("triton", {"gelu": "eager"})
    assert ops.parse_backend_spec("eager,eager,gelu=auto,gelu=auto") == ("eager", {"gelu": "auto"})  # repeats agree
    with pytest.raises(ValueError, match="unknown op 'attention'"):
        ops.parse_backend_spec("attention=eager")


def test_the_spec_in_force_reads_back_as_a_spec():
    fastgpt.set_backend("eager")
    fastgpt.set_backend("triton", op="gelu")
    assert ops.backend_spec() == "eager,gelu=triton"
    with fastgpt.use_backend("auto"):
        assert ops.backend_spec() == "auto"
    assert ops.parse_backend_spec(ops.backend_spec()) == ("eager", {"gelu": "triton"})


# ---------------------------------------------------------------- scopes are per thread and per task

@contextlib.contextmanager
def _thread_in_a_scope(name):
    """Another thread inside ``with use_backend(name)`` while this block runs; yields what it saw."""
    inside, release, seen = threading.Event(), threading.Event(), {}

    def scoped():
        with fastgpt.use_backend(name):
            inside.set()
            release.wait(timeout=60)
            seen["inside"] = fastgpt.get_backend("gelu")
        seen["after"] = fastgpt.get_backend()

    worker = threading.Thread(target=scoped)
    worker.start()
    try:
        assert inside.wait(timeout=60)
        yield seen
    finally:
        release.set()
        worker.join(timeout=60)


def test_a_scope_in_one_thread_does_not_reach_another_threads_ops():
    with _thread_in_a_scope("triton") as seen:
        # Under the old process-global scope, this plain forward raised BackendError (Triton on CPU).
        assert fastgpt.get_backend("gelu") == "auto"
        GPTModel(TINY).eval()(torch.zeros(1, 3, dtype=torch.long))
    assert seen["inside"] == "triton"


def test_set_backend_in_one_thread_survives_another_threads_scope_ending():
    with _thread_in_a_scope("triton") as seen:
        fastgpt.set_backend("eager")
    assert seen == {"inside": "triton", "after": "eager"}  # set_backend is process-wide
    assert fastgpt.get_backend() == "eager"


def test_scopes_closed_out_of_order_each_remove_only_themselves():
    def generator():
        with fastgpt.use_backend("eager"):
            yield fastgpt.get_backend()

    gen = generator()
    assert next(gen) == "eager"
    outer = fastgpt.use_backend("triton", op="gelu")
    outer.__enter__()
    gen.close()  # the generator's scope ends first, inside the other one
    assert (fastgpt.get_backend(), fastgpt.get_backend("gelu")) == ("auto", "triton")
    outer.__exit__(None, None, None)
    assert (fastgpt.get_backend(), fastgpt.get_backend("gelu")) == ("auto", "auto")


def test_asyncio_tasks_each_have_their_own_scope():
    async def task(name, started, other_started):
        with fastgpt.use_backend(name):
            started.set()
            await other_started.wait()
            return fastgpt.get_backend()

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        results = await asyncio.gather(task("eager", a, b), task("triton", b, a))
        return results, fastgpt.get_backend()

    assert asyncio.run(main()) == (["eager", "triton"], "auto")


def test_environment_variable_sets_the_backend_and_rejects_typos():
    ok = _run_python("import fastgpt; print(fastgpt.get_backend(), fastgpt.get_backend('gelu'))",
                     FASTGPT_BACKEND="eager,gelu=auto")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == ["eager", "auto"]
    # `import fastgpt` alone loads nothing (the CLI's --help stays fast); the first use of an op reads it.
    for spec, message in [("trtion", "FASTGPT_BACKEND='trtion': unknown backend 'trtion'"),
                          ("eager,triton", "FASTGPT_BACKEND='eager,triton': conflicting default backends"),
                          ("gelu=eager,gelu=triton", "FASTGPT_BACKEND='gelu=eager,gelu=triton': conflicting backends "
                                                     "for gelu")]:
        bad = _run_python("import fastgpt; fastgpt.GPTModel", FASTGPT_BACKEND=spec)
        assert bad.returncode != 0
        assert message in bad.stderr


def _kernels(**forms):
    """A stand-in for ops._triton_kernel: op -> (run, supports) for the ops named, no kernel for the rest."""
    return lambda op: forms.get(op)


def test_forcing_triton_for_an_op_without_a_kernel_fails_loudly(monkeypatch):
    monkeypatch.setattr(ops, "_triton_kernel", _kernels())
    with fastgpt.use_backend("triton"), pytest.raises(fastgpt.BackendError, match="no Triton kernel for gelu"):
        ops.gelu(torch.randn(3))


def _fake_kernel(calls):
    def run(x):
        calls.append(x.shape)
        return torch.nn.functional.gelu(x, approximate="tanh")

    def supports(x):
        return None if x.dtype == torch.float32 else f"dtype {x.dtype} not supported"

    return run, supports


def test_forced_triton_runs_the_kernel_found_and_records_it(monkeypatch):
    pytest.importorskip("triton")
    calls = []
    monkeypatch.setattr(ops, "_triton_kernel", _kernels(gelu=_fake_kernel(calls)))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ops.reset_dispatch_counts()
    with fastgpt.use_backend("triton", op="gelu"):
        ops.gelu(torch.randn(2, 3))
        with pytest.raises(fastgpt.BackendError, match="does not support this case: dtype torch.float64"):
            ops.gelu(torch.randn(2, 3, dtype=torch.float64))
    assert calls == [(2, 3)]
    assert ops.dispatch_counts[("gelu", "triton")] == 1


def test_forced_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(ops, "_triton_kernel", _kernels(gelu=_fake_kernel([])))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fastgpt.use_backend("triton"), pytest.raises(fastgpt.BackendError, match="TRITON_INTERPRET=1"):
        ops.gelu(torch.randn(3))


def test_auto_stays_eager_on_cpu_even_with_a_kernel_at_hand(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "_triton_kernel", _kernels(gelu=_fake_kernel(calls)))
    ops.reset_dispatch_counts()
    ops.gelu(torch.randn(4))
    assert calls == [] and ops.dispatch_counts[("gelu", "eager")] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto picks Triton only for CUDA tensors; needs a GPU")
def test_auto_picks_a_supporting_kernel_on_cuda_and_falls_back_otherwise(monkeypatch):
    pytest.importorskip("triton")
    calls = []
    monkeypatch.setattr(ops, "_triton_kernel", _kernels(gelu=_fake_kernel(calls)))
    ops.reset_dispatch_counts()
    ops.gelu(torch.randn(4, device="cuda"))
    ops.gelu(torch.randn(4, device="cuda", dtype=torch.float64))
    assert ops.dispatch_counts[("gelu", "triton")] == 1 and ops.dispatch_counts[("gelu", "eager")] == 1


def test_fastgpt_imports_and_runs_without_triton():
    code = """
import sys
class BlockTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked for this test")
sys.meta_path.insert(0, BlockTriton())
import torch, fastgpt
from fastgpt import ops
model = fastgpt.GPTModel({"vocab_size": 11, "context_length": 8, "emb_dim": 8, "n_heads": 2,
                          "n_layers": 1, "drop_rate": 0.0, "qkv_bias": False})
print(tuple(model(torch.zeros(1, 3, dtype=torch.long)).shape))
ops._triton_kernel = lambda op: (lambda x: x, lambda x: None)
try:
    with fastgpt.use_backend("triton"):
        ops.gelu(torch.ones(2))
except fastgpt.BackendError as err:
    print(err)
print("triton" in sys.modules)
"""
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "(1, 3, 11)"
    assert "gelu: backend 'triton' is forced but Triton is not usable here (ImportError" in lines[1]
    assert lines[2] == "False"


def test_kernels_folder_is_fastgpt_kernels_and_harmless_as_a_top_level_import():
    import fastgpt.kernels
    assert os.path.basename(os.path.dirname(fastgpt.kernels.__file__)) == "kernels"
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastgpt.__file__)))
    # With the root on sys.path, transformers may import kernels/ as `kernels`
    # while probing for Hugging Face's package: that import must stay cheap.
    result = _run_python(f"import sys; sys.path.insert(0, {root!r}); import kernels; "
                         "print('triton' in sys.modules, 'torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]

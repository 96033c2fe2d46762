"""Shared set-up for the pytest-benchmark suites.

On a CUDA machine every Triton case runs beside its peers (eager PyTorch,
torch.compile, ...). Without a GPU the suites still run, quickly, on small
eager-only cases, so CI proves they work; the header says which mode ran.

Options: ``--full`` (the full size sweep of the model-level suites; CUDA
only), ``--compile-backend NAME`` (torch.compile's backend), ``--peak-tflops X``
(the peak used for MFU where the GPU is not in fastgpt.profiling.flops' table).
"""

import platform

import pytest
import torch

from timing import ON_GPU


def pytest_addoption(parser):
    group = parser.getgroup("fastgpt benchmarks")
    group.addoption("--full", action="store_true",
                    help="model-level suites: the full sweep of batch sizes and sequence lengths (needs CUDA)")
    group.addoption("--compile-backend", default=None,
                    help="torch.compile backend for the torch.compile cases (default inductor on CUDA, "
                         "aot_eager on CPU)")
    group.addoption("--peak-tflops", type=float, default=None,
                    help="peak dense TFLOP/s of this device, for MFU (default: known for H100/H200/A100)")


def pytest_configure(config):
    import models

    full = config.getoption("--full")
    if full and not ON_GPU:
        raise pytest.UsageError("--full is the GPU sweep and needs a CUDA device; without one the suites run "
                                "their small CPU sizes")
    models.SETTINGS.full = full
    models.SETTINGS.mode = (("GPU, full sweep (--full)" if full else "GPU, quick sizes (no --full)") if ON_GPU
                            else "CPU, small sizes")
    if config.getoption("--compile-backend"):
        models.SETTINGS.compile_backend = config.getoption("--compile-backend")
    peak = config.getoption("--peak-tflops")
    if peak is not None and not peak > 0:
        raise pytest.UsageError(f"--peak-tflops must be > 0, got {peak}")
    models.SETTINGS.peak_tflops = peak


@pytest.fixture(scope="module")
def models(request):
    """The model-level suites' models (models.shared_models: built once per session), in train mode
    for a module that sets ``TRAIN_MODE = True``, else in eval mode."""
    import models as models_module

    return models_module.shared_models(train=getattr(request.module, "TRAIN_MODE", False))


def pytest_report_header(config):
    import models

    compile_backend = f"torch.compile backend {models.SETTINGS.compile_backend}"
    if ON_GPU:
        sweep = "full sweep" if models.SETTINGS.full else "quick sizes (--full for the sweep)"
        return (f"fastgpt benchmarks: CUDA ({torch.cuda.get_device_name()}), {sweep}, all implementations, "
                f"{compile_backend}")
    return ("fastgpt benchmarks: no CUDA device -- small sizes, CPU timings; Triton cases are not run (the "
            "interpreter is not a speed); kernel suites: eager only; model suites: fastgpt (eager; training also "
            f"with the fused loss), torch.compile (one size, {compile_backend}), transformers, timed in "
            "interleaved rounds")


def pytest_benchmark_update_machine_info(config, machine_info):
    """What the results were measured on, for benchmarks/report.py's header."""
    import models
    from fastgpt.profiling import cpu_name

    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # not installed or broken: the suites still run eager
        triton_version = None
    try:
        import transformers
        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    machine_info["fastgpt"] = {
        "device": torch.cuda.get_device_name() if ON_GPU else f"cpu ({cpu_name()})",
        "cuda": torch.version.cuda if ON_GPU else None,
        "torch": torch.__version__, "triton": triton_version, "transformers": transformers_version,
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
        "mode": models.SETTINGS.mode, "compile_backend": models.SETTINGS.compile_backend,
        "model": models.MODEL_NAME, "dtype": models.DTYPE_NAME,
        "implementations": [models.LABELS[impl] for impl in models.IMPLEMENTATIONS],
        "note": None if ON_GPU else models.CPU_NOTE,
    }

"""Timing helpers shared by the benchmark suites: synchronised calls, and a kernel-level case timed."""

import pytest
import torch

import cases

ON_GPU = torch.cuda.is_available()


def synchronized(fn, device: torch.device):
    """Wrap fn so each timed call includes the GPU work it queued."""
    if device.type != "cuda":
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return out

    return run


# Timed rounds of a kernel-level case: a CPU run proves the harness (CI), so one or two rounds are enough.
KERNEL_ROUNDS = 20 if ON_GPU else 2


def time_case(benchmark, case, skip_if=None) -> None:
    """Time a ``cases.Case`` with pytest-benchmark: build it, one untimed call (compilation,
    autotuning, the allocator), timed rounds; record its rate (TFLOP/s or GB/s) and record.

    ``skip_if(error)``: whether a build or first-call error skips the case (a peer that does
    not take it, such as a forced SDPA backend) instead of failing it."""
    device = torch.device("cuda" if ON_GPU else "cpu")
    benchmark.group = cases.group(case)
    try:
        run = synchronized(case.build(), device)
        run()
    except RuntimeError as error:
        if skip_if is None or not skip_if(error):
            raise
        pytest.skip(f"{case.record['impl']} does not run this case: {str(error).splitlines()[0]}")
    benchmark.pedantic(run, rounds=KERNEL_ROUNDS, warmup_rounds=2 if ON_GPU else 0)
    benchmark.extra_info.update(case.record, device=str(device))
    benchmark.extra_info[case.unit] = round(case.rate(benchmark.stats.stats.median), 2)
    if case.unit == "GB/s":
        benchmark.extra_info["bytes"] = case.work

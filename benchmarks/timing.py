"""Timing helpers shared by the benchmark suites: synchronised calls and bandwidth figures."""

import torch

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


def record_bandwidth(benchmark, bytes_moved: int) -> None:
    """Store GB/s (bytes read + written once, over the median time) in the JSON report."""
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["bytes"] = bytes_moved
    benchmark.extra_info["GB/s"] = round(bytes_moved / median_s / 1e9, 2)

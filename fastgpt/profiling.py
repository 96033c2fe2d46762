"""Latency profiling of GPT-2 forward passes (first version: end-to-end timing).

``profile_forward`` builds a randomly initialised GPT-2, runs warm-up passes,
then times forward passes -- with CUDA events on a GPU, ``perf_counter`` on the
CPU -- and reports latency, tokens/s and which path (Triton or eager) each
dispatched op took.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import ops
from .config import gpt2_config
from .model import GPTModel
from .stats import parameter_count

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def default_seq_len(device: torch.device) -> int:
    # Full context on a GPU; a shorter one keeps a CPU run to seconds.
    return 1024 if device.type == "cuda" else 128


@dataclass
class ForwardProfile:
    size: str
    device: str
    dtype: str
    backend: str
    batch: int
    seq_len: int
    parameters: int
    parameters_tied: int
    latencies_ms: list[float]
    paths: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies_ms)

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.seq_len / (self.median_ms / 1000)

    def format(self) -> str:
        lat = self.latencies_ms
        paths = ", ".join(f"{op} {'+'.join(f'{p}×{n}' for p, n in sorted(by_path.items()))}"
                          for op, by_path in self.paths.items())
        return "\n".join([
            f"model      {self.size}, random weights, {self.parameters / 1e6:.1f}M parameters "
            f"({self.parameters_tied / 1e6:.1f}M with the output head tied)",
            f"device     {self.device}, {self.dtype}, backend {self.backend}",
            f"paths      {paths}",
            f"input      batch {self.batch} × seq_len {self.seq_len}, {len(lat)} timed forward passes",
            f"latency    median {self.median_ms:.2f} ms  (min {min(lat):.2f}, max {max(lat):.2f})",
            f"throughput {self.tokens_per_s:,.0f} tokens/s",
        ])


def _time_once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1000


def profile_forward(
    size: str = "gpt2-small",
    batch: int = 1,
    seq_len: Optional[int] = None,
    dtype: Optional[str] = None,
    backend: str = "auto",
    device: Optional[str] = None,
    warmup: int = 2,
    iters: int = 10,
    seed: int = 123,
    log=None,
) -> ForwardProfile:
    """Time ``iters`` inference forward passes of a random GPT-2 of the given size."""
    dev = torch.device(device) if device else default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    dtype = dtype or default_dtype(dev)
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    cfg = gpt2_config(size, drop_rate=0.0)
    seq_len = seq_len or default_seq_len(dev)
    if not 1 <= seq_len <= cfg["context_length"]:
        raise ValueError(f"seq_len must be in [1, {cfg['context_length']}] (the context length), got {seq_len}")
    if batch < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"need batch >= 1, iters >= 1, warmup >= 0; got {batch}, {iters}, {warmup}")

    log = log or (lambda message: None)
    log(f"building {size} on {dev} ({dtype}) ...")
    torch.manual_seed(seed)
    with torch.device(dev):
        model = GPTModel(cfg)
    model = model.to(_DTYPES[dtype]).eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, cfg["vocab_size"], (batch, seq_len), generator=generator).to(dev)

    with ops.use_backend(backend), torch.inference_mode():
        def forward():
            model(idx)

        for i in range(warmup):
            log(f"warm-up {i + 1}/{warmup}")
            _time_once(forward, dev)
        ops.reset_dispatch_counts()
        latencies = []
        for i in range(iters):
            latencies.append(_time_once(forward, dev))
            log(f"pass {i + 1}/{iters}: {latencies[-1]:.2f} ms")

    paths: dict[str, dict[str, int]] = {}
    for (op, path), count in sorted(ops.dispatch_counts.items()):
        paths.setdefault(op, {})[path] = count // iters
    return ForwardProfile(
        size=size, device=str(torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev),
        dtype=dtype, backend=backend, batch=batch, seq_len=seq_len,
        parameters=parameter_count(model),
        parameters_tied=parameter_count(model, exclude_output_head=True), latencies_ms=latencies, paths=paths,
    )

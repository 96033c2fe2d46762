"""Choosing a kernel's tile config by timing the candidates, without ever degrading silently.

``Tuner.choose`` returns, in this order of precedence:

1. a config forced by ``Tuner.use_config`` (tests that run every tuned config);
2. the pinned config under the interpreter or with ``FASTGPT_ATTENTION_PINNED=1``
   (the test suite: small tiles, so short sequences cross tile edges);
3. the cached choice for this key (from this process, or from the file named by
   ``FASTGPT_TUNE_CACHE``);
4. the heuristic default (the first candidate) while a CUDA graph is being
   captured or torch.compile is tracing: timing synchronises the device, which
   would break a capture. That choice is not cached, so the next eager call tunes;
5. otherwise the fastest candidate by ``triton.testing.do_bench`` median. A
   candidate that fails is skipped with a warning naming it and its error; if
   every candidate fails, the last error is raised.

The key holds the kernel, head size, dtype, the sequence length rounded up to a
power of two, and how full the grid is: programs of a 128-row tile over the
device's SM count, in powers of two (¼ wave up to 8 waves). So one batch size
no longer decides the tile for all others.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from .runtime import interpreter_on, sm_count

TUNE_CACHE_ENV = "FASTGPT_TUNE_CACHE"
PINNED_ENV = "FASTGPT_ATTENTION_PINNED"
_CACHE_FORMAT = "fastgpt-tune-cache-1"


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch parameters of one kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __repr__(self):
        return f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} warps={self.num_warps} stages={self.num_stages}"

    def shared_bytes(self, head_dim, itemsize):
        # Pipelined K and V tiles plus the resident query tile: a conservative estimate for pruning.
        return (self.num_stages * 2 * self.block_n + self.block_m) * head_dim * itemsize


@dataclass
class TuneRecord:
    """One tuning run: what was timed, what won, how long it took (read by benchmarks/gpu_check.py)."""

    key: str
    chosen: str
    seconds: float
    timings_ms: dict = field(default_factory=dict)   # repr(config) -> median ms
    failures: dict = field(default_factory=dict)     # repr(config) -> error


def fill_bucket(programs: int, sms: int) -> int:
    """log2 of programs per SM, rounded and clamped to [-2, 3]: ¼ wave .. 8 waves."""
    return max(-2, min(3, round(math.log2(max(programs, 1) / max(sms, 1)))))


def _capturing_or_tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _device_name_and_sms(device: torch.device) -> tuple[str, int]:
    name = torch.cuda.get_device_properties(device).name if device.type == "cuda" else device.type
    return name, sm_count(device, elsewhere=1)


def _is_sticky_cuda_error(error: Exception) -> bool:
    text = str(error)
    return "illegal memory access" in text or "misaligned address" in text or "unspecified launch failure" in text


def _bench(fn) -> float:
    """Median milliseconds of fn() on the current stream (tests replace this)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


class Tuner:
    """The tuned configs of one family of kernels, keyed by ``key_for``."""

    def __init__(self):
        self.table: dict = {}            # key string -> Config
        self.records: list = []          # TuneRecord per tuning run, in order
        self._forced: dict = {}
        self._loaded_from = None
        self._unusable = None            # a FASTGPT_TUNE_CACHE file found corrupt: warned once, never written

    @staticmethod
    def key_for(kind: str, head_dim: int, dtype: torch.dtype, t: int, programs: int, device: torch.device) -> str:
        name, sms = _device_name_and_sms(device)
        t_bucket = 1 << max(0, (t - 1).bit_length())
        return (f"{kind}|d={head_dim}|{str(dtype).removeprefix('torch.')}|T={t_bucket}"
                f"|fill=2^{fill_bucket(programs, sms)}|{name}")

    @contextmanager
    def use_config(self, kind: str, config: Config):
        """Run kernel ``kind`` with one given config (tests of every tuned config)."""
        self._forced[kind] = config
        try:
            yield
        finally:
            del self._forced[kind]

    def choose(self, kind: str, key: str, candidates: list, launch, pinned: Config) -> Config:
        """The config for kernel ``kind`` (see the module docstring); ``pinned`` is this case's test tile."""
        if kind in self._forced:
            return self._forced[kind]
        if interpreter_on() or os.environ.get(PINNED_ENV) == "1":
            return pinned
        self._load_file_once()
        cached = self.table.get(key)
        if cached is not None and cached in candidates:
            return cached
        if _capturing_or_tracing():
            return self._fallback(key, candidates)
        return self._tune(key, candidates, launch)

    def _fallback(self, key: str, candidates: list) -> Config:
        """Without timing: a config already tuned for this kernel, head size and dtype at another
        sequence length or grid (compiled already, so nothing compiles inside a capture), else the first."""
        family = key.split("|T=")[0]
        for other, config in self.table.items():
            if other.startswith(family + "|T=") and config in candidates:
                return config
        return candidates[0]

    def _tune(self, key, candidates, launch) -> Config:
        started = time.perf_counter()
        record = TuneRecord(key=key, chosen="", seconds=0.0)
        last_error = None
        for config in candidates:
            try:
                record.timings_ms[repr(config)] = _bench(lambda: launch(config))
            except Exception as error:  # e.g. out of resources on this device
                if _is_sticky_cuda_error(error):
                    raise  # the context is broken: later "failures" would only hide this one
                last_error = error
                record.failures[repr(config)] = f"{type(error).__name__}: {error}"
                warnings.warn(f"fastgpt: tuning {key}: config {config!r} failed and is skipped "
                              f"({type(error).__name__}: {error})", RuntimeWarning, stacklevel=3)
        if not record.timings_ms:
            raise RuntimeError(f"fastgpt: tuning {key}: every candidate config failed") from last_error
        best = min(candidates, key=lambda c: record.timings_ms.get(repr(c), math.inf))
        record.chosen, record.seconds = repr(best), time.perf_counter() - started
        self.records.append(record)
        self.table[key] = best
        self._save_file()
        return best

    # ------------------------------------------------------------ FASTGPT_TUNE_CACHE

    def _load_file_once(self) -> None:
        path = os.environ.get(TUNE_CACHE_ENV)
        if not path or self._loaded_from == path:
            return
        self._loaded_from = path
        if not os.path.exists(path) or path == self._unusable:
            return
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("format") != _CACHE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {_CACHE_FORMAT!r}")
            entries = {key: Config(**value) for key, value in data["configs"].items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            # Never a crash: warn once for this file, ignore it, and leave it as it is (not overwritten).
            self._unusable = path
            warnings.warn(f"fastgpt: {TUNE_CACHE_ENV}={path}: not a fastgpt tune cache ({error}); it is ignored: "
                          "delete the file or point the variable elsewhere", RuntimeWarning, stacklevel=3)
            return
        for key, config in entries.items():
            self.table.setdefault(key, config)

    def _save_file(self) -> None:
        path = os.environ.get(TUNE_CACHE_ENV)
        if not path or path == self._unusable:
            return
        # Another process may have saved choices since this one read the file: keep them.
        self._loaded_from = None
        self._load_file_once()
        data = {"format": _CACHE_FORMAT, "configs": {key: asdict(c) for key, c in sorted(self.table.items())}}
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        # Write then rename: a crash mid-write never leaves a half file behind.
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(f.name, path)

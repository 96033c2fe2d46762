"""Latency profiling of GPT-2: what ``fastgpt profile`` runs.

``profile(...)`` builds a randomly initialised GPT-2 of a preset size on the
device, then measures one *mode*:

* ``forward``: inference forward passes over (batch, seq_len) random token ids;
* ``train-step``: forward, cross-entropy on the next tokens, backward and an
  AdamW step, with dropout at the preset's rate;
* ``generate``: greedy generation of ``new_tokens`` after a ``seq_len``-token
  prompt with fastgpt's KV cache (prefill, time to first token, decode rate).

It runs warm-up steps, times ``iters`` steps (CUDA events on a GPU,
``perf_counter`` otherwise) while tracking peak memory, then runs up to three
more steps under ``torch.profiler`` for the per-op table (``op_table.py``) and,
if asked, a Chrome/Perfetto trace. Profiled steps are never the timed ones: the
profiler's overhead stays out of the latency. ``compare(...)`` measures eager
and Triton on the same weights and inputs in one process.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import ops, trust
from ..config import gpt2_config, validate_config
from ..generation import generate_stream
from ..kv_cache import KVCache
from ..model import GPTModel
from . import flops
from .op_table import OpTable, build_op_table
from .stats import parameter_count

MODES = ("forward", "train-step", "generate")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROFILED_PASSES = 3
LEARNING_RATE = 1e-4


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(name) -> torch.device:
    """The device ``name`` names (None: ``default_device()``), or a ValueError saying why it cannot run a model."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "meta":
        raise ValueError("device 'meta' holds shapes but no data, so it cannot run a model; use cpu, cuda or mps")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"fastgpt runs on cpu, cuda or mps, not {device.type!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but torch.backends.mps.is_available() is False")
    return device


def check_writable(path, what: str) -> None:
    """Raise ValueError unless a file can be written at ``path``: checked before the work, not after it."""
    if os.path.isdir(path):
        raise ValueError(f"cannot write the {what} to {path}: it is a folder; give a file name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ValueError(f"cannot write the {what} to {path}: its folder does not exist")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise ValueError(f"cannot write the {what} to {path}: {err.strerror or err}") from None
    if not existed:
        os.unlink(path)


def default_dtype(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def default_seq_len(device: torch.device, mode: str = "forward") -> int:
    # Full context on a GPU (a prompt that leaves room for new tokens when generating);
    # a shorter one keeps a CPU run to seconds.
    if device.type == "cuda":
        return 512 if mode == "generate" else 1024
    return 128


def default_iters(mode: str) -> int:
    return {"forward": 10, "train-step": 5, "generate": 3}[mode]


def default_new_tokens(device: torch.device) -> int:
    return 128 if device.type == "cuda" else 32


# ---------------------------------------------------------------- results

@dataclass
class Memory:
    peak_bytes: Optional[int]
    before_bytes: Optional[int]
    method: str


@dataclass
class GenerationTimes:
    """Per timed generate call (and per timed prefill)."""

    prefill_ms: list[float]
    first_token_ms: list[float]
    decode_tokens_per_s: list[float]   # empty when only one new token is generated


@dataclass
class ProfileResult:
    mode: str
    size: str
    device: str
    device_name: str
    dtype: str
    backend: str
    batch: int
    seq_len: int
    new_tokens: Optional[int]
    warmup: int
    parameters: int
    parameters_tied: int
    non_embedding_parameters: int
    latencies_ms: list[float]
    paths: dict[str, dict[str, float]]
    memory: Memory
    ops: Optional[OpTable]
    cpu_threads: int = 1
    flops_per_token: Optional[float] = None
    peak_tflops: Optional[float] = None
    peak_source: Optional[str] = None
    generation: Optional[GenerationTimes] = None
    trace: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    verdicts: dict[str, str] = field(default_factory=dict)   # op -> measured auto's verdict behind its path

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies_ms)

    @property
    def tokens_per_s(self) -> Optional[float]:
        """Tokens processed per second: per forward or train step, or decoded tokens when generating."""
        if self.mode == "generate":
            rates = self.generation.decode_tokens_per_s
            return statistics.median(rates) if rates else None
        return self.batch * self.seq_len / (self.median_ms / 1000)

    @property
    def achieved_tflops(self) -> Optional[float]:
        if self.flops_per_token is None:
            return None
        return self.tokens_per_s * self.flops_per_token / 1e12

    @property
    def mfu(self) -> Optional[float]:
        if self.flops_per_token is None:
            return None
        return flops.mfu(self.tokens_per_s, self.flops_per_token, self.peak_tflops)

    def to_dict(self) -> dict:
        gen = self.generation
        return {
            "mode": self.mode, "backend": self.backend, "size": self.size,
            "device": self.device, "device_name": self.device_name, "cpu_threads": self.cpu_threads,
            "dtype": self.dtype,
            "batch": self.batch, "seq_len": self.seq_len, "new_tokens": self.new_tokens,
            "warmup": self.warmup, "iters": len(self.latencies_ms),
            "parameters": self.parameters, "parameters_tied": self.parameters_tied,
            "non_embedding_parameters": self.non_embedding_parameters,
            "paths_per_pass": self.paths,
            "verdicts": self.verdicts,
            "latency_ms": {"median": self.median_ms, "min": min(self.latencies_ms),
                           "max": max(self.latencies_ms), "all": self.latencies_ms},
            "tokens_per_s": self.tokens_per_s,
            "flops_per_token": self.flops_per_token, "achieved_tflops": self.achieved_tflops,
            "peak_tflops": self.peak_tflops, "peak_source": self.peak_source, "mfu": self.mfu,
            "memory": {"peak_bytes": self.memory.peak_bytes, "before_bytes": self.memory.before_bytes,
                       "method": self.memory.method},
            "generation": None if gen is None else {
                "prefill_ms_median": statistics.median(gen.prefill_ms),
                "first_token_ms_median": statistics.median(gen.first_token_ms),
                "decode_tokens_per_s_median": statistics.median(gen.decode_tokens_per_s)
                if gen.decode_tokens_per_s else None,
                "prefill_ms": gen.prefill_ms, "first_token_ms": gen.first_token_ms,
                "decode_tokens_per_s": gen.decode_tokens_per_s,
            },
            "ops": self.ops.to_dict() if self.ops else None,
            "trace": self.trace, "notes": self.notes,
        }

    def format(self) -> str:
        from .report_text import format_result

        return format_result(self)


@dataclass
class Comparison:
    """Eager and Triton runs of one workload; speed-ups are eager time / Triton time."""

    eager: ProfileResult
    triton: ProfileResult

    def speedup(self, eager_value: Optional[float], triton_value: Optional[float]) -> Optional[float]:
        if not eager_value or not triton_value:
            return None
        return eager_value / triton_value

    def to_dict(self) -> dict:
        groups = {}
        for group in self.eager.ops.groups if self.eager.ops else []:
            other = self.triton.ops.group(group.name) if self.triton.ops else None
            groups[group.name] = self.speedup(group.ms, other.ms if other else None)
        return {"latency": self.speedup(self.eager.median_ms, self.triton.median_ms), "op_groups": groups}

    def format(self) -> str:
        from .report_text import format_comparison

        return format_comparison(self)


# ---------------------------------------------------------------- measuring

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    _synchronize(device)
    return (time.perf_counter() - begin) * 1000


def _proc_status_bytes(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _PeakMemory:
    """Peak memory over a window: CUDA's allocator peak, or the process's peak RSS on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated, weights included"
            return
        # Linux lets a process reset its RSS high-water mark (VmHWM) to the current RSS.
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self.before = _proc_status_bytes("VmRSS")
            self.method = "process RSS high-water mark over the timed steps, Linux VmHWM"
        except OSError:
            self.before = None
            self.method = "process RSS high-water mark since it started, ru_maxrss"

    def stop(self) -> Memory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return Memory(torch.cuda.max_memory_allocated(self.device), self.before, self.method)
        if self.before is not None:
            return Memory(_proc_status_bytes("VmHWM"), self.before, self.method)
        try:
            import resource
        except ImportError:  # Windows
            return Memory(None, None, "not measured on this platform")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return Memory(peak if sys.platform == "darwin" else peak * 1024, None, self.method)


@contextlib.contextmanager
def _stderr_silenced():
    """Hide what the profiler's C++ side prints to fd 2 when it starts and stops (not our progress)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


# ---------------------------------------------------------------- the workloads

class _Workload:
    """One mode's step on one model and input: what each timed or profiled pass runs."""

    def __init__(self, mode: str, model: GPTModel, idx: torch.Tensor, new_tokens: Optional[int],
                 device: torch.device):
        self.mode, self.model, self.idx, self.new_tokens, self.device = mode, model, idx, new_tokens, device
        if mode == "train-step":
            model.train()
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
            # The next token as the target, as in language-model training.
            self.targets = torch.roll(idx, -1, dims=1)
        else:
            model.eval()

    def step(self) -> Optional[tuple[float, float]]:
        """One pass. Generation returns (ms to the first token, ms for the whole call)."""
        if self.mode == "forward":
            with torch.inference_mode():
                self.model(self.idx)
        elif self.mode == "train-step":
            logits = self.model(self.idx)
            loss = F.cross_entropy(logits.flatten(0, 1), self.targets.flatten())
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            return self._generate()
        return None

    def _generate(self) -> tuple[float, float]:
        begin = time.perf_counter()
        stream = generate_stream(self.model, self.idx, self.new_tokens, self.model.cfg["context_length"])
        next(stream)
        _synchronize(self.device)
        first = time.perf_counter()
        for _ in stream:
            pass
        _synchronize(self.device)
        end = time.perf_counter()
        return (first - begin) * 1000, (end - begin) * 1000

    def prefill(self) -> None:
        """The prompt into an empty KV cache, last position's logits only: generation's first forward."""
        with torch.inference_mode():
            cache = KVCache.for_model(self.model, self.idx.shape[0], max_len=self.idx.shape[1])
            self.model(self.idx, kv_cache=cache, last_logits_only=True)


def _check_options(mode, cfg, batch, seq_len, new_tokens, dtype, warmup, iters, seed, peak_tflops, trace):
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {seed!r}")
    context = cfg["context_length"]
    if not 1 <= seq_len <= context:
        raise ValueError(f"seq_len must be in [1, {context}] (the context length), got {seq_len}")
    if batch < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"need batch >= 1, iters >= 1, warmup >= 0; got {batch}, {iters}, {warmup}")
    if mode == "generate":
        if new_tokens < 1:
            raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
        if seq_len + new_tokens - 1 > context:
            raise ValueError(f"a {seq_len}-token prompt and {new_tokens} new tokens need {seq_len + new_tokens - 1} "
                             f"cache positions, more than the context length {context}; "
                             f"shorten the prompt (seq_len) or generate fewer tokens")
    elif new_tokens is not None:
        raise ValueError(f"new_tokens applies to mode 'generate' only, not {mode!r}")
    if peak_tflops is not None and not peak_tflops > 0:
        raise ValueError(f"peak_tflops must be > 0, got {peak_tflops}")
    if trace is not None:
        check_writable(trace, "trace")


def profile(size: str = "gpt2-small", batch: int = 1, seq_len: Optional[int] = None, dtype: Optional[str] = None,
            backend: Optional[str] = None, device: Optional[str] = None, mode: str = "forward",
            new_tokens: Optional[int] = None, warmup: int = 2, iters: Optional[int] = None, seed: int = 123,
            peak_tflops: Optional[float] = None, trace: Optional[str] = None, log=None,
            profile_ops: bool = True, config: Optional[dict] = None) -> ProfileResult:
    """Measure one mode of a random GPT-2 of the given size; see the module docstring.

    ``backend``: ``auto``, ``triton`` or ``eager`` for this run; None keeps the
    choice in force (``set_backend``, ``FASTGPT_BACKEND``). ``config``: a
    GPTModel config dict to use instead of the preset ``size`` (its
    ``drop_rate`` applies to train steps). The caller's torch random state and
    ``ops.dispatch_counts`` are left as they were.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    dev = resolve_device(device)
    dtype = dtype or default_dtype(dev)
    if config is not None:
        validate_config(config)
        size = "custom"
    preset = dict(config) if config is not None else gpt2_config(size)
    if seq_len is None:
        seq_len = min(default_seq_len(dev, mode), preset["context_length"])
    iters = default_iters(mode) if iters is None else iters
    if mode == "generate" and new_tokens is None:
        new_tokens = min(default_new_tokens(dev), preset["context_length"] - seq_len + 1)
    _check_options(mode, preset, batch, seq_len, new_tokens, dtype, warmup, iters, seed, peak_tflops, trace)
    if backend is not None:
        ops._check_backend(backend)
    log = log or (lambda message: None)

    cfg = {**preset, "drop_rate": preset["drop_rate"] if mode == "train-step" else 0.0}
    noun = {"forward": "pass", "train-step": "step", "generate": "generate call"}[mode]
    with _caller_state_kept(), (ops.use_backend(backend) if backend else contextlib.nullcontext()):
        backend = ops.backend_spec()
        problem = ops.forced_triton_problem(dev)
        if problem:  # refused before minutes of building and warming up, not at the first op
            raise ops.BackendError(problem)
        log(f"building {size} on {dev} ({dtype}) ...")
        torch.manual_seed(seed)
        with torch.device(dev):
            model = GPTModel(cfg)
        model = model.to(DTYPES[dtype])
        generator = torch.Generator(device="cpu").manual_seed(seed)
        idx = torch.randint(0, cfg["vocab_size"], (batch, seq_len), generator=generator).to(dev)
        work = _Workload(mode, model, idx, new_tokens, dev)
        memory = _PeakMemory(dev)

        for i in range(warmup):
            log(f"warm-up {i + 1}/{warmup}")
            work.step()
        _synchronize(dev)
        memory.start()
        ops.reset_dispatch_counts()
        trust.forget_used()
        latencies, first_token, decode_rates, prefill_ms = [], [], [], []
        for i in range(iters):
            if mode == "generate":
                ttft, total = work.step()
                latencies.append(total)
                first_token.append(ttft)
                if new_tokens > 1:
                    decode_rates.append(batch * (new_tokens - 1) / ((total - ttft) / 1000))
                log(f"{noun} {i + 1}/{iters}: first token {ttft:.2f} ms, {new_tokens} tokens in {total:.2f} ms")
                # Prefill timed right after each call, so both see the same machine load;
                # its dispatches are not a generate call's.
                calls = Counter(ops.dispatch_counts)
                prefill_ms.append(_time_ms(work.prefill, dev))
                ops.dispatch_counts.clear()
                ops.dispatch_counts.update(calls)
                log(f"prefill {i + 1}/{iters}: {prefill_ms[-1]:.2f} ms")
            else:
                latencies.append(_time_ms(work.step, dev))
                log(f"{noun} {i + 1}/{iters}: {latencies[-1]:.2f} ms")
        paths = {op: {path: count / iters for path, count in sorted(by_path.items())}
                 for op, by_path in _paths_by_op(ops.dispatch_counts).items()}
        verdicts = {op: trust.describe(op) for op in paths if trust.describe(op)}
        peak = memory.stop()
        table = None
        if profile_ops or trace:
            table = _profile_ops(work, dev, min(iters, PROFILED_PASSES), mode, trace, log)

    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    result = ProfileResult(
        mode=mode, size=size, device=str(dev), device_name=device_name, dtype=dtype, backend=backend,
        batch=batch, seq_len=seq_len, new_tokens=new_tokens if mode == "generate" else None, warmup=warmup,
        parameters=parameter_count(model), parameters_tied=parameter_count(model, exclude_output_head=True),
        non_embedding_parameters=flops.non_embedding_parameters(cfg), latencies_ms=latencies, paths=paths,
        verdicts=verdicts,
        memory=peak, ops=table, trace=trace, cpu_threads=torch.get_num_threads(),
        generation=GenerationTimes(prefill_ms, first_token, decode_rates) if mode == "generate" else None,
    )
    if mode != "generate":
        result.flops_per_token = flops.flops_per_token(cfg, seq_len, training=mode == "train-step")
        if peak_tflops is not None:
            result.peak_tflops, result.peak_source = peak_tflops, "given"
        elif dev.type == "cuda":
            result.peak_tflops = flops.peak_tflops(device_name, DTYPES[dtype])
            result.peak_source = "NVIDIA data sheet, dense" if result.peak_tflops else None
    if dev.type != "cuda" and any("triton" in by_path for by_path in paths.values()):
        result.notes.append("Triton ran in its CPU interpreter (TRITON_INTERPRET=1): these times check the "
                            "path, they are not a speed")
    if mode == "train-step" and cfg["drop_rate"] > 0:
        result.notes.append(f"train steps use the preset's dropout ({cfg['drop_rate']}) and AdamW (lr {LEARNING_RATE})")
    return result


@contextlib.contextmanager
def _caller_state_kept():
    """Put back the caller's torch random state (CPU and CUDA) and dispatch counts when the profile ends."""
    saved = Counter(ops.dispatch_counts)
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            yield
    finally:
        ops.dispatch_counts.clear()
        ops.dispatch_counts.update(saved)


def _paths_by_op(counts) -> dict[str, dict[str, int]]:
    by_op: dict[str, dict[str, int]] = {}
    for (op, path), count in sorted(counts.items()):
        by_op.setdefault(op, {})[path] = count
    return by_op


def _profile_ops(work: _Workload, device: torch.device, passes: int, mode: str, trace: Optional[str],
                 log) -> OpTable:
    from torch.profiler import ProfilerActivity, record_function

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    log(f"profiling {passes} more {'pass' if passes == 1 else 'passes'} with torch.profiler ...")
    # Shapes make a trace readable but add overhead: record them only for a trace.
    prof = torch.profiler.profile(activities=activities, record_shapes=trace is not None)
    with _stderr_silenced():
        prof.start()
    try:
        for _ in range(passes):
            with record_function(f"fastgpt.{mode}"):
                work.step()
        _synchronize(device)
    finally:
        with _stderr_silenced():
            prof.stop()
    if trace:
        log(f"writing the trace to {trace}")
        prof.export_chrome_trace(trace)
        if not os.path.isfile(trace):  # torch.profiler does not say when it fails
            raise RuntimeError(f"torch.profiler did not write the trace to {trace}")
    return build_op_table(prof.events(), passes, device_time=device.type == "cuda")


def triton_side(device: torch.device) -> str:
    """The backend ``compare`` runs against eager on this device, or raise if Triton cannot run here."""
    if device.type == "cuda":
        return "auto"  # Triton wherever a kernel supports the case, eager elsewhere: fastgpt's default
    if ops.interpreter_on():
        return "triton"  # forced: auto never picks Triton for CPU tensors
    raise ValueError(f"--compare needs Triton kernels that run on {device.type}: they run on CUDA GPUs, or on a "
                     f"CPU only in Triton's interpreter (set TRITON_INTERPRET=1; correct but about 1000x slower, "
                     f"so it checks paths, not speed)")


def compare(log=None, **options) -> Comparison:
    """``profile`` with the eager backend, then with Triton (``triton_side``), on the same weights and inputs."""
    if options.pop("backend", None) not in (None, "auto"):
        raise ValueError("compare runs the eager and Triton backends itself; do not pass a backend")
    log = log or (lambda message: None)
    device = resolve_device(options.get("device"))
    other = triton_side(device)
    trace = options.pop("trace", None)
    results = []
    for backend in ("eager", other):
        name = "eager" if backend == "eager" else "triton"
        side_trace = None
        if trace:
            path = Path(trace)
            side_trace = str(path.with_name(f"{path.stem}-{name}{path.suffix}"))
        results.append(profile(backend=backend, trace=side_trace, log=lambda m, n=name: log(f"[{n}] {m}"),
                               **options))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the second run's memory figures start from the same place
    comparison = Comparison(*results)
    if not any("triton" in by_path for by_path in comparison.triton.paths.values()):
        comparison.triton.notes.append("no op took the Triton path here"
                                       + (f" ({ops.triton_status()})" if ops.triton_status() else ""))
    return comparison

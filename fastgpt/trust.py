"""Measured ``auto``: a Triton kernel earns its place on this GPU before ``auto`` trusts it.

The first time ``auto`` meets a key -- op, shape bucket, dtype, device (name,
compute capability, CUDA and driver versions), Triton and fastgpt versions,
whether gradients are needed, dropout on or off -- ``choose`` runs the Triton
form and the eager form on clones of the call's own inputs (forward, and
backward with a random upstream gradient when gradients are needed), checks
them against a float64 reference within docs/design.md's tolerances, times
both, and records a verdict (``Verdict``): Triton only when it is right and
faster by ``MARGIN`` beyond the timings' spread. The verdict persists in the
per-user file of ``fastgpt.verdicts``.

* Never while torch.compile traces or a CUDA graph captures: the recorded
  verdict is used, and a key without one takes the default (Triton) with one warning.
* A check leaves the caller's inputs, torch's CPU and CUDA generators and
  ``ops.dispatch_counts`` as it found them.
* Under torch.distributed rank 0 decides and broadcasts the verdict; every rank
  takes part in the broadcast at its first meeting of a key in this process
  (the ranks' call sequences are identical).
* The check's extra memory is bounded by ``MEMORY_SHARE`` of the free device
  memory; a larger call is recorded "unmeasured" and keeps the default.
* An exception in the kernel during the check is an eager verdict with its reason.

``FASTGPT_TRUST`` (read at import) or ``set_policy`` chooses the policy: ``check``
(default), ``always-check`` (every call, for debugging) or ``trust`` (no check:
Triton wherever it supports the case, as before measured auto).

Test seams: ``ops._measure_on_cpu`` (or ``FASTGPT_MEASURE_ON_CPU=1``) lets
``auto`` measure interpreter CPU tensors; ``ops._triton_kernel`` injects a
kernel; ``clock`` (a function ``(which, fn, reps, device) -> [ms, ...]``)
replaces the timer.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

import torch

TRUST_ENV = "FASTGPT_TRUST"
POLICIES = ("check", "always-check", "trust")
MARGIN = 0.05          # Triton must be this much faster, beyond the timing spread
MEMORY_SHARE = 0.25    # of the free device memory, at most, for the check's clones
REPS = {"cuda": 5, "cpu": 2}
# Where each op's dropout probability sits among its positional arguments (x first).
DROPOUT_ARG = {"dropout_add_layer_norm": 5, "causal_attention": 3, "cached_attention": 3}
# docs/design.md's tolerances against a float64 reference: (forward, gradients).
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 2e-2), torch.bfloat16: (1e-2, 2e-2),
              torch.float64: (1e-5, 1e-4)}
TF32_TOLERANCES = (3e-3, 5e-3)
# Ops whose call does not hold what their check needs: `fastgpt check` records their verdicts.
UNCHECKED_IN_CALL = {"linear_cross_entropy": "its check needs the logits; `fastgpt check` measures it"}


def policy_from_environment() -> str:
    value = os.environ.get(TRUST_ENV, "").strip().lower() or "check"
    if value not in POLICIES:
        raise ValueError(f"environment variable {TRUST_ENV}={value!r}: choose one of {', '.join(POLICIES)}")
    return value


_policy = policy_from_environment()   # read at import, as FASTGPT_BACKEND is


def policy() -> str:
    return _policy


def set_policy(name: str) -> None:
    """``check`` (first meeting of a key), ``always-check`` (every call) or ``trust`` (no check)."""
    global _policy
    if name not in POLICIES:
        raise ValueError(f"unknown trust policy {name!r}; choose one of {', '.join(POLICIES)}")
    _policy = name


@dataclass
class Verdict:
    """What ``auto`` takes for one key, and why."""

    key: str
    op: str
    shape: str                       # the bucket: "rows=64 width=1024"
    dtype: str
    device: str
    path: str                        # "triton" or "eager": what auto runs
    status: str                      # faster, slower, disagree, error, unmeasured, default
    reason: str = ""
    triton_ms: Optional[float] = None
    eager_ms: Optional[float] = None
    triton_err: Optional[float] = None   # max relative error against float64, forward and gradients
    eager_err: Optional[float] = None
    grad: bool = False
    dropout: bool = False
    checked_at: float = 0.0

    @property
    def speedup(self) -> Optional[float]:
        if self.triton_ms and self.eager_ms:
            return self.eager_ms / self.triton_ms
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Verdict":
        names = {f.name for f in fields(cls)}
        verdict = cls(**{k: v for k, v in data.items() if k in names})
        if verdict.path not in ("triton", "eager") or not isinstance(verdict.key, str):
            raise ValueError(f"not a verdict: path {verdict.path!r}")
        return verdict

    def describe(self) -> str:
        """``1.9× eager, checked``; ``kept on eager: Triton 0.8×, checked``; ``eager: disagreed``."""
        speed = self.speedup
        if self.status == "faster":
            return f"{speed:.1f}× eager, checked"
        if self.status == "slower":
            return f"kept on eager: Triton {speed:.2f}×, checked" if speed else "kept on eager, checked"
        if self.status == "disagree":
            return "eager: Triton disagreed, checked"
        if self.status == "error":
            return "eager: Triton failed its check"
        if self.status == "unmeasured":
            return f"unchecked: {self.reason}"
        return "unchecked"


# ---------------------------------------------------------------- keys

def _p2(n) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def bucket(op: str, args: tuple) -> tuple:
    """The shape bucket of one call: powers of two of what sets a kernel's speed."""
    x = args[0]
    shape = x.shape
    if op == "causal_attention" or op == "cached_attention":
        b, h, tq, d = shape
        if op == "causal_attention":
            return ("BH", _p2(b * h)), ("T", _p2(tq)), ("d", int(d))
        return ("BH", _p2(b * h)), ("Tq", _p2(tq)), ("cache", _p2(args[1].shape[2])), ("d", int(d))
    width = int(shape[-1]) if shape else 1
    rows = x.numel() // (width or 1)
    # _p2, inlined: this runs at every auto call on CUDA.
    rows_bucket, width_bucket = 1 << max(0, (rows - 1).bit_length()), 1 << max(0, (width - 1).bit_length())
    if op == "linear_gelu":
        return ("rows", rows_bucket), ("K", width_bucket), ("N", _p2(args[1].shape[0]))
    return ("rows", rows_bucket), ("width", width_bucket)


def _dropout_p(op: str, args: tuple) -> float:
    i = DROPOUT_ARG.get(op)
    return float(args[i]) if i is not None and len(args) > i else 0.0


def short_key(op: str, args: tuple) -> tuple:
    """The key as this process sees it (cheap; the device fingerprint comes from the device):
    (op, shape bucket, dtype, device, gradients needed, dropout on)."""
    x = args[0]
    if op == "linear_cross_entropy":  # (hidden, compute dtype); the loss step makes its own gradient
        return (op, bucket(op, args), args[1], x.device, False, False)
    grad = False
    if torch.is_grad_enabled():
        for a in args:
            if isinstance(a, torch.Tensor) and a.requires_grad:
                grad = True
                break
    i = DROPOUT_ARG.get(op)
    dropout = i is not None and len(args) > i and args[i] > 0
    return (op, bucket(op, args), x.dtype, x.device, grad, dropout)


_fingerprints: dict = {}


def device_fingerprint(device: torch.device) -> str:
    """Device name, compute capability, CUDA runtime and driver: what a verdict holds for."""
    if device not in _fingerprints:
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            try:
                driver = str(torch._C._cuda_getDriverVersion())
            except Exception:
                driver = "?"
            _fingerprints[device] = (f"{props.name}|sm_{props.major}{props.minor}|cuda {torch.version.cuda}"
                                     f"|driver {driver}")
        else:
            _fingerprints[device] = f"{device.type} (Triton interpreter)"
    return _fingerprints[device]


def _versions() -> str:
    from fastgpt import __version__
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    return f"triton {triton_version}|fastgpt {__version__}"


def full_key(short: tuple) -> str:
    op, parts, dtype, device, grad, dropout = short
    return "|".join([op, _shape_text(parts), str(dtype).removeprefix("torch."), "train" if grad else "infer",
                     "dropout" if dropout else "no-dropout", device_fingerprint(device), _versions()])


def _shape_text(parts: tuple) -> str:
    return " ".join(f"{name}={value}" for name, value in parts)


# ---------------------------------------------------------------- state

_session: dict = {}        # short key -> Verdict, decided or read in this process
_used: dict = {}           # op -> the Verdict behind its latest auto call (for fastgpt profile)
_warned: set = set()
_lock = threading.RLock()
measured: Counter = Counter()   # op -> checks run in this process (tests read it)

clock: Optional[Callable] = None   # tests: (which, fn, reps, device) -> list of ms


def reset() -> None:
    """Forget this process's verdicts (not the file's), warnings and counts: tests."""
    with _lock:
        _session.clear()
        _used.clear()
        _warned.clear()
        measured.clear()


def forget_used() -> None:
    _used.clear()


def describe(op: str) -> Optional[str]:
    verdict = _used.get(op)
    return None if verdict is None else verdict.describe()


def _warn_once(tag, message: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(message, RuntimeWarning, stacklevel=5)


def _capturing_or_tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@torch.compiler.assume_constant_result
def _recorded_path(op, parts, dtype, device, grad, dropout) -> str:
    # Read once per trace by torch.compile: the graph keeps the verdict it was traced with.
    return _recorded_or_default((op, parts, dtype, device, grad, dropout))


def _recorded_or_default(short: tuple) -> str:
    verdict = _session.get(short)
    if verdict is None:
        verdict = _from_file(full_key(short))
        if verdict is not None:
            _session[short] = verdict
    if verdict is not None:
        return verdict.path
    _warn_once(("unchecked", short),
               f"fastgpt: {short[0]} {_shape_text(short[1])} {str(short[2]).removeprefix('torch.')} on "
               f"{short[3]} has no recorded verdict and a CUDA graph is being captured or torch.compile is "
               "tracing, where nothing is measured: it runs the Triton kernel unchecked. Run the model once "
               "before compiling or capturing (or `fastgpt check`) to check it first")
    return "triton"


def _from_file(key: str) -> Optional[Verdict]:
    from . import verdicts
    entry = verdicts.store().get(key)
    if entry is None:
        return None
    try:
        return Verdict.from_dict(entry)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- the decision

def choose(op: str, run: Callable, args: tuple) -> str:
    """``"triton"`` or ``"eager"`` for one auto call whose kernel supports the case."""
    mode = _policy
    if mode == "trust":
        return "triton"
    short = short_key(op, args)
    if torch.compiler.is_compiling():
        return _recorded_path(*short)
    verdict = _session.get(short)
    if verdict is not None and mode == "check":
        _used[op] = verdict
        return verdict.path
    if _capturing_or_tracing():
        path = _recorded_or_default(short)
        return path
    with _lock:
        verdict = _session.get(short) if mode == "check" else None  # another thread may have decided meanwhile
        if verdict is None:
            verdict = _decide(op, run, args, short, always=mode == "always-check")
        _session[short] = verdict
        _used[op] = verdict
    return verdict.path


def _decide(op, run, args, short, always: bool) -> Verdict:
    key = full_key(short)
    dist = _distributed()
    rank = dist.get_rank() if dist is not None else 0
    verdict = None
    if rank == 0:
        verdict = None if always else _from_file(key)
        if verdict is None and op in UNCHECKED_IN_CALL:
            verdict = Verdict(key=key, op=op, shape=_shape_text(short[1]), dtype=str(short[2]).removeprefix("torch."),
                              device=device_fingerprint(short[3]).split("|")[0], path="triton", status="unmeasured",
                              reason=UNCHECKED_IN_CALL[op], grad=short[4], dropout=short[5], checked_at=time.time())
        if verdict is None:
            verdict = measure(op, run, args, short=short)
            if verdict.status != "unmeasured":
                from . import verdicts
                verdicts.store().put(verdict.key, verdict.to_dict())
    if dist is not None:
        box = [verdict.to_dict() if verdict is not None else None]
        dist.broadcast_object_list(box, src=0)
        verdict = Verdict.from_dict(box[0])
        if rank != 0:
            verdict.key = key  # rank 0's verdict, held under this rank's own key
    _announce(verdict)
    return verdict


def _announce(verdict: Verdict) -> None:
    if verdict.status == "disagree":
        _warn_once(("verdict", verdict.key),
                   f"fastgpt: {verdict.op}'s Triton kernel disagrees with eager PyTorch on shape {verdict.shape} "
                   f"{verdict.dtype} on {verdict.device}: Triton error {_num(verdict.triton_err)}, eager error "
                   f"{_num(verdict.eager_err)} against a float64 reference ({verdict.reason}); this key runs eager")
    elif verdict.status == "error":
        _warn_once(("verdict", verdict.key),
                   f"fastgpt: {verdict.op}'s Triton kernel failed its check on shape {verdict.shape} "
                   f"{verdict.dtype} on {verdict.device} ({verdict.reason}); this key runs eager")


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def _distributed():
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


# ---------------------------------------------------------------- the check

def _eager_form(op: str) -> Callable:
    from . import ops
    function = getattr(ops, op)

    def eager(*args):
        with ops.use_backend("eager", op=op):
            return function(*args)
    return eager


@contextmanager
def _caller_state_kept(device: torch.device):
    from . import ops
    counts = Counter(ops.dispatch_counts)
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        ops.dispatch_counts.clear()
        ops.dispatch_counts.update(counts)


def _copy(a, dtype=None, requires_grad=False):
    if not isinstance(a, torch.Tensor):
        return a
    src = a.detach()
    if dtype is not None and not src.is_floating_point():
        dtype = None
    try:  # the caller's strides too: a kernel may be slower on a strided view
        c = torch.empty_strided(src.size(), src.stride(), dtype=dtype or src.dtype, device=src.device)
        c.copy_(src)
    except RuntimeError:  # overlapping (expanded) tensors
        c = src.to(dtype or src.dtype, copy=True)
    if requires_grad and a.requires_grad and c.is_floating_point():
        c.requires_grad_(True)
    return c


def _outputs(out) -> tuple:
    return tuple(o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _free_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` (tests fake it); None: no bound (CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def _extra_bytes(op: str, args: tuple, grad: bool) -> int:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    data = sum(t.numel() * t.element_size() for t in tensors)
    ref = sum(t.numel() * 8 for t in tensors)
    total = (2 * data + ref) * 2 * (2 if grad else 1)   # clones, outputs; gradients
    if op in ("causal_attention", "cached_attention"):  # the float64 reference's scores (at most a bounded slice)
        q, k = args[0], args[1]
        total += min(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * 8 * 3,
                     max(REFERENCE_SCORES_BYTES, q.shape[2] * k.shape[2] * 8 * 3))
    return total


def _tolerances(dtype: torch.dtype, device: torch.device) -> tuple:
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return TF32_TOLERANCES
    return TOLERANCES.get(dtype, TOLERANCES[torch.float16])


def _time(which: str, fn: Callable, device: torch.device) -> list:
    reps = REPS.get(device.type, 2)
    if clock is not None:
        return list(clock(which, fn, reps, device))
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return times


def measure(op: str, run: Callable, args: tuple, short: Optional[tuple] = None,
            eager: Optional[Callable] = None) -> Verdict:
    """Check and time ``run`` (the Triton form) against the eager form on clones of ``args``; the verdict.

    ``eager`` defaults to the op's eager path in ``fastgpt.ops``. Nothing the caller holds changes.
    """
    short = short or short_key(op, args)
    _, parts, dtype, device, grad, dropout = short
    verdict = Verdict(key=full_key(short), op=op, shape=_shape_text(parts), dtype=str(dtype).removeprefix("torch."),
                      device=device_fingerprint(device).split("|")[0], path="triton", status="unmeasured",
                      grad=grad, dropout=dropout, checked_at=time.time())
    measured[op] += 1
    eager = eager or _eager_form(op)
    free = _free_bytes(device)
    need = _extra_bytes(op, args, grad)
    if free is not None and need > MEMORY_SHARE * free:
        verdict.reason = (f"the check needs ~{need / 2**20:,.0f} MiB, more than {MEMORY_SHARE:.0%} of the "
                          f"{free / 2**20:,.0f} MiB free")
        return verdict
    with _caller_state_kept(device):
        try:
            _check_and_time(op, run, eager, args, verdict, dtype, device, grad)
        except torch.cuda.OutOfMemoryError as error:
            verdict.path, verdict.status = "triton", "unmeasured"
            verdict.reason = f"out of memory during the check ({error})".splitlines()[0]
            torch.cuda.empty_cache()
        except Exception as error:  # the eager side or the reference failed: no verdict, the default stays
            verdict.path, verdict.status = "triton", "unmeasured"
            verdict.reason = f"the check itself failed ({type(error).__name__}: {error})".splitlines()[0][:300]
    return verdict


def _check_and_time(op, run, eager, args, verdict, dtype, device, grad) -> None:
    p_index = DROPOUT_ARG.get(op)
    p = _dropout_p(op, args)
    at_zero = tuple(0.0 if i == p_index else a for i, a in enumerate(args))  # compare without dropout
    fwd_tol, grad_tol = _tolerances(dtype, device)
    generator = torch.Generator(device=device).manual_seed(1234)

    def upstream(outs):
        return tuple(torch.randn(o.shape, generator=generator, device=o.device, dtype=torch.float64)
                     for o in outs if o.requires_grad)

    first_grads = []   # the upstream gradient, drawn at the first backward (eager's) for every path

    def forward_backward(fn, inputs, grads=None):
        outs = _outputs(fn(*inputs))
        if not grad:
            return outs, ()
        leaves = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
        with_grad = [o for o in outs if o.requires_grad]
        if grads is None:
            if not first_grads:
                first_grads.extend(upstream(with_grad))
            grads = first_grads
        dys = tuple(g.to(o.dtype) for g, o in zip(grads, with_grad))
        gs = torch.autograd.grad(with_grad, leaves, dys, allow_unused=True)
        return outs, tuple(g for g in gs if g is not None)

    # Eager in the call's dtype, then the float64 reference (on a slice of the batch and heads
    # for attention: (batch, head) pairs are independent, and float64 scores are T² each), then Triton.
    eager_in = tuple(_copy(a, None, grad) for a in at_zero)
    eager_outs, eager_grads = forward_backward(eager, eager_in)
    grads = tuple(first_grads)
    view = _reference_view(op, at_zero)
    ref_in = tuple(_copy(view(a), torch.float64, grad) if isinstance(a, torch.Tensor) else a for a in at_zero)
    with torch.autocast(device.type, enabled=False):
        ref_outs = _outputs(eager(*ref_in))
        if grad:
            ref_outs, ref_grads = _ref_grads(ref_in, ref_outs, tuple(view(g) for g in grads))
        else:
            ref_grads = ()
    eager_outs, eager_grads = tuple(map(view, eager_outs)), tuple(map(view, eager_grads))
    verdict.eager_err = _max_err(eager_outs, ref_outs, eager_grads, ref_grads)
    triton_in = tuple(_copy(a, None, grad) for a in at_zero)
    try:
        triton_outs, triton_grads = forward_backward(run, triton_in, grads)
        keep_problem = _keep_rate_problem(op, run, args, p) if p > 0 else None
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:
        verdict.path, verdict.status = "eager", "error"
        verdict.reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        return
    triton_outs, triton_grads = tuple(map(view, triton_outs)), tuple(map(view, triton_grads))
    fwd_err = max((_rel_err(o, r) for o, r in zip(triton_outs, ref_outs)), default=0.0)
    grad_err = max((_rel_err(g, r) for g, r in zip(triton_grads, ref_grads)), default=0.0)
    verdict.triton_err = max(fwd_err, grad_err)
    eager_fwd = max((_rel_err(o, r) for o, r in zip(eager_outs, ref_outs)), default=0.0)
    eager_grad = max((_rel_err(g, r) for g, r in zip(eager_grads, ref_grads)), default=0.0)
    # Within the table, or no worse than twice eager's own error where eager itself exceeds it.
    fwd_ok = math.isfinite(fwd_err) and fwd_err <= max(fwd_tol, 2 * eager_fwd)
    grad_ok = math.isfinite(grad_err) and grad_err <= max(grad_tol, 2 * eager_grad)
    if len(triton_grads) != len(ref_grads):
        grad_ok = False
    if not (fwd_ok and grad_ok) or keep_problem:
        verdict.path, verdict.status = "eager", "disagree"
        verdict.reason = keep_problem or (f"tolerance {fwd_tol:.0e} forward, {grad_tol:.0e} gradients; "
                                          f"Triton forward {fwd_err:.2e}, gradients {grad_err:.2e}")
        return
    # Timing: the call as made (dropout included), forward and backward when training.
    timed_in_t = tuple(_copy(a, None, grad) for a in args)
    timed_in_e = tuple(_copy(a, None, grad) for a in args)
    triton_times = _time("triton", lambda: forward_backward(run, timed_in_t, grads), device)
    eager_times = _time("eager", lambda: forward_backward(eager, timed_in_e, grads), device)
    verdict.triton_ms, verdict.eager_ms = statistics.median(triton_times), statistics.median(eager_times)
    spread = ((max(triton_times) - min(triton_times)) + (max(eager_times) - min(eager_times))) / 2
    if verdict.triton_ms * (1 + MARGIN) + spread < verdict.eager_ms:
        verdict.path, verdict.status = "triton", "faster"
    else:
        verdict.path, verdict.status = "eager", "slower"
        verdict.reason = f"Triton not {MARGIN:.0%} faster beyond the spread ({spread:.3g} ms)"


REFERENCE_SCORES_BYTES = 512 * 2**20   # float64 attention scores (and their gradients) of the reference, at most


def _reference_view(op: str, args: tuple) -> Callable:
    """What part of each (batch, head, ...) tensor the float64 reference covers: all of it, except for
    attention too large for REFERENCE_SCORES_BYTES, where a prefix of the (batch, head) pairs."""
    if op not in ("causal_attention", "cached_attention"):
        return lambda t: t
    q, k = args[0], args[1]
    b, h = q.shape[0], q.shape[1]
    fits = max(1, REFERENCE_SCORES_BYTES // (q.shape[2] * k.shape[2] * 8 * 3))
    if fits >= b * h:
        return lambda t: t
    nb, nh = (max(1, min(b, fits // h)), h) if fits >= h else (1, fits)
    return lambda t: t[:nb, :nh]


def _ref_grads(ref_in, ref_outs, grads):
    leaves = [a for a in ref_in if isinstance(a, torch.Tensor) and a.requires_grad]
    with_grad = [o for o in ref_outs if o.requires_grad]
    gs = torch.autograd.grad(with_grad, leaves, grads, allow_unused=True)
    return tuple(o.detach() for o in ref_outs), tuple(g for g in gs if g is not None)


def _max_err(outs, ref_outs, gs, ref_gs) -> float:
    errs = [_rel_err(o, r) for o, r in zip(outs, ref_outs)] + [_rel_err(g, r) for g, r in zip(gs, ref_gs)]
    return max(errs, default=0.0)


def _keep_rate_problem(op: str, run: Callable, args: tuple, p: float) -> Optional[str]:
    """With dropout: does the kernel keep about 1 - p of the elements? None if plausible."""
    with torch.no_grad():
        if op == "dropout_add_layer_norm":
            x, branch = args[0], args[1]
            h = _outputs(run(torch.zeros_like(x), torch.ones_like(branch), *args[2:]))[0]
            kept = (h != 0).double().mean().item()
            n = h.numel()
            bound = 6 * math.sqrt(p * (1 - p) / n) + 1 / 256
            if abs(kept - (1 - p)) > bound:
                return f"dropout keeps {kept:.3f} of the elements at p = {p} (expected {1 - p:.3f} ± {bound:.3f})"
            return None
        # Zero queries weigh every visible key alike, so with values of one each output row
        # is (keys kept) / (keys seen · (1 - p)): the kept count, row by row.
        q, k, v = args[0], args[1], args[2]
        out = _outputs(run(torch.zeros_like(q), k.detach(), torch.ones_like(v), *args[3:]))[0]
        tq, tk = q.shape[2], k.shape[2]
        seen = torch.arange(tk - tq + 1, tk + 1, device=out.device, dtype=torch.float64)  # keys row i sees
        kept = (out[..., 0].double() * seen * (1 - p)).sum().item()
        total = seen.sum().item() * q.shape[0] * q.shape[1]
        rate = kept / total
        bound = 6 * math.sqrt(p * (1 - p) / total) + 1 / 256
        if not abs(rate - (1 - p)) <= bound:
            return f"dropout keeps {rate:.3f} of the attention weights at p = {p} (expected {1 - p:.3f} ± {bound:.3f})"
        return None

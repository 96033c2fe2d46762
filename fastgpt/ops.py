"""Dispatch: one function per fused operation, each choosing Triton or eager PyTorch.

The index of fastgpt's operations: each op's two forms are named here and
nowhere else. Its Triton form is a loader in ``_TRITON_FORMS`` (the entry point
in ``fastgpt.kernels``, imported on first use); its eager form is the body of its
function at the bottom of this file (``layer_norm``, ``gelu``,
``causal_attention``, the fusions ``linear_gelu`` and ``dropout_add_layer_norm``,
``cached_attention`` for KV-cache generation, and ``cross_entropy_rows``, the
per-chunk step of ``fastgpt.loss.fused_linear_cross_entropy``). The model calls
only those functions. Each one picks a path:

* ``auto`` (default): the Triton kernel when Triton imports, the tensor is on a
  CUDA device, the kernel supports the case and has proved itself on this device
  (right, and faster than eager: ``fastgpt/trust.py``); eager PyTorch otherwise.
* ``triton``: forced. Fails loudly (``BackendError``) rather than fall back:
  no kernel for the op, Triton missing, an unsupported case, or CPU tensors
  without ``TRITON_INTERPRET=1`` (the Triton interpreter, used by the tests).
* ``eager``: forced eager PyTorch.

Choose with ``set_backend(name, op=None)`` (process-wide), the ``use_backend(...)``
context manager (this thread or asyncio task only), or the environment variable
``FASTGPT_BACKEND`` read at import, e.g. ``FASTGPT_BACKEND=eager`` or ``FASTGPT_BACKEND=auto,causal_attention=eager``.

Every call is counted in ``dispatch_counts[(op, path)]`` (outside torch.compile
tracing), so tests and the profiler can see which path really ran.

Triton is imported lazily, only when a Triton path is considered, so
``import fastgpt`` works where Triton is not installed.
"""

from __future__ import annotations

import contextvars
import importlib
import itertools
import os
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from fastgpt import trust  # torch only, never Triton
from fastgpt.kernels.runtime import interpreter_on  # torch only, never Triton

BACKENDS = ("auto", "triton", "eager")
OPS = ("layer_norm", "gelu", "causal_attention", "linear_gelu", "dropout_add_layer_norm", "cached_attention",
       "linear_cross_entropy")
ENV_VAR = "FASTGPT_BACKEND"


class BackendError(RuntimeError):
    """A forced Triton path cannot run (no kernel, no Triton, unsupported case)."""


# ---------------------------------------------------------------- backend choice
#
# Two layers. ``set_backend`` (and FASTGPT_BACKEND) set the process-wide choice.
# ``use_backend`` scopes sit on top of it, per thread and per asyncio task: they
# live in a context variable, so one thread's scope never reaches another's ops,
# and each scope removes only itself when it exits, in whatever order scopes end
# (generators, tasks).

def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def _check_op(op: str) -> str:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; fastgpt dispatches {', '.join(OPS)}")
    return op


def parse_backend_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Parse ``"eager"`` or ``"auto,causal_attention=triton"`` into (default, per-op).

    A spec that says two different things (``eager,triton``, ``gelu=eager,gelu=triton``) is an error.
    """
    if not isinstance(spec, str):
        raise TypeError(f"a backend spec is a string like 'auto,gelu=eager', got {type(spec).__name__}")
    default, per_op = None, {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" in part:
            op, name = (s.strip() for s in part.split("=", 1))
            _check_op(op)
            _check_backend(name)
            if per_op.get(op, name) != name:
                raise ValueError(f"conflicting backends for {op}: {per_op[op]!r} and {name!r}")
            per_op[op] = name
        else:
            _check_backend(part)
            if default not in (None, part):
                raise ValueError(f"conflicting default backends {default!r} and {part!r}; give one, "
                                 "and per-op choices as op=backend")
            default = part
    return default or "auto", per_op


def _from_environment() -> tuple[str, dict[str, str]]:
    spec = os.environ.get(ENV_VAR, "")
    try:
        return parse_backend_spec(spec)
    except ValueError as err:
        raise ValueError(f"environment variable {ENV_VAR}={spec!r}: {err}") from None


# The process-wide choice: (default, {op: backend}). Replaced whole, never changed
# in place, so a thread reading it never sees half of a set_backend.
_global_choice: tuple[str, dict[str, str]] = _from_environment()
_global_lock = threading.Lock()

# This thread's or task's open scopes, oldest first: (scope id, backend, op or None).
_scopes: contextvars.ContextVar[tuple[tuple[int, str, Optional[str]], ...]] = \
    contextvars.ContextVar("fastgpt_backend_scopes", default=())
_scope_ids = itertools.count()


@torch.compiler.assume_constant_result
def _open_scopes() -> tuple[tuple[int, str, Optional[str]], ...]:
    # torch.compile cannot read a context variable: it reads this once per
    # compilation instead (a compiled graph keeps the scopes it was traced under;
    # set_backend changes still recompile, as dynamo guards the global choice).
    return _scopes.get()


def set_backend(name: str, op: Optional[str] = None) -> None:
    """Select ``auto``/``triton``/``eager`` for every op, or for one op by name, process-wide.

    Open ``use_backend`` scopes of a thread still take precedence in that thread.
    """
    global _global_choice
    _check_backend(name)
    if op is not None:
        _check_op(op)
    with _global_lock:
        default, per_op = _global_choice
        _global_choice = (name, {}) if op is None else (default, {**per_op, op: name})


def get_backend(op: Optional[str] = None) -> str:
    """The backend in force for ``op`` (or the default for all ops) in this thread or task."""
    default, per_op = _global_choice
    if op is None:
        name = default
    else:
        name = per_op.get(_check_op(op), default)
    for _, scoped, scoped_op in _open_scopes():
        if scoped_op is None or scoped_op == op:  # a scope for every op overrides per-op choices
            name = scoped
    return name


def backend_spec() -> str:
    """The choice in force here as a spec (``"auto"``, ``"eager,gelu=triton"``): what FASTGPT_BACKEND takes."""
    default = get_backend()
    overrides = [f"{op}={get_backend(op)}" for op in OPS if get_backend(op) != default]
    return ",".join([default, *overrides])


@contextmanager
def use_backend(name: str, op: Optional[str] = None) -> Iterator[None]:
    """Context manager: ``with use_backend("eager"): model(idx)``, for this thread or task only."""
    _check_backend(name)
    if op is not None:
        _check_op(op)
    scope = (next(_scope_ids), name, op)
    _scopes.set((*_scopes.get(), scope))
    try:
        yield
    finally:
        # Remove this scope only, wherever it sits: scopes may close out of order.
        _scopes.set(tuple(s for s in _scopes.get() if s[0] != scope[0]))


# ---------------------------------------------------------------- observability

dispatch_counts: Counter = Counter()


def reset_dispatch_counts() -> None:
    dispatch_counts.clear()


def _record(op: str, path: str) -> None:
    # Under torch.compile the Python body runs once while tracing; counting there
    # would be misleading, so compiled graphs are not counted.
    if not torch.compiler.is_compiling():
        dispatch_counts[(op, path)] += 1


# ---------------------------------------------------------------- the Triton forms
#
# Each op's Triton form, imported on first use (importing a kernel module imports
# Triton, and `import fastgpt` must work without it). A loader returns the op's
# entry point, which takes the same arguments as the op's function below, and its
# ``supports``, which takes them too and returns None when the kernel handles the
# case, or a short reason it does not (dtype, head size, ...). The eager forms are
# the op functions' own bodies, at the bottom of this file.

def _triton_layer_norm():
    from fastgpt.kernels import layer_norm as k
    return k.layer_norm, k.supports


def _triton_dropout_add_layer_norm():
    from fastgpt.kernels import layer_norm as k
    return k.dropout_add_layer_norm, k.supports_dropout_add


def _triton_gelu():
    from fastgpt.kernels import gelu as k
    return k.gelu, k.supports


def _triton_linear_gelu():
    from fastgpt.kernels import gelu as k
    return k.linear_gelu, k.supports_linear_gelu


def _triton_causal_attention():
    from fastgpt.kernels import attention as k
    return k.causal_attention, k.supports


def _triton_cached_attention():
    from fastgpt.kernels import decode_attention as k
    return k.decode_attention, k.supports


def _triton_linear_cross_entropy():
    # The per-chunk softmax of fastgpt.loss.fused_linear_cross_entropy (see cross_entropy_rows below).
    from fastgpt.kernels import cross_entropy as k
    return k.cross_entropy_rows, k.supports_loss


_TRITON_FORMS: dict[str, Callable[[], tuple[Callable, Callable[..., Optional[str]]]]] = {
    "layer_norm": _triton_layer_norm,
    "dropout_add_layer_norm": _triton_dropout_add_layer_norm,
    "gelu": _triton_gelu,
    "linear_gelu": _triton_linear_gelu,
    "causal_attention": _triton_causal_attention,
    "cached_attention": _triton_cached_attention,
    "linear_cross_entropy": _triton_linear_cross_entropy,
}


def triton_status() -> Optional[str]:
    """None when Triton imports, else why not (cached after the first call)."""
    global _triton_status
    if _triton_status is _UNKNOWN:
        try:
            importlib.import_module("triton")
            _triton_status = None
        except Exception as err:  # ImportError, or a broken install raising anything
            _triton_status = f"Triton is not usable here ({type(err).__name__}: {err})"
    return _triton_status


_UNKNOWN = object()
_triton_status = _UNKNOWN


_loaded: dict[str, tuple[Callable, Callable[..., Optional[str]]]] = {}


def _triton_kernel(op: str) -> Optional[tuple[Callable, Callable[..., Optional[str]]]]:
    """(run, supports) of ``op``'s Triton form, loaded once; None when it has none.

    The one place dispatch looks a kernel up: tests patch it (``monkeypatch.setattr(ops,
    "_triton_kernel", ...)``) to run a kernel of their own, or none.
    """
    if op not in _loaded:
        if op not in _TRITON_FORMS:
            return None
        _loaded[op] = _TRITON_FORMS[op]()
    return _loaded[op]



# Test seam: let ``auto`` treat CPU tensors under the Triton interpreter as a device, so the
# measured auto path (fastgpt/trust.py) runs without a GPU. Off: CPU tensors stay eager under auto.
_measure_on_cpu = os.environ.get("FASTGPT_MEASURE_ON_CPU") == "1"


def _measures_cpu() -> bool:
    return _measure_on_cpu and interpreter_on()


def forced_triton_problem(device: torch.device) -> Optional[str]:
    """Why the ops forced to ``triton`` here cannot run on ``device``, or None (also when none is forced).

    For a command about to build a model: the obstacles ``select_path`` raises
    BackendError for at an op's first call (Triton missing, a CPU without the
    interpreter), found before any work is done.
    """
    forced = [op for op in OPS if get_backend(op) == "triton"]
    if not forced:
        return None
    who = "backend 'triton' is forced" + ("" if len(forced) == len(OPS) else f" for {', '.join(forced)}")
    if triton_status() is not None:
        return f"{who} but {triton_status()}"
    if device.type != "cuda" and not interpreter_on():
        return (f"{who} on a {device.type} device; Triton runs on CUDA devices, or on a CPU under its interpreter "
                "(set TRITON_INTERPRET=1; correct but about 1000x slower, so it checks paths, not speed)")
    return None


def select_path(op: str, x: torch.Tensor, *args, **kwargs) -> tuple[str, Optional[Callable]]:
    """Decide ``"triton"`` or ``"eager"`` for one call of ``op`` on ``x``: (path, the Triton entry point or None)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor, got {type(x).__name__}")
    backend = get_backend(op)
    if backend == "eager":
        return "eager", None
    if backend == "auto":
        if (x.device.type != "cuda" and not _measures_cpu()) or triton_status() is not None:
            return "eager", None
        kernel = _triton_kernel(op)
        if kernel is None:
            return "eager", None
        run, supports = kernel
        if supports(x, *args, **kwargs) is not None:
            return "eager", None
        # Measured auto (fastgpt/trust.py): the kernel runs once it has proved itself on this device.
        if trust.choose(op, run, (x, *args)) == "eager":
            return "eager", None
        return "triton", run
    # backend == "triton": forced, so every obstacle is an error.
    if triton_status() is not None:
        raise BackendError(f"{op}: backend 'triton' is forced but {triton_status()}")
    kernel = _triton_kernel(op)
    if kernel is None:
        raise BackendError(
            f"{op}: backend 'triton' is forced but fastgpt has no Triton kernel for {op} yet; "
            f"use backend 'auto' or 'eager' for it (set_backend('auto', op={op!r}))"
        )
    if x.device.type != "cuda" and not interpreter_on():
        raise BackendError(
            f"{op}: backend 'triton' is forced on a {x.device.type} tensor; Triton runs on CUDA tensors, "
            "or on CPU tensors under the interpreter (set TRITON_INTERPRET=1 before importing fastgpt)"
        )
    run, supports = kernel
    reason = supports(x, *args, **kwargs)
    if reason is not None:
        raise BackendError(f"{op}: the Triton kernel does not support this case: {reason}")
    return "triton", run


# ---------------------------------------------------------------- the ops
#
# Values are not checked for NaN or inf (that would cost a device sync per
# call): they flow into the outputs that depend on them, as in eager PyTorch.
# One exception, on the CPU only (no sync there): attention checks its inputs,
# because PyTorch's CPU flash attention drops NaN (see _cpu_inputs_not_finite).

def _check_dropout(op: str, p) -> None:
    # Both paths need p in [0, 1): the kernels scale what they keep by 1 / (1 - p).
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{op}: dropout_p must be a float, got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {p}")


def _check_eps(op: str, eps) -> None:
    # Both paths: a zero, negative or NaN eps divides by sqrt(var + eps) <= 0, silently.
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    if not 0.0 < eps < float("inf"):
        raise ValueError(f"{op}: eps must be a positive finite number, got {eps}")


def layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim: scale * (x - mean) / sqrt(var + eps) + shift, biased var."""
    _check_eps("layer_norm", eps)
    path, run = select_path("layer_norm", x, scale, shift, eps)
    _record("layer_norm", path)
    if run is not None:
        return run(x, scale, shift, eps)
    return F.layer_norm(x, x.shape[-1:], scale, shift, eps)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    path, run = select_path("gelu", x)
    _record("gelu", path)
    if run is not None:
        return run(x)
    return F.gelu(x, approximate="tanh")


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(x @ weightᵀ + bias), the FeedForward's first Linear and its activation.

    Eager: one addmm (bias included) then GELU. Triton: the matmul without bias,
    then bias add + GELU fused in one pass over memory.
    """
    if not isinstance(bias, torch.Tensor):  # the Triton path adds the bias itself: it needs one
        raise TypeError(f"linear_gelu: bias must be a tensor (the FeedForward's first Linear has one), "
                        f"got {type(bias).__name__}; without a bias call ops.gelu(F.linear(x, weight))")
    path, run = select_path("linear_gelu", x, weight, bias)
    _record("linear_gelu", path)
    if run is not None:
        return run(x, weight, bias)
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def dropout_add_layer_norm(x: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                           eps: float = 1e-5, dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + dropout(branch) and LayerNorm(h): the residual add feeding the next norm.

    Returns (h, normalised h). ``dropout_p`` applies as given: pass 0.0 at
    inference. The Triton path reads x and branch once and writes h and the
    normalised output once.
    """
    _check_dropout("dropout_add_layer_norm", dropout_p)
    _check_eps("dropout_add_layer_norm", eps)
    path, run = select_path("dropout_add_layer_norm", x, branch, scale, shift, eps, dropout_p)
    _record("dropout_add_layer_norm", path)
    if run is not None:
        return run(x, branch, scale, shift, eps, dropout_p)
    h = x + (F.dropout(branch, dropout_p) if dropout_p > 0.0 else branch)
    return h, F.layer_norm(h, h.shape[-1:], scale, shift, eps)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d) + causal mask) with dropout on the weights, times v.

    q, k, v: (batch, heads, seq, head_dim), any strides. ``dropout_p`` applies as
    given: pass 0.0 at inference. The eager path never builds a T×T mask: it
    hands ``is_causal=True`` to PyTorch's fused attention.
    """
    _check_dropout("causal_attention", dropout_p)
    path, run = select_path("causal_attention", q, k, v, dropout_p)
    _record("causal_attention", path)
    if run is not None:
        return run(q, k, v, dropout_p)
    if _cpu_inputs_not_finite(q, k, v):
        return _seed_attention(q, k, v, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of the newest ``q`` tokens over a longer key/value history.

    q: (batch, heads, q_len, head_dim); k, v: (batch, heads, kv_len, head_dim)
    with kv_len >= q_len, the queries being the last q_len of the kv_len
    positions (KV-cache decoding and chunked prefill). Query i may see keys
    0 .. kv_len - q_len + i: the causal mask aligned bottom-right, where
    ``causal_attention`` (equal lengths) aligns it top-left. One query token
    sees every key, so it needs no mask at all. Equal lengths (a fresh prefill)
    are handed to ``causal_attention`` and counted there.
    """
    _check_dropout("cached_attention", dropout_p)
    if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == k.dim() == 4 \
            and q.shape[-2] == k.shape[-2]:
        # A fresh prefill (every key is one of the queries) is exactly causal
        # attention: its kernel takes any length, where the decode kernel takes ≤ 16.
        return causal_attention(q, k, v, dropout_p)
    path, run = select_path("cached_attention", q, k, v, dropout_p)
    _record("cached_attention", path)
    if run is not None:
        return run(q, k, v, dropout_p)
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if q_len > kv_len:
        raise ValueError(f"cached_attention: {q_len} queries but only {kv_len} keys; "
                         "the keys must include the queries' own positions")
    # Only this call's keys and values need checking: older ones were checked when they were new,
    # and SDPA propagates NaN from keys every query sees (the seed's path takes the rest).
    if _cpu_inputs_not_finite(q, k[..., -q_len:, :], v[..., -q_len:, :]):
        return _seed_attention(q, k, v, dropout_p)
    if q_len == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(diagonal=kv_len - q_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)


def _cpu_inputs_not_finite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when CPU attention inputs hold a NaN or an infinity, which PyTorch's CPU flash attention
    would not propagate as the seed's attention does.

    PyTorch's CPU flash kernel drops NaN (pytorch/pytorch#141128): a NaN query
    yields a finite row, so a model with one NaN weight returns normal-looking
    logits; with a boolean mask it spreads NaN from keys the mask hides. The
    seed's masked softmax gives NaN exactly where a NaN reaches. Three sums
    detect it (a NaN or inf anywhere makes a sum non-finite; so does an
    overflow, which then takes the exact path too): about 23 us beside 520 us
    of attention for GPT-2 small's 12 heads at T=128, and on a CPU reading the
    flag costs no device synchronisation. Other devices and torch.compile
    tracing skip the check.
    """
    if q.device.type != "cpu" or torch.compiler.is_compiling() or q.numel() == 0:
        return False
    return not bool(torch.isfinite(q.sum() + k.sum() + v.sum()))


def _seed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The seed's attention, step by step: scores, masked_fill(-inf) above the causal diagonal (aligned
    bottom-right: the queries are the last q_len of the kv_len positions), softmax of scores / sqrt(d),
    dropout, times v. NaN and inf flow exactly as in the seed; used for inputs that hold them."""
    q_len, kv_len = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-2, -1)
    hidden = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).triu(diagonal=kv_len - q_len + 1)
    weights = torch.softmax(scores.masked_fill(hidden, float("-inf")) / k.shape[-1] ** 0.5, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v


# (logits, targets, scale, ignore_index, compute_grad) -> per-row losses (float32);
# with compute_grad the logits are overwritten by the scaled gradient.
RowsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, bool], torch.Tensor]


def cross_entropy_rows(hidden: torch.Tensor, compute_dtype: torch.dtype) -> RowsFn:
    """The per-chunk softmax/gradient step of ``fastgpt.loss.fused_linear_cross_entropy``, chosen once per loss.

    ``hidden``: the loss's input rows, whose logits are computed in ``compute_dtype``.
    Returns the step (``RowsFn``) every chunk of the loss runs: the Triton kernel,
    or ``cross_entropy_rows_eager``. Counted as op ``linear_cross_entropy``.
    """
    path, run = select_path("linear_cross_entropy", hidden, compute_dtype)
    _record("linear_cross_entropy", path)
    return run if run is not None else cross_entropy_rows_eager


def cross_entropy_rows_eager(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                             compute_grad: bool) -> torch.Tensor:
    """Per-row losses of ``logits`` (rows × V); with ``compute_grad`` the logits become
    (softmax − onehot(targets)) · scale, zero on ignored rows. In place, float32 arithmetic."""
    z = logits if logits.dtype == torch.float32 else logits.float()
    ignored = targets == ignore_index
    safe_targets = targets.masked_fill(ignored, 0).unsqueeze(1)
    target_logit = z.gather(1, safe_targets).squeeze(1)
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m).exp_()                           # exp(z − m), in place
    s = z.sum(dim=1)
    losses = (s.log() + m.squeeze(1) - target_logit).masked_fill(ignored, 0.0)
    if compute_grad:
        row_scale = scale.masked_fill(ignored, 0.0)
        z.mul_((row_scale / s).unsqueeze(1))   # softmax · c
        z.scatter_add_(1, safe_targets, -row_scale.unsqueeze(1))  # − c at the target
        if z is not logits:
            logits.copy_(z)
    return losses

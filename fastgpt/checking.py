"""``fastgpt check`` and ``fastgpt.check(...)``: the user's verdict table, Triton against eager on this GPU.

``check(...)`` runs the case matrix (the four GPT-2 sizes' widths, batch × sequence
buckets up to 1024 tokens and 8k for attention, bfloat16/float16/float32,
forward and backward, dropout 0 and 0.1, decode over caches of 128 to 8k),
measures each case with ``fastgpt.trust.measure`` (agreement with a float64
reference, then CUDA-event timings), records the verdicts in the per-user
file (``fastgpt.verdicts``) that measured ``auto`` reads, and returns one row
per case. ``interpret=True`` runs tiny shapes on CPU tensors under Triton's
interpreter instead (float32 and float16: its bfloat16 dot is broken): it
proves the machinery, its times are not a speed.

(Named ``checking``, not ``check``: a submodule ``fastgpt.check`` would replace
the function ``fastgpt.check`` on the package once anything imported it.)
"""

from __future__ import annotations

import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

SIZES = {"gpt2-small": (768, 12), "gpt2-medium": (1024, 16), "gpt2-large": (1280, 20), "gpt2-xl": (1600, 25)}
GPU_DTYPES = ("bfloat16", "float16", "float32")
INTERPRET_DTYPES = ("float32", "float16")
VOCAB = 50257


@dataclass
class Case:
    op: str
    label: str                 # "rows=8192 width=768 train"
    make: Callable             # (dtype, device, generator) -> args of the op's Triton form
    grad: bool = False


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    pass_: str                 # "forward" or "fwd+bwd"
    dropout: float
    triton_ms: Optional[float]
    eager_ms: Optional[float]
    speedup: Optional[float]
    max_error: Optional[float]
    verdict: str               # "triton", "eager", "unmeasured", "unsupported"
    status: str                # faster, slower, disagree, error, unmeasured, unsupported
    reason: str = ""

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["pass"] = d.pop("pass_")
        return d


# ---------------------------------------------------------------- the matrix

def _randn(shape, dtype, device, generator, grad=False, scale=1.0):
    import torch
    t = (torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32) * scale).to(device, dtype)
    return t.requires_grad_(grad)


def _norm_params(width, dt, dev, g, grad):
    return _randn((width,), dt, dev, g, grad, 0.1).add(1).detach().requires_grad_(grad), \
        _randn((width,), dt, dev, g, grad, 0.1)


def _row_cases(width, rows_list, grads, dropouts) -> list:
    def layer_norm(rows, grad):
        return lambda dt, dev, g: (_randn((rows, width), dt, dev, g, grad), *_norm_params(width, dt, dev, g, grad),
                                   1e-5)

    def gelu(rows, grad):
        return lambda dt, dev, g: (_randn((rows, 4 * width), dt, dev, g, grad),)

    def linear_gelu(rows, grad):
        return lambda dt, dev, g: (_randn((rows, width), dt, dev, g, grad),
                                   _randn((4 * width, width), dt, dev, g, grad, width ** -0.5),
                                   _randn((4 * width,), dt, dev, g, grad, 0.1))

    def dropout_add(rows, grad, p):
        return lambda dt, dev, g: (_randn((rows, width), dt, dev, g, grad), _randn((rows, width), dt, dev, g, grad),
                                   *_norm_params(width, dt, dev, g, grad), 1e-5, p)

    cases = []
    for rows in rows_list:
        for grad in grads:
            mode = "train" if grad else "infer"
            cases += [Case("layer_norm", f"({rows}, {width}) {mode}", layer_norm(rows, grad), grad),
                      Case("gelu", f"({rows}, {4 * width}) {mode}", gelu(rows, grad), grad),
                      Case("linear_gelu", f"({rows}, {width}) @ ({4 * width}, {width})ᵀ {mode}",
                           linear_gelu(rows, grad), grad)]
            cases += [Case("dropout_add_layer_norm", f"({rows}, {width}) {mode} p={p}", dropout_add(rows, grad, p), grad)
                      for p in (dropouts if grad else (0.0,))]
    return cases


def _attention_cases(heads, head_dim, shapes, grads, dropouts, caches, decode_batch) -> list:
    cases = []
    for b, t in shapes:
        for grad in grads:
            for p in dropouts if grad else (0.0,):
                cases.append(Case("causal_attention", f"B={b} H={heads} T={t} d={head_dim} "
                                                      f"{'train' if grad else 'infer'} p={p}", grad=grad,
                                  make=lambda dt, dev, g, b=b, t=t, gr=grad, p=p: (
                                      *(_randn((b, heads, t, head_dim), dt, dev, g, gr) for _ in range(3)), p)))
    for cache in caches:
        cases.append(Case("cached_attention", f"B={decode_batch} H={heads} q=1 cache={cache} d={head_dim}",
                          make=lambda dt, dev, g, c=cache: (
                              _randn((decode_batch, heads, 1, head_dim), dt, dev, g),
                              _randn((decode_batch, heads, c, head_dim), dt, dev, g),
                              _randn((decode_batch, heads, c, head_dim), dt, dev, g), 0.0)))
    return cases


def _loss_cases(width, rows, vocab) -> list:
    return [Case("linear_cross_entropy", f"({rows}, {width}) → {vocab} logits", make=lambda dt, dev, g: (
        _randn((rows, width), dt, dev, g), dt, vocab))]


def cases(sizes=None, interpret=False) -> list:
    """The matrix: ``interpret`` gives tiny shapes for the CPU interpreter."""
    if interpret:
        return (_row_cases(64, [16], (False, True), (0.0, 0.1))
                + _attention_cases(2, 32, [(1, 16)], (False, True), (0.0, 0.1), [8, 32], 1)
                + _loss_cases(64, 16, 97))
    out = []
    for size in sizes or list(SIZES):
        width, heads = SIZES[size]
        out += _row_cases(width, [1024, 8192], (False, True), (0.0, 0.1))
        out += _attention_cases(heads, width // heads, [(8, 1024), (1, 8192)], (False, True), (0.0, 0.1),
                                [128, 1024, 8192], 8)
        out += _loss_cases(width, 8192, VOCAB)
    seen, unique = set(), []
    for case in out:  # the same widths across sizes would repeat a case
        if (case.op, case.label) not in seen:
            seen.add((case.op, case.label))
            unique.append(case)
    return unique


# ---------------------------------------------------------------- running it

def _loss_form(step):
    """The loss step as a checkable function: (logits, targets, scale) -> (losses, logits' gradient)."""
    def run(logits, targets, scale):
        losses = step(logits, targets, scale.float(), -100, True)  # the float64 reference copies the scale too
        return losses, logits
    return run


def _run_case(case, dtype, device, generator, log_problem) -> Optional[Row]:
    import torch

    from . import ops, trust, verdicts
    args = case.make(dtype, device, generator)
    p = trust._dropout_p(case.op, args) if case.op != "linear_cross_entropy" else 0.0
    row = Row(op=case.op, shape=case.label, dtype=str(dtype).removeprefix("torch."),
              pass_="fwd+bwd" if case.grad else "forward", dropout=p, triton_ms=None, eager_ms=None,
              speedup=None, max_error=None, verdict="unsupported", status="unsupported")
    kernel = ops._triton_kernel(case.op)
    if kernel is None:
        row.reason = "no Triton kernel"
        return row
    run, supports = kernel
    if case.op == "linear_cross_entropy":
        hidden, compute_dtype, vocab = args
        problem = supports(hidden, compute_dtype)
        short = trust.short_key(case.op, (hidden, compute_dtype))
        from .loss import default_chunk_rows
        rows = min(hidden.shape[0], default_chunk_rows(hidden.shape[0], vocab, compute_dtype.itemsize))
        logits = _randn((rows, vocab), compute_dtype, device, generator, scale=2.0)
        targets = torch.randint(0, vocab, (rows,), generator=generator).to(device)
        scale = torch.tensor(1.0 / rows, device=device)
        call = (logits, targets, scale)
        triton_form, eager_form = _loss_form(run), _loss_form(ops.cross_entropy_rows_eager)
    else:
        problem = supports(*args)
        short = None
        call, triton_form, eager_form = args, run, None
    if problem is not None:
        row.reason = problem
        return row
    with torch.set_grad_enabled(case.grad):
        short = short or trust.short_key(case.op, args)
        verdict = trust.measure(case.op, triton_form, call, short=short, eager=eager_form)
    if verdict.status != "unmeasured":
        verdicts.store().put(verdict.key, verdict.to_dict())
        trust._session[short] = verdict
    if verdict.status in ("disagree", "error"):
        log_problem(f"{case.op} {case.label} {row.dtype}: {verdict.status}: {verdict.reason}")
    row.triton_ms, row.eager_ms, row.speedup = verdict.triton_ms, verdict.eager_ms, verdict.speedup
    row.max_error, row.verdict = verdict.triton_err, verdict.path
    row.status, row.reason = verdict.status, verdict.reason
    if verdict.status == "unmeasured":
        row.verdict = "unmeasured"
    return row


def _prepare_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:  # Triton decorates helpers at import, as compiled or interpreted for good
        raise RuntimeError("check(interpret=True) needs TRITON_INTERPRET=1 before Triton is imported (fastgpt.ops "
                           "and torch.compile import it): set it in the environment")
    os.environ["TRITON_INTERPRET"] = "1"


def check(ops: Optional[Iterable[str]] = None, sizes: Optional[Iterable[str]] = None,
          dtypes: Optional[Iterable[str]] = None, interpret: bool = False,
          progress: Optional[Callable[[str], None]] = None) -> list:
    """Measure Triton against eager for GPT-2's cases on this GPU; record the verdicts; return the rows.

    ``ops``: op names (default all); ``sizes``: GPT-2 size names (default all four);
    ``dtypes``: "bfloat16", "float16", "float32" (default all three; float32 and float16
    with ``interpret``). Without CUDA (and without ``interpret``) there is nothing to
    measure: an empty list. ``progress`` receives a line per case.
    """
    for size in sizes or ():
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    allowed = INTERPRET_DTYPES if interpret else GPU_DTYPES
    dtypes = list(dtypes or allowed)
    for name in dtypes:
        if name not in allowed:
            raise ValueError(f"dtype {name!r} cannot be checked here; choose from {', '.join(allowed)}"
                             + (" (the interpreter's bfloat16 dot is broken)" if interpret else ""))
    if interpret:
        _prepare_interpreter()  # before fastgpt.ops, which imports Triton
    import torch

    from . import ops as dispatch
    for op in ops or ():
        dispatch._check_op(op)
    if interpret:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        return []
    if dispatch.triton_status() is not None:
        raise RuntimeError(f"fastgpt check: {dispatch.triton_status()}")
    chosen = [c for c in cases(list(sizes) if sizes else None, interpret) if not ops or c.op in set(ops)]
    work = [(c, getattr(torch, d)) for d in dtypes for c in chosen]
    rows, problems = [], []
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, (case, dtype) in enumerate(work, 1):
            if progress:
                progress(f"{i}/{len(work)} {case.op} {case.label} {str(dtype).removeprefix('torch.')}")
            try:
                rows.append(_run_case(case, dtype, device, generator, problems.append))
            except Exception as error:  # the check itself failed (not the kernel): say so, go on
                rows.append(Row(op=case.op, shape=case.label, dtype=str(dtype).removeprefix("torch."),
                                pass_="fwd+bwd" if case.grad else "forward", dropout=0.0, triton_ms=None,
                                eager_ms=None, speedup=None, max_error=None, verdict="unmeasured",
                                status="unmeasured", reason=f"{type(error).__name__}: {error}".splitlines()[0]))
    return rows


# ---------------------------------------------------------------- the table

def summary(rows: list) -> str:
    """``14 cases: 11 faster with Triton (median 1.8×), 3 kept on eager, 0 disagreements``."""
    faster = [r for r in rows if r.status == "faster"]
    kept = [r for r in rows if r.status in ("slower", "error")]
    disagree = [r for r in rows if r.status == "disagree"]
    median = f" (median {statistics.median(r.speedup for r in faster):.1f}×)" if faster else ""
    line = (f"{len(rows)} cases: {len(faster)} faster with Triton{median}, {len(kept)} kept on eager, "
            f"{len(disagree)} disagreement{'' if len(disagree) == 1 else 's'}")
    errors = sum(r.status == "error" for r in rows)
    other = [f"{errors} kernel error{'' if errors == 1 else 's'}"] if errors else []
    for status in ("unmeasured", "unsupported"):
        n = sum(r.status == status for r in rows)
        if n:
            other.append(f"{n} {status}")
    return line + (f" ({', '.join(other)})" if other else "")


def format_rows(rows: list) -> str:
    def ms(v):
        return "–" if v is None else f"{v:,.3f}"
    header = (f"{'op':<23} {'shape':<38} {'dtype':<8} {'pass':<8} {'triton ms':>10} {'eager ms':>10} "
              f"{'speed-up':>8} {'max error':>9}  verdict")
    lines = [header]
    for r in rows:
        speed = "–" if r.speedup is None else f"{r.speedup:.2f}×"
        err = "–" if r.max_error is None else f"{r.max_error:.1e}"
        verdict = r.verdict if r.status in ("unmeasured", "unsupported") else f"{r.verdict} ({r.status})"
        lines.append(f"{r.op:<23} {r.shape:<38} {r.dtype:<8} {r.pass_:<8} {ms(r.triton_ms):>10} {ms(r.eager_ms):>10} "
                     f"{speed:>8} {err:>9}  {verdict}")
    lines.append(summary(rows))
    return "\n".join(lines)

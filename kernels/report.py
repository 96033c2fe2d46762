"""Ahead-of-time kernel report: compile every catalogued kernel for real GPUs on a machine without one.

    python -m fastgpt.kernels.report [--arch 80,90] [--json FILE] [--jobs N] [--no-strict]

Each case from ``fastgpt.kernels.cases.all_cases()`` is compiled by Triton for each
target architecture (``GPUTarget`` names the GPU, so no driver is queried), with
pointers 16-byte aligned as the launcher specialises them, in spawned worker
processes that import the kernel afresh without TRITON_INTERPRET. Each result is
read with the NVIDIA tools Triton bundles:

- registers, stack and static shared memory: ``cuobjdump -res-usage`` on the cubin;
- spill stores and loads: the ``ptxas -v`` log of the very ptxas run that built the
  cubin (Triton prints it when ``knobs.nvidia.dump_ptxas_log`` is on; we capture it);
- dynamic shared memory: Triton's ``metadata.shared`` (what the launcher requests);
- tensor-core instructions: HMMA/HGMMA/... opcodes in the ``nvdisasm`` SASS and
  ``mma.sync`` / ``wgmma.mma_async`` in the PTX.

A case fails if it does not compile, spills, needs more shared memory than the
architecture allows one block, or declares ``expects_tensor_cores`` yet emitted no
tensor-core instruction. By default (``--strict``) any failure makes the exit status 1.
Field meanings are documented in kernels/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata as package_metadata

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from fastgpt.kernels.cases import CompileCase, all_cases

# Largest shared memory one block may use, static + dynamic (CUDA's
# "max shared memory per block, opt-in"): A100 163 KB, H100/H200 227 KB.
SHARED_MEMORY_LIMITS = {80: 166912, 90: 232448}
DEFAULT_ARCHS = (80, 90)
# A compile that takes longer than this is stuck (real ones take seconds).
DEFAULT_TIMEOUT_S = 600.0

# Tensor-core opcodes in SASS: HMMA (fp16/bf16/tf32 mma), IMMA (int8), DMMA (fp64),
# and the sm_90 warpgroup forms HGMMA/IGMMA/QGMMA (fp8).
TENSOR_CORE_SASS_OPCODES = frozenset({"HMMA", "IMMA", "DMMA", "HGMMA", "IGMMA", "QGMMA"})
# Tensor-core instructions in PTX. On sm_90 tl.dot becomes wgmma when the tile and
# warp count allow it and falls back to mma.sync (which also runs on tensor cores).
TENSOR_CORE_PTX_PATTERNS = {
    "mma.sync": re.compile(r"(?<![\w.])mma\.sync\b"),
    "wgmma.mma_async": re.compile(r"(?<![\w.])wgmma\.mma_async\b"),
}
# Any mma-family PTX instruction (mma.*, wmma.*, wgmma.*), not names like "gamma".
PTX_MMA_FAMILY_RE = re.compile(r"(?<![\w.])w?g?mma\.[a-z]")
# One SASS instruction line of nvdisasm: "/*0a30*/  @!P0 HMMA.16816.F32 R4, ..."
SASS_OPCODE_RE = re.compile(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9]*)")
RESOURCE_USAGE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)")
PTXAS_SPILLS_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
# Enough of a compiler message to act on; a ptxas error would otherwise carry its whole log.
MAX_ERROR_CHARS = 8000


def arch_name(arch: int) -> str:
    return f"sm_{arch}"


def config_label(case: CompileCase) -> str:
    if case.config:
        return case.config
    return " ".join(f"{name}={value}" for name, value in case.constexprs.items())


@dataclass
class CaseResult:
    """One kernel × config × arch: what the compiler produced and whether it passes."""

    kernel: str
    config: str
    arch: str
    num_warps: int
    num_stages: int
    expects_tensor_cores: bool
    registers: int | None = None
    spill_stores_bytes: int | None = None
    spill_loads_bytes: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    tensor_cores: bool | None = None
    tensor_core_instructions: dict = field(default_factory=dict)
    compile_seconds: float | None = None
    ok: bool = False
    error: str | None = None          # the compiler's message when the case did not compile
    failures: list = field(default_factory=list)  # every reason the case fails, one line each

    @property
    def label(self) -> str:
        return f"{self.kernel} [{self.config}] {self.arch}"

    @property
    def spilled(self) -> bool:
        return bool(self.spill_stores_bytes or self.spill_loads_bytes)


def failure_reasons(result: CaseResult) -> list[str]:
    """Why a compiled (or not) case fails the report; empty when it passes."""
    if result.error is not None:
        return [f"did not compile: {_one_line(result.error)}"]
    reasons = []
    if result.spilled:
        reasons.append(f"spills {result.spill_stores_bytes} bytes of stores and {result.spill_loads_bytes} "
                       f"bytes of loads at {result.registers} registers")
    limit = SHARED_MEMORY_LIMITS[int(result.arch.removeprefix("sm_"))]
    if result.shared_bytes > limit:
        reasons.append(f"needs {result.shared_bytes} bytes of shared memory, over the {result.arch} "
                       f"limit of {limit} bytes per block")
    if result.expects_tensor_cores and not result.tensor_cores:
        reasons.append("expects tensor cores but emitted no tensor-core instruction")
    return reasons


def _one_line(message: str) -> str:
    """The most telling line of a compiler error: Triton puts the source excerpt first
    and the message last; ptxas errors start with the summary."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    return lines[-1] if message.startswith("at ") else lines[0]


# ---------------------------------------------------------------------------
# Compiling and measuring one case (runs in a compiler worker process)
# ---------------------------------------------------------------------------

def _check_case(case: CompileCase) -> None:
    """Reject malformed cases with a message a kernel author can act on, before
    Triton fails with a bare KeyError deep in code generation."""
    if not isinstance(case.fn, JITFunction):
        raise TypeError(f"{case.kernel}: fn is {type(case.fn).__name__}, not a @triton.jit function")
    missing = [name for name in case.fn.arg_names if name not in case.signature]
    if missing:
        raise ValueError(f"{case.kernel}: signature lacks arguments {missing}")
    not_constexpr = [name for name in case.constexprs
                     if isinstance(name, str) and case.signature.get(name) != "constexpr"]
    if not_constexpr:
        raise ValueError(f"{case.kernel}: constexprs {not_constexpr} must have type 'constexpr' in the signature")


def aligned_pointer_attrs(case: CompileCase) -> dict:
    """Mark every pointer argument 16-byte aligned, as Triton's launcher does for any
    tensor whose data_ptr() % 16 == 0 (every fresh torch allocation). Without it the
    compile models an unaligned launch: no vector loads and no cp.async pipelining,
    which under-reports shared memory and registers. Same format in Triton 3.6 and 3.9:
    {(argument index,): [[attribute, value]]}."""
    return {(index,): [["tt.divisibility", 16]]
            for index, name in enumerate(case.fn.arg_names)
            if str(case.signature[name]).startswith("*")}


def _run_tool(name: str, *args: str) -> str:
    """Run one of the NVIDIA tools Triton bundles (its knobs honour TRITON_<TOOL>_PATH)."""
    path = getattr(triton.knobs.nvidia, name).path
    return subprocess.run([path, *args], check=True, capture_output=True, text=True).stdout


def count_tensor_core_instructions(ptx: str, sass: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for opcode in SASS_OPCODE_RE.findall(sass):
        if opcode in TENSOR_CORE_SASS_OPCODES:
            counts[opcode] = counts.get(opcode, 0) + 1
    for name, pattern in TENSOR_CORE_PTX_PATTERNS.items():
        if found := len(pattern.findall(ptx)):
            counts[name] = found
    return counts


def measure_case(case: CompileCase, arch: int) -> dict:
    """Compile one case for one arch and read its resources. Raises on compile errors.

    Needs a process whose Triton was imported without TRITON_INTERPRET (see _Worker)."""
    _check_case(case)
    # Always run the whole pipeline: a cache hit would skip ptxas (so no spill log)
    # and report a meaningless compile time.
    triton.knobs.compilation.always_compile = True
    triton.knobs.nvidia.dump_ptxas_log = True
    source = ASTSource(fn=case.fn, signature=dict(case.signature), constexprs=dict(case.constexprs),
                       attrs=aligned_pointer_attrs(case))
    # Triton prints the ptxas log (and, on a ptxas error, the whole PTX) to stdout.
    captured = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(captured):
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    seconds = time.perf_counter() - started

    spill_lines = PTXAS_SPILLS_RE.findall(captured.getvalue())
    if not spill_lines:
        raise RuntimeError("no `ptxas -v` log was captured, so spills are unknown "
                           "(has this Triton version changed knobs.nvidia.dump_ptxas_log?)")
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory(prefix="fastgpt-kernel-report-") as scratch:
        cubin_path = os.path.join(scratch, "kernel.cubin")
        with open(cubin_path, "wb") as cubin:
            cubin.write(kernel.asm["cubin"])
        usage = RESOURCE_USAGE_RE.search(_run_tool("cuobjdump", "-res-usage", cubin_path))
        # ptxas emits tensor-core SASS only for mma-family PTX; skipping nvdisasm
        # otherwise saves a third of the report's time on element-wise kernels.
        sass = _run_tool("nvdisasm", cubin_path) if PTX_MMA_FAMILY_RE.search(ptx) else ""
    if usage is None:
        raise RuntimeError("cuobjdump -res-usage printed no REG/STACK/SHARED line")
    registers, stack, static_shared = map(int, usage.groups())
    instructions = count_tensor_core_instructions(ptx, sass)
    return {
        "registers": registers,
        # One "Function properties" block per function (the kernel and any noinline callee).
        "spill_stores_bytes": sum(int(stores) for _, stores, _ in spill_lines),
        "spill_loads_bytes": sum(int(loads) for _, _, loads in spill_lines),
        "stack_bytes": stack,
        # The launcher requests metadata.shared bytes of dynamic shared memory on top of
        # the cubin's static shared memory (e.g. alignment padding on sm_90).
        "shared_bytes": (kernel.metadata.shared or 0) + static_shared,
        "tensor_cores": bool(instructions),
        "tensor_core_instructions": instructions,
        "compile_seconds": round(seconds, 3),
    }


def _error_text(error: BaseException) -> str:
    # Triton's CompilationError text starts "at LINE:COL:" and needs no type name;
    # a ptxas error carries its whole log, so keep the JSON readable.
    text = str(error).strip() or type(error).__name__
    text = text if text.startswith("at ") else f"{type(error).__name__}: {text}"
    return text[:MAX_ERROR_CHARS]


# ---------------------------------------------------------------------------
# Compiler workers: fresh processes that import each kernel by name
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelRef:
    """Where a kernel lives, so a worker can import it itself. A fresh import is the
    point: the calling process may have imported Triton under TRITON_INTERPRET=1 (the
    test suite does), and then every @triton.jit in it, Triton's own library included,
    is an interpreted function that cannot be compiled."""

    module: str
    qualname: str

    @classmethod
    def of(cls, fn) -> "KernelRef":
        python_fn = fn
        while python_fn is not None and not inspect.isfunction(python_fn):
            python_fn = getattr(python_fn, "fn", None)  # Autotuner -> JITFunction -> function
        if python_fn is None or "<locals>" in python_fn.__qualname__:
            raise ValueError("the kernel must be a @triton.jit function defined at module level: "
                             "the report compiles in fresh processes that import it by name")
        return cls(python_fn.__module__, python_fn.__qualname__)

    def load(self):
        kernel = importlib.import_module(self.module)
        for name in self.qualname.split("."):
            kernel = getattr(kernel, name)
        while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
            kernel = kernel.fn  # an @triton.autotune / @triton.heuristics wrapper
        return kernel


def _worker_loop(connection) -> None:
    """A compiler worker: receive (case with a KernelRef, arch), send back
    {"measurements": ...} or {"error": ...}; None ends it."""
    # Triton 3.9 warns that its FP-fusion default changes in 3.10. The report compiles
    # with whatever default the library's own launches get; the warning would only
    # repeat once per worker.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    while (job := connection.recv()) is not None:
        case, arch = job
        try:
            case = dataclasses.replace(case, fn=case.fn.load())
            outcome = {"measurements": measure_case(case, arch)}
        except Exception as error:  # a compile error is a result, not a crash
            outcome = {"error": _error_text(error)}
        connection.send(outcome)


@contextlib.contextmanager
def _without_interpreter():
    """Hide TRITON_INTERPRET while a worker process starts: the worker inherits the
    environment and reads it when it imports Triton (and in code generation)."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


class _Worker:
    """One spawned compiler process, reused for job after job (its start-up imports
    torch and Triton: about two seconds)."""

    def __init__(self, context):
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_worker_loop, args=(child_end,), daemon=True)
        with _without_interpreter():
            self.process.start()
        child_end.close()
        self.job_index: int | None = None
        self.job_started = 0.0

    def give(self, index: int, job) -> None:
        self.job_index, self.job_started = index, time.monotonic()
        self.connection.send(job)

    def stop(self, force: bool = False) -> None:
        if not force:
            with contextlib.suppress(OSError):
                self.connection.send(None)
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


def default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _run_in_workers(jobs: list[tuple[CompileCase, int]], workers: int, timeout: float) -> list[dict]:
    """Compile every (case, arch) job on up to `workers` spawned processes.

    Spawned, not forked: a fork would inherit the caller's Triton, interpreted or
    not, and its threads (torch's, or CUDA's on a GPU machine). A worker that dies or
    hangs costs only its current job, which is reported as failed; a new worker
    takes its place.
    """
    context = multiprocessing.get_context("spawn")
    outcomes: list[dict | None] = [None] * len(jobs)
    waiting = deque(range(len(jobs)))
    idle: list[_Worker] = []
    busy: dict = {}  # connection -> worker
    try:
        while waiting or busy:
            while waiting and len(busy) < workers:
                index = waiting.popleft()
                case, arch = jobs[index]
                try:
                    job = (dataclasses.replace(case, fn=KernelRef.of(case.fn)), arch)
                except Exception as error:
                    outcomes[index] = {"error": _error_text(error)}
                    continue
                worker = idle.pop() if idle else _Worker(context)
                try:
                    worker.give(index, job)  # pickles the case: a constexpr value might not pickle
                except Exception as error:
                    outcomes[index] = {"error": f"cannot send the case to a compiler process: {_error_text(error)}"}
                    idle.append(worker)
                    continue
                busy[worker.connection] = worker
            for connection in multiprocessing.connection.wait(list(busy), timeout=1.0):
                worker = busy.pop(connection)
                try:
                    outcomes[worker.job_index] = connection.recv()
                    idle.append(worker)
                except EOFError:
                    worker.process.join()
                    outcomes[worker.job_index] = {
                        "error": f"the compiler process died (exit code {worker.process.exitcode})"}
                    worker.stop(force=True)
            for connection, worker in list(busy.items()):
                if time.monotonic() - worker.job_started > timeout:
                    del busy[connection]
                    worker.stop(force=True)
                    outcomes[worker.job_index] = {"error": f"compilation timed out after {timeout:g} s"}
    finally:
        for worker in idle:
            worker.stop()
        for worker in busy.values():
            worker.stop(force=True)
    return outcomes


@dataclass
class Report:
    archs: list[int]
    case_count: int
    results: list[CaseResult]

    @property
    def failed(self) -> list[CaseResult]:
        return [result for result in self.results if not result.ok]

    @property
    def spill_count(self) -> int:
        return sum(result.spilled for result in self.results)

    @property
    def compile_error_count(self) -> int:
        return sum(result.error is not None for result in self.results)

    def summary(self) -> dict:
        return {"cases": self.case_count, "archs": len(self.archs),
                "compiled": len(self.results) - self.compile_error_count,
                "compile_errors": self.compile_error_count, "spills": self.spill_count,
                "failures": len(self.failed), "ok": not self.failed}

    def summary_line(self) -> str:
        not_compiled = f" ({self.compile_error_count} did not compile)" if self.compile_error_count else ""
        return (f"{_plural(self.case_count, 'case')} × {_plural(len(self.archs), 'arch')} compiled{not_compiled}, "
                f"{_plural(self.spill_count, 'spill')}, {_plural(len(self.failed), 'failure')}")

    def to_json(self) -> dict:
        return {
            "tool": "fastgpt.kernels.report",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "triton_version": triton.__version__,
            "torch_version": _installed_version("torch"),
            "python_version": platform.python_version(),
            "archs": [arch_name(arch) for arch in self.archs],
            "ptxas_versions": {arch_name(arch): _ptxas_version(arch) for arch in self.archs},
            "shared_memory_limits": {arch_name(arch): SHARED_MEMORY_LIMITS[arch] for arch in self.archs},
            "cases": [asdict(result) for result in self.results],
            "summary": self.summary(),
        }


def build_report(cases: list[CompileCase], archs=DEFAULT_ARCHS, jobs: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> Report:
    """Compile every case for every arch and check each result. Never raises for a
    bad case: its failure is recorded in its row."""
    archs = list(archs)
    unknown = [arch for arch in archs if arch not in SHARED_MEMORY_LIMITS]
    if unknown:
        raise ValueError(f"no shared-memory limit known for archs {unknown}; known: {sorted(SHARED_MEMORY_LIMITS)}")
    work = [(case, arch) for case in cases for arch in archs]
    outcomes = _run_in_workers(work, max(1, jobs or default_jobs()), timeout) if work else []
    results = []
    for (case, arch), outcome in zip(work, outcomes):
        result = CaseResult(kernel=case.kernel, config=config_label(case), arch=arch_name(arch),
                            num_warps=case.num_warps, num_stages=case.num_stages,
                            expects_tensor_cores=case.expects_tensor_cores,
                            error=outcome.get("error"), **outcome.get("measurements", {}))
        result.failures = failure_reasons(result)
        result.ok = not result.failures
        results.append(result)
    return Report(archs=archs, case_count=len(cases), results=results)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _installed_version(package: str) -> str | None:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return None


def _ptxas_version(arch: int) -> str | None:
    """The ptxas release Triton uses for this arch (3.9 uses its newer ptxas from sm_90 on)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).version
    except Exception:  # a private helper: the report must not depend on it
        return None


# ---------------------------------------------------------------------------
# Presenting the report
# ---------------------------------------------------------------------------

TABLE_COLUMNS = ("kernel", "config", "arch", "warps", "stages", "regs", "spill st/ld B", "stack B",
                 "smem B", "tensor cores", "time s", "status")


def _tensor_core_cell(result: CaseResult) -> str:
    if result.tensor_cores is None:
        return "-"
    if not result.tensor_cores:
        return "no"
    # Show the executed SASS instructions; the PTX forms are in the JSON.
    shown = {name: n for name, n in result.tensor_core_instructions.items() if name.isupper()}
    return " ".join(f"{name}×{n}" for name, n in (shown or result.tensor_core_instructions).items())


def _table_row(result: CaseResult) -> tuple[str, ...]:
    def number(value):
        return "-" if value is None else str(value)

    spills = "-" if result.spill_stores_bytes is None else f"{result.spill_stores_bytes}/{result.spill_loads_bytes}"
    seconds = "-" if result.compile_seconds is None else f"{result.compile_seconds:.2f}"
    return (result.kernel, result.config, result.arch, str(result.num_warps), str(result.num_stages),
            number(result.registers), spills, number(result.stack_bytes), number(result.shared_bytes),
            _tensor_core_cell(result), seconds, "ok" if result.ok else "FAIL")


def format_table(report: Report) -> str:
    rows = [TABLE_COLUMNS] + [_table_row(result) for result in report.results]
    widths = [max(len(row[column]) for row in rows) for column in range(len(TABLE_COLUMNS))]
    numeric = {"warps", "stages", "regs", "spill st/ld B", "stack B", "smem B", "time s"}
    lines = []
    for row in rows:
        cells = [cell.rjust(width) if name in numeric else cell.ljust(width)
                 for name, cell, width in zip(TABLE_COLUMNS, row, widths)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_failures(report: Report) -> str:
    """One line per failing case naming kernel, config, arch and reason; compile
    errors keep a few lines of the compiler's message below."""
    lines = []
    for result in report.failed:
        for reason in result.failures:
            lines.append(f"FAIL {result.label}: {reason}")
        if result.error:
            lines.extend("    " + line for line in result.error.strip().splitlines()[:12])
    return "\n".join(lines)


def parse_archs(text: str) -> list[int]:
    archs = []
    for item in text.split(","):
        digits = item.strip().lower().removeprefix("sm_").removeprefix("sm")
        if not digits.isdigit() or int(digits) not in SHARED_MEMORY_LIMITS:
            raise argparse.ArgumentTypeError(
                f"unknown arch {item.strip()!r}; choose from {','.join(map(str, SHARED_MEMORY_LIMITS))}")
        archs.append(int(digits))
    return archs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastgpt.kernels.report",
        description="Compile every fastgpt Triton kernel at every catalogued config for real GPU targets "
                    "(no GPU needed) and report registers, spills, shared memory and tensor-core use.")
    parser.add_argument("--arch", type=parse_archs, default=list(DEFAULT_ARCHS),
                        help="comma-separated compute capabilities (default: 80,90)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument("--jobs", type=int, default=None, help="compiles at once (default: usable CPU cores)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds before one compile counts as hung (default: %(default)s)")
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                        help="exit 1 if any case fails (default); --no-strict only reports")
    return parser


def main(argv: list[str] | None = None, cases: list[CompileCase] | None = None) -> int:
    """The CLI. `cases` replaces the catalogue (for tests)."""
    args = _parser().parse_args(argv)
    if cases is None:
        cases = all_cases()
    if not cases:
        print("no kernels in the catalogue (fastgpt.kernels.cases.KERNEL_MODULES lists none): nothing to compile")
    else:
        jobs = min(args.jobs or default_jobs(), len(cases) * len(args.arch))
        print(f"compiling {_plural(len(cases), 'case')} × {_plural(len(args.arch), 'arch')} "
              f"on {_plural(jobs, 'worker')}...", file=sys.stderr, flush=True)
    report = build_report(cases, args.arch, jobs=args.jobs, timeout=args.timeout)
    if report.results:
        print(format_table(report))
    if report.failed:
        print()
        print(format_failures(report))
    print(report.summary_line())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report.to_json(), out, indent=2)
            out.write("\n")
    return 1 if args.strict and report.failed else 0


if __name__ == "__main__":
    sys.exit(main())

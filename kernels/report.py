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
- the SASS (instruction mix, tensor-core shapes, TMA): ``nvdisasm`` of the cubin's
  code sections, many kernels per run once all are compiled (its start-up would
  otherwise be most of a small kernel's cost);
- tensor-core instructions: HMMA/HGMMA/... opcodes in that SASS and
  ``mma.sync`` / ``wgmma.mma_async`` in the PTX.

A case fails if it does not compile, spills, needs more shared memory than the
architecture allows one block, or declares ``expects_tensor_cores`` yet emitted no
tensor-core instruction. By default (``--strict``) any failure makes the exit status 1.
Field meanings are documented in kernels/README.md.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import importlib
import inspect
import io
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import platform
import re
import struct
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
from fastgpt.kernels.sass import SASS_INSTRUCTION_RE, TENSOR_CORE, programs_per_sm, sass_profile, smallest_wgmma_n

# Largest shared memory one block may use, static + dynamic (CUDA's
# "max shared memory per block, opt-in"): A100 163 KB, H100/H200 227 KB.
SHARED_MEMORY_LIMITS = {80: 166912, 90: 232448}
DEFAULT_ARCHS = (80, 90)
# A compile that takes longer than this is stuck (real ones take seconds).
DEFAULT_TIMEOUT_S = 600.0

# Tensor-core instructions in PTX. On sm_90 tl.dot becomes wgmma when the tile and
# warp count allow it and falls back to mma.sync (which also runs on tensor cores).
TENSOR_CORE_PTX_PATTERNS = {
    "mma.sync": re.compile(r"(?<![\w.])mma\.sync\b"),
    "wgmma.mma_async": re.compile(r"(?<![\w.])wgmma\.mma_async\b"),
}
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
    expects_min_wgmma_n: int | None = None  # sm_90 only: every HGMMA has N >= this
    expects_tma: bool = False               # sm_90 only: tiles move through TMA (UTMALDG)
    expects_max_dropout_cost: float | None = None  # SASS ≤ this × the p = 0 twin's
    registers: int | None = None
    spill_stores_bytes: int | None = None
    spill_loads_bytes: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    tensor_cores: bool | None = None
    tensor_core_instructions: dict = field(default_factory=dict)
    sass: dict = field(default_factory=dict)            # kernels/sass.py: total, classes, tensor_core_shapes
    programs_per_sm: dict = field(default_factory=dict)  # occupancy: programs, limited_by, warps
    compile_seconds: float | None = None
    triton_version: str | None = None
    ptxas_version: str | None = None
    shapes: list = field(default_factory=list)          # model shapes whose launches compile to this variant
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
    if result.arch == "sm_90" and result.expects_min_wgmma_n and result.sass:
        smallest = smallest_wgmma_n(result.sass)
        if smallest is None or smallest < result.expects_min_wgmma_n:
            shapes = ", ".join(result.sass.get("tensor_core_shapes", {})) or "none"
            reasons.append(f"expects wgmma (HGMMA) with N >= {result.expects_min_wgmma_n}, emitted {shapes}")
    if result.arch == "sm_90" and result.expects_tma and result.sass and not result.sass["classes"].get("tma"):
        reasons.append("expects TMA loads (UTMALDG) but emitted none")
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
    if case.args is not None:
        given = case.fn.arg_names[:len(case.args)] + [n for n in case.fn.arg_names if n in case.constexprs]
        missing = [name for name in case.fn.arg_names if name not in given]
        if missing:
            raise ValueError(f"{case.kernel}: the launch gives no value for arguments {missing}")
        return
    missing = [name for name in case.fn.arg_names if name not in case.signature]
    if missing:
        raise ValueError(f"{case.kernel}: signature lacks arguments {missing}")
    not_constexpr = [name for name in case.constexprs
                     if isinstance(name, str) and case.signature.get(name) != "constexpr"]
    if not_constexpr:
        raise ValueError(f"{case.kernel}: constexprs {not_constexpr} must have type 'constexpr' in the signature")


def aligned_pointer_attrs(case: CompileCase) -> dict:
    """For a case with an explicit signature: mark every pointer argument 16-byte aligned,
    as Triton's launcher does for any tensor whose data_ptr() % 16 == 0 (every fresh torch
    allocation). Without it the compile models an unaligned launch: no vector loads and no
    cp.async pipelining. Same format in Triton 3.6 and 3.9: {(argument index,): [[attribute, value]]}."""
    return {(index,): [["tt.divisibility", 16]]
            for index, name in enumerate(case.fn.arg_names)
            if str(case.signature[name]).startswith("*")}


def launched_source(case: CompileCase, arch: int):
    """(ASTSource, options, (signature, constexprs, attrs)) of the variant Triton's launcher compiles for ``case.args``.

    Runs the launcher's own binder (``create_function_from_signature``) and argument
    packing (``JITFunction._pack_args``) for a target instead of the current device: the
    same rules decide what is specialised (pointers aligned to 16 bytes, integers divisible
    by 16, integers equal to 1 as constants, nothing for ``do_not_specialize``). These are
    Triton internals, present with the same names in Triton 3.6 and 3.9; if a release
    renames them the report fails loudly here rather than compile another variant."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(case.fn.signature, case.fn.params, backend)
    kwargs = dict(case.constexprs, num_warps=case.num_warps, num_stages=case.num_stages)
    bound, specialization, options = binder(*case.args, **kwargs)
    options, signature, constexprs, attrs = case.fn._pack_args(backend, kwargs, bound, specialization, options)
    source = ASTSource(fn=case.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return source, options.__dict__, (signature, constexprs, attrs)


def specialisation_key(case: CompileCase) -> str:
    """What identifies the compiled program of a case: launches with equal keys compile alike."""
    if case.args is None:
        return repr((case.signature, case.constexprs, case.num_warps, case.num_stages))
    _, options, (signature, constexprs, attrs) = launched_source(case, 90)
    return repr((case.fn.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()),
                 options["num_warps"], options["num_stages"]))


def _run_tool(name: str, *args: str) -> str:
    """Run one of the NVIDIA tools Triton bundles (its knobs honour TRITON_<TOOL>_PATH)."""
    path = getattr(triton.knobs.nvidia, name).path
    done = subprocess.run([path, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()[-500:]}")
    return done.stdout


def count_tensor_core_instructions(ptx: str, sass: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for opcode in SASS_INSTRUCTION_RE.findall(sass):
        base = opcode.split(".", 1)[0]
        if base in TENSOR_CORE:
            counts[base] = counts.get(base, 0) + 1
    for name, pattern in TENSOR_CORE_PTX_PATTERNS.items():
        if found := len(pattern.findall(ptx)):
            counts[name] = found
    return counts


@dataclass
class MachineCode:
    """A compiled case's instructions, for nvdisasm: the cubin's code sections and the SASS
    architecture to decode them as (``SM90a`` for sm_90, whose wgmma needs the "a" ISA)."""

    sass_arch: str
    code: bytes


def code_sections(cubin: bytes) -> bytes:
    """The executable sections (``.text.<function>``) of a cubin, concatenated: the raw
    instructions that ``nvdisasm --binary`` reads. A cubin is a 64-bit little-endian ELF."""
    if cubin[:5] != b"\x7fELF\x02":
        raise ValueError("not a 64-bit ELF cubin")
    section_table, = struct.unpack_from("<Q", cubin, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)

    def section(index):  # (name offset, file offset, size) of a section header
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", cubin, section_table + index * entry_size)
        return name, offset, size

    _, names_at, _ = section(names_index)
    code = []
    for index in range(count):
        name_at, offset, size = section(index)
        name = cubin[names_at + name_at:cubin.index(b"\0", names_at + name_at)]
        if name.startswith(b".text."):
            code.append(cubin[offset:offset + size])
    if not code:
        raise ValueError("the cubin has no .text section")
    return b"".join(code)


def sass_arch_of(ptx: str) -> str:
    """nvdisasm's name for the ISA a PTX module targets: ".target sm_90a" -> "SM90a"."""
    found = re.search(r"^\s*\.target\s+sm_(\d+[a-z]?)", ptx, re.MULTILINE)
    if found is None:
        raise RuntimeError("the PTX names no .target sm_XX")
    return f"SM{found.group(1)}"


# One instruction of nvdisasm's output, by its address: "        /*0a30*/   HGMMA..."
_SASS_ADDRESS_RE = re.compile(r"^[ \t]*/\*([0-9a-f]{4,})\*/", re.MULTILINE)


def disassemble(sass_arch: str, codes: list[bytes]) -> list[str]:
    """The SASS of each raw code blob, from one ``nvdisasm`` run over all of them laid end
    to end. nvdisasm costs ~0.3 s to start, most of the work for a small kernel; sm_80+
    instructions are 16 bytes, so the blobs split back by address. ``--no-dataflow``
    skips the branch-stack analysis, which changes labels, not instructions."""
    with tempfile.TemporaryDirectory(prefix="fastgpt-kernel-report-") as scratch:
        path = os.path.join(scratch, "code.bin")
        with open(path, "wb") as out:
            out.write(b"".join(codes))
        text = _run_tool("nvdisasm", "--binary", sass_arch, "--no-dataflow", path)
    starts = list(itertools.accumulate((len(code) for code in codes[:-1]), initial=0))
    lines: list[list[str]] = [[] for _ in codes]
    for found in _SASS_ADDRESS_RE.finditer(text):
        line_end = text.find("\n", found.start())
        lines[bisect.bisect_right(starts, int(found.group(1), 16)) - 1].append(
            text[found.start():line_end if line_end >= 0 else len(text)])
    return ["\n".join(blob) for blob in lines]


def _disassemble_each(sass_arch: str, codes: list[bytes]) -> list:
    """disassemble(), but a batch that fails is redone a kernel at a time, so one bad blob
    fails its own row only: SASS text, or {"error": ...}, per code."""
    try:
        return disassemble(sass_arch, codes)
    except Exception:
        answers = []
        for code in codes:
            try:
                answers.extend(disassemble(sass_arch, [code]))
            except Exception as error:
                answers.append({"error": _error_text(error)})
        return answers


def compile_case(case: CompileCase, arch: int) -> tuple[dict, MachineCode]:
    """Compile one case for one arch: its measurements, all but those read from the SASS
    (``with_sass`` adds them), and its machine code. Raises on compile errors.

    Needs a process whose Triton was imported without TRITON_INTERPRET (see _Worker)."""
    _check_case(case)
    # Always run the whole pipeline: a cache hit would skip ptxas (so no spill log)
    # and report a meaningless compile time.
    triton.knobs.compilation.always_compile = True
    triton.knobs.nvidia.dump_ptxas_log = True
    if case.args is not None:
        source, options, _ = launched_source(case, arch)
    else:
        source = ASTSource(fn=case.fn, signature=dict(case.signature), constexprs=dict(case.constexprs),
                           attrs=aligned_pointer_attrs(case))
        options = {"num_warps": case.num_warps, "num_stages": case.num_stages}
    # Triton prints the ptxas log (and, on a ptxas error, the whole PTX) to stdout.
    captured = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(captured):
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.perf_counter() - started

    spill_lines = PTXAS_SPILLS_RE.findall(captured.getvalue())
    if not spill_lines:
        raise RuntimeError("no `ptxas -v` log was captured, so spills are unknown "
                           "(has this Triton version changed knobs.nvidia.dump_ptxas_log?)")
    ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
    with tempfile.TemporaryDirectory(prefix="fastgpt-kernel-report-") as scratch:
        cubin_path = os.path.join(scratch, "kernel.cubin")
        with open(cubin_path, "wb") as out:
            out.write(cubin)
        usage = RESOURCE_USAGE_RE.search(_run_tool("cuobjdump", "-res-usage", cubin_path))
    if usage is None:
        raise RuntimeError("cuobjdump -res-usage printed no REG/STACK/SHARED line")
    registers, stack, static_shared = map(int, usage.groups())
    # The launcher requests metadata.shared bytes of dynamic shared memory on top of
    # the cubin's static shared memory (e.g. alignment padding on sm_90).
    shared = (kernel.metadata.shared or 0) + static_shared
    measurements = {
        "registers": registers,
        # One "Function properties" block per function (the kernel and any noinline callee).
        "spill_stores_bytes": sum(int(stores) for _, stores, _ in spill_lines),
        "spill_loads_bytes": sum(int(loads) for _, _, loads in spill_lines),
        "stack_bytes": stack,
        "shared_bytes": shared,
        "tensor_core_instructions": count_tensor_core_instructions(ptx, ""),
        "programs_per_sm": programs_per_sm(arch, registers, case.num_warps, shared),
        "compile_seconds": round(seconds, 3),
        "triton_version": triton.__version__,
        "ptxas_version": _ptxas_version(arch),
    }
    return measurements, MachineCode(sass_arch_of(ptx), code_sections(cubin))


def with_sass(measurements: dict, sass: str) -> dict:
    """Measurements plus what the SASS says: the instruction mix and the tensor-core opcodes."""
    instructions = {**measurements["tensor_core_instructions"], **count_tensor_core_instructions("", sass)}
    return {**measurements, "tensor_core_instructions": instructions, "tensor_cores": bool(instructions),
            "sass": sass_profile(sass)}


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


def _worker_loop(connection, triton_site) -> None:
    """A compiler worker. Jobs, each answered {"error": ...} if it raises:
    ("compile", (case with a KernelRef, arch)) -> {"measurements": ..., "machine_code": MachineCode};
    ("disassemble", (sass_arch, [code, ...])) -> {"sass": [SASS text or {"error": ...}, ...]};
    ("keys", [cases]) -> {"keys": [(key or None, error or None), ...]}; None ends it."""
    # Triton 3.9 warns that its FP-fusion default changes in 3.10. The report compiles
    # with whatever default the library's own launches get; the warning would only
    # repeat once per worker.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    while (job := connection.recv()) is not None:
        kind, payload = job
        try:
            _check_triton_site(triton_site)
            if kind == "keys":
                outcome = {"keys": [_key_or_error(case) for case in payload]}
            elif kind == "disassemble":
                outcome = {"sass": _disassemble_each(*payload)}
            else:
                case, arch = payload
                measurements, machine_code = compile_case(dataclasses.replace(case, fn=case.fn.load()), arch)
                outcome = {"measurements": measurements, "machine_code": machine_code}
        except Exception as error:  # a compile error is a result, not a crash
            outcome = {"error": _error_text(error)}
        connection.send(outcome)


def _key_or_error(case):
    try:
        return specialisation_key(dataclasses.replace(case, fn=case.fn.load())), None
    except Exception as error:
        return None, _error_text(error)


def _check_triton_site(triton_site) -> None:
    if triton_site and not os.path.abspath(triton.__file__).startswith(os.path.abspath(triton_site) + os.sep):
        raise RuntimeError(f"asked for the Triton in {triton_site} but imported {triton.__file__}")


@contextlib.contextmanager
def _worker_environment(triton_site):
    """While a worker process starts: hide TRITON_INTERPRET (the worker inherits the
    environment and reads it when it imports Triton, and in code generation), and put
    ``triton_site`` (a folder holding another Triton) first on its import path. A spawned
    process starts with its parent's sys.path, so that is where the folder goes."""
    saved_interpret = os.environ.pop("TRITON_INTERPRET", None)
    saved_path = list(sys.path)
    if triton_site:
        sys.path.insert(0, os.path.abspath(triton_site))
    try:
        yield
    finally:
        sys.path[:] = saved_path
        if saved_interpret is not None:
            os.environ["TRITON_INTERPRET"] = saved_interpret


class _Worker:
    """One spawned compiler process, reused for job after job (its start-up imports
    torch and Triton: about two seconds)."""

    def __init__(self, context, triton_site=None):
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_worker_loop, args=(child_end, triton_site), daemon=True)
        with _worker_environment(triton_site):
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


def _run_in_workers(jobs: list[tuple[str, object]], workers: int, timeout: float,
                    triton_site: str | None = None) -> list[dict]:
    """Run every job ("compile" or "disassemble", see _worker_loop) on up to `workers`
    spawned processes; one outcome per job, in order.

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
                worker = idle.pop() if idle else _Worker(context, triton_site)
                try:
                    worker.give(index, jobs[index])  # pickles the case: a constexpr value might not pickle
                except Exception as error:
                    outcomes[index] = {"error": f"cannot send the case to a compiler process: {_error_text(error)}"}
                    idle.append(worker)
                    continue
                busy[worker.connection] = worker
            # Wake up by the earliest deadline, so a stuck compile is stopped on time.
            first_deadline = min((w.job_started + timeout for w in busy.values()), default=time.monotonic() + 1.0)
            wait_s = max(0.01, min(1.0, first_deadline - time.monotonic()))
            for connection in multiprocessing.connection.wait(list(busy), timeout=wait_s):
                worker = busy.pop(connection)
                try:
                    outcomes[worker.job_index] = connection.recv()
                    idle.append(worker)
                except (EOFError, OSError):  # OSError: a reset pipe, the same death seen sooner
                    worker.process.join()
                    outcomes[worker.job_index] = {
                        "error": f"the compiler process died (exit code {worker.process.exitcode})"}
                    worker.stop(force=True)
            for connection, worker in list(busy.items()):
                if time.monotonic() - worker.job_started > timeout:
                    del busy[connection]
                    worker.stop(force=True)
                    work = "compilation" if jobs[worker.job_index][0] == "compile" else "disassembly"
                    outcomes[worker.job_index] = {"error": f"{work} timed out after {timeout:g} s"}
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

    @property
    def triton_versions(self) -> list[str]:
        return list(dict.fromkeys(r.triton_version for r in self.results if r.triton_version))

    def summary_line(self) -> str:
        not_compiled = f" ({self.compile_error_count} did not compile)" if self.compile_error_count else ""
        versions = f" with Triton {', '.join(self.triton_versions)}" if self.triton_versions else ""
        # Cases whose launches bind to one specialisation share a row (kernels/cases.py).
        variants = len({(r.kernel, r.config, tuple(r.shapes)) for r in self.results})
        merged = f" ({_plural(variants, 'distinct variant')})" if 0 < variants < self.case_count else ""
        return (f"{_plural(self.case_count, 'case')}{merged} × {_plural(len(self.archs), 'arch')} compiled"
                f"{versions}{not_compiled}, {_plural(self.spill_count, 'spill')}, "
                f"{_plural(len(self.failed), 'failure')}")

    def dropout_cost(self) -> list[dict]:
        """SASS instructions of each ``X+dropout`` row over its twin ``X`` (see dropout_twins)."""
        return [{"kernel": without.kernel, "config": without.config, "arch": without.arch,
                 "triton_version": without.triton_version, "shapes": without.shapes,
                 "without": without.sass["total"], "with": with_dropout.sass["total"],
                 "ratio": round(with_dropout.sass["total"] / without.sass["total"], 3)}
                for with_dropout, without in dropout_twins(self.results) if without is not None]

    def to_json(self) -> dict:
        return {
            "tool": "fastgpt.kernels.report",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "triton_version": triton.__version__,
            "triton_versions": self.triton_versions,
            "torch_version": _installed_version("torch"),
            "python_version": platform.python_version(),
            "archs": [arch_name(arch) for arch in self.archs],
            "ptxas_versions": {f"{r.triton_version} {r.arch}": r.ptxas_version for r in self.results
                               if r.triton_version},
            "shared_memory_limits": {arch_name(arch): SHARED_MEMORY_LIMITS[arch] for arch in self.archs},
            "cases": [asdict(result) for result in self.results],
            "dropout_cost": self.dropout_cost(),
            "summary": self.summary(),
        }


def _site_version(triton_site) -> str | None:
    """The version of the installed Triton (site None) or of the one in a folder, without importing it."""
    if not triton_site:
        return triton.__version__
    with contextlib.suppress(OSError):
        text = open(os.path.join(triton_site, "triton", "__init__.py"), encoding="utf-8").read()
        if found := re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", text):
            return found.group(1)
    return None


def _bind_keys(cases: list[CompileCase], triton_site, timeout: float) -> list[tuple]:
    """(specialisation key or None, error or None) per case. Launch-described cases are bound
    by Triton's launcher code in one worker process; a case with an explicit signature is its
    own variant (fixtures: never merged)."""
    outcome = [(("explicit", index), None) for index in range(len(cases))]
    refs, pending = [], []
    for index, case in enumerate(cases):
        if case.args is None:
            continue
        try:
            ref = dataclasses.replace(case, fn=KernelRef.of(case.fn))
            pickle.dumps(ref)
        except Exception as error:
            outcome[index] = (None, _error_text(error))
            continue
        refs.append(ref)
        pending.append(index)
    if not refs:
        return outcome
    worker = _Worker(multiprocessing.get_context("spawn"), triton_site)
    try:
        worker.connection.send(("keys", refs))
        if not worker.connection.poll(timeout):
            raise RuntimeError(f"binding the cases timed out after {timeout:g} s")
        reply = worker.connection.recv()
    finally:
        worker.stop()
    if "error" in reply:
        raise RuntimeError(f"cannot bind the cases with Triton{' in ' + triton_site if triton_site else ''}: "
                           f"{reply['error']}")
    for index, key in zip(pending, reply["keys"]):
        outcome[index] = tuple(key)
    return outcome


# Kernels per nvdisasm run: its ~0.3 s start-up is paid once per batch, not per kernel.
DISASSEMBLY_BATCH = 32


def _compile_jobs(work: list[tuple[CompileCase, int]]) -> tuple[dict, dict]:
    """{index: ("compile", (case with a KernelRef, arch))} for each (case, arch) of work, and
    {index: {"error": ...}} for each that cannot become a job (its kernel cannot be imported by name)."""
    jobs, failed = {}, {}
    for index, (case, arch) in enumerate(work):
        try:
            jobs[index] = ("compile", (dataclasses.replace(case, fn=KernelRef.of(case.fn)), arch))
        except Exception as error:
            failed[index] = {"error": _error_text(error)}
    return jobs, failed


def _compile_and_disassemble(work: list[tuple[CompileCase, int]], workers: int, timeout: float,
                             triton_site) -> list[dict]:
    """One outcome per (case, arch): {"measurements": ...} or {"error": ...}. Compiles on the
    workers, then disassembles the machine code there in batches of one SASS architecture."""
    jobs, outcomes = _compile_jobs(work)
    outcomes.update(zip(jobs, _run_in_workers(list(jobs.values()), workers, timeout, triton_site)))
    by_arch: dict[str, list[int]] = {}
    for index, outcome in sorted(outcomes.items()):
        if "machine_code" in outcome:
            by_arch.setdefault(outcome["machine_code"].sass_arch, []).append(index)
    batches = [(sass_arch, members[start:start + DISASSEMBLY_BATCH]) for sass_arch, members in by_arch.items()
               for start in range(0, len(members), DISASSEMBLY_BATCH)]
    disassembly_jobs = [("disassemble", (sass_arch, [outcomes[i]["machine_code"].code for i in members]))
                        for sass_arch, members in batches]
    for (_, members), done in zip(batches, _run_in_workers(disassembly_jobs, workers, timeout, triton_site)):
        for position, index in enumerate(members):
            sass = done["sass"][position] if "sass" in done else done  # else the worker died or hung
            if isinstance(sass, dict):  # compiled, but its SASS could not be read
                outcomes[index] = {"error": f"compiled, but its disassembly failed: {sass['error']}"}
            else:
                outcomes[index] = {"measurements": with_sass(outcomes[index]["measurements"], sass)}
    return [outcomes[index] for index in range(len(work))]


def build_report(cases: list[CompileCase], archs=DEFAULT_ARCHS, jobs: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, triton_sites=(None,)) -> Report:
    """Compile every case for every arch, with the installed Triton (site None) and with each
    other Triton folder in ``triton_sites``, and check each result. Cases whose launches
    bind to the same specialisation (a ragged shape that launches the GPT-2 variant, say)
    compile once: their row lists every shape. Never raises for a bad case: its failure
    is recorded in its row."""
    archs = list(archs)
    unknown = [arch for arch in archs if arch not in SHARED_MEMORY_LIMITS]
    if unknown:
        raise ValueError(f"no shared-memory limit known for archs {unknown}; known: {sorted(SHARED_MEMORY_LIMITS)}")
    results = []
    for site in triton_sites:
        groups: dict = {}  # specialisation key -> indices of the cases that bind to it, in catalogue order
        errors = {}
        for index, (key, error) in enumerate(_bind_keys(cases, site, timeout) if cases else []):
            if error is not None:
                errors[index] = error
            else:
                groups.setdefault(key, []).append(index)
        representatives = sorted([members[0] for members in groups.values()] + list(errors))
        members_of = {members[0]: members for members in groups.values()}
        def archs_of(case):
            return [arch for arch in archs if case.archs is None or arch in case.archs]

        work = [(cases[index], arch) for index in representatives if index not in errors
                for arch in archs_of(cases[index])]
        outcomes = iter(_compile_and_disassemble(work, max(1, jobs or default_jobs()), timeout, site))
        for index in representatives:
            case = cases[index]
            shapes = [cases[i].shape for i in members_of.get(index, [index]) if cases[i].shape]
            for arch in archs_of(case):
                outcome = {"error": errors[index]} if index in errors else next(outcomes)
                measured = outcome.get("measurements", {})
                measured.setdefault("triton_version", _site_version(site))
                result = CaseResult(kernel=case.kernel, config=config_label(case), arch=arch_name(arch),
                                    num_warps=case.num_warps, num_stages=case.num_stages,
                                    expects_tensor_cores=case.expects_tensor_cores, shapes=shapes,
                                    expects_min_wgmma_n=case.expects_min_wgmma_n, expects_tma=case.expects_tma,
                                    expects_max_dropout_cost=case.expects_max_dropout_cost,
                                    error=outcome.get("error"), **measured)
                result.failures = failure_reasons(result)
                results.append(result)
    built = Report(archs=archs, case_count=len(cases), results=results)
    _check_dropout_costs(built)
    for result in results:
        result.ok = not result.failures
    return built


def dropout_twins(results: list[CaseResult]) -> list[tuple[CaseResult, CaseResult | None]]:
    """Each compiled ``X+dropout`` row with its twin ``X``: the same config, arch, Triton and
    shapes (a config label alone can name two variants: N = 96 and N = 100 at BLOCK_N = 128),
    or None where the report holds no such row."""
    def key(result, kernel):
        return kernel, result.config, result.arch, result.triton_version, tuple(result.shapes)
    by_key = {key(r, r.kernel): r for r in results if r.sass}
    return [(r, by_key.get(key(r, r.kernel.replace("+dropout", "")))) for r in results
            if r.sass and "+dropout" in r.kernel]


def _check_dropout_costs(built: "Report") -> None:
    """Fail each ``X+dropout`` row that expects a dropout cost and needs more SASS instructions
    than that many times its twin ``X``; a missing twin is a failure too."""
    for result, without in dropout_twins(built.results):
        limit = result.expects_max_dropout_cost
        if limit is None:
            continue
        if without is None:
            result.failures.append("expects a dropout cost but its p = 0 twin is not in the report")
        elif result.sass["total"] > limit * without.sass["total"]:
            result.failures.append(f"dropout costs {result.sass['total'] / without.sass['total']:.2f}× the SASS "
                                   f"instructions of its p = 0 twin ({result.sass['total']} vs "
                                   f"{without.sass['total']}), over {limit}×")


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

TABLE_COLUMNS = ("kernel", "config", "shapes", "arch", "triton", "warps", "stages", "regs", "spill st/ld B",
                 "smem B", "progs/SM", "SASS", "tensor cores", "MUFU", "int ALU", "LDG/LDGSTS/TMA", "status")
_NUMERIC_COLUMNS = {"warps", "stages", "regs", "spill st/ld B", "smem B", "progs/SM", "SASS", "MUFU", "int ALU"}


def _tensor_core_cell(result: CaseResult) -> str:
    if result.tensor_cores is None:
        return "-"
    if not result.tensor_cores:
        return "no"
    shapes = result.sass.get("tensor_core_shapes") if result.sass else None
    if shapes:  # executed SASS instructions with their M×N×K shape, dtype suffixes dropped
        merged: dict = {}
        for opcode, n in shapes.items():
            short = ".".join(opcode.split(".")[:2])
            merged[short] = merged.get(short, 0) + n
        return " ".join(f"{name}×{n}" for name, n in merged.items())
    shown = {name: n for name, n in result.tensor_core_instructions.items() if name.isupper()}
    return " ".join(f"{name}×{n}" for name, n in (shown or result.tensor_core_instructions).items())


def _table_row(result: CaseResult) -> tuple[str, ...]:
    def number(value):
        return "-" if value is None else str(value)

    classes = result.sass.get("classes", {}) if result.sass else {}

    def count(*names):
        return "-" if not result.sass else str(sum(classes.get(name, 0) for name in names))

    spills = "-" if result.spill_stores_bytes is None else f"{result.spill_stores_bytes}/{result.spill_loads_bytes}"
    loads = "-" if not result.sass else "/".join(
        str(classes.get(name, 0)) for name in ("global_load", "cp_async", "tma"))
    programs = result.programs_per_sm.get("programs") if result.programs_per_sm else None
    shapes = "+".join(shape.split()[0] for shape in result.shapes) or "-"
    return (result.kernel, result.config, shapes, result.arch, result.triton_version or "-",
            str(result.num_warps), str(result.num_stages), number(result.registers), spills,
            number(result.shared_bytes), number(programs), number(result.sass.get("total") if result.sass else None),
            _tensor_core_cell(result), count("mufu"), count("int_alu"), loads, "ok" if result.ok else "FAIL")


def format_table(report: Report) -> str:
    rows = [TABLE_COLUMNS] + [_table_row(result) for result in report.results]
    widths = [max(len(row[column]) for row in rows) for column in range(len(TABLE_COLUMNS))]
    lines = []
    for row in rows:
        cells = [cell.rjust(width) if name in _NUMERIC_COLUMNS else cell.ljust(width)
                 for name, cell, width in zip(TABLE_COLUMNS, row, widths)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_dropout_cost(report: Report) -> str:
    """Per kernel, arch and Triton: the largest ratio of SASS instructions with dropout to without."""
    worst: dict = {}
    for pair in report.dropout_cost():
        key = (pair["kernel"], pair["arch"], pair["triton_version"])
        if key not in worst or pair["ratio"] > worst[key]["ratio"]:
            worst[key] = pair
    lines = [f"dropout cost: {kernel} {arch} Triton {version}: at most {pair['ratio']:.2f}× the SASS instructions "
             f"({pair['with']} vs {pair['without']}, {pair['config']}, {' + '.join(pair['shapes']) or 'no shape'})"
             for (kernel, arch, version), pair in sorted(worst.items())]
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
    parser.add_argument("--kernel", metavar="REGEX", default=None,
                        help="only the cases whose kernel name matches REGEX (re.search), e.g. 'attention_fwd'")
    parser.add_argument("--config", metavar="REGEX", default=None,
                        help="only the cases whose config label matches REGEX, e.g. 'bf16 d=64'")
    parser.add_argument("--triton", metavar="DIR", action="append", default=[],
                        help="also compile with the Triton installed in DIR (e.g. `pip install --target DIR "
                             "triton==3.6.0`); repeatable. The installed Triton always runs first")
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                        help="exit 1 if any case fails (default); --no-strict only reports")
    return parser


def main(argv: list[str] | None = None, cases: list[CompileCase] | None = None) -> int:
    """The CLI. `cases` replaces the catalogue (for tests)."""
    args = _parser().parse_args(argv)
    if cases is None:
        cases = all_cases()
    if args.kernel:
        cases = [case for case in cases if re.search(args.kernel, case.kernel)]
    if args.config:
        cases = [case for case in cases if re.search(args.config, config_label(case))]
    if not cases:
        print("no kernels in the catalogue (fastgpt.kernels.cases.KERNEL_MODULES lists none): nothing to compile")
    else:
        jobs = min(args.jobs or default_jobs(), len(cases) * len(args.arch))
        print(f"compiling {_plural(len(cases), 'case')} × {_plural(len(args.arch), 'arch')} "
              f"on {_plural(jobs, 'worker')}...", file=sys.stderr, flush=True)
    for site in args.triton:
        if not os.path.isfile(os.path.join(site, "triton", "__init__.py")):
            print(f"--triton {site}: no triton package in that folder "
                  f"(install one with: pip install --target {site} triton==3.6.0)", file=sys.stderr)
            return 2
    report = build_report(cases, args.arch, jobs=args.jobs, timeout=args.timeout,
                          triton_sites=[None, *args.triton])
    if report.results:
        print(format_table(report))
        if cost := format_dropout_cost(report):
            print()
            print(cost)
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

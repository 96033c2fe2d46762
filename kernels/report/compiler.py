"""Compiling one case for one GPU target, and reading what the compiler produced.

A case is compiled by ``triton.compile`` for a ``GPUTarget`` (no driver is
queried), as the variant Triton's own launcher would build for its arguments
(``launched_source``), and read with the NVIDIA tools Triton bundles:

- registers, stack and static shared memory: ``cuobjdump -res-usage`` on the cubin;
- spill stores and loads: the ``ptxas -v`` log of the very ptxas run that built the
  cubin (Triton prints it when ``knobs.nvidia.dump_ptxas_log`` is on; we capture it);
- dynamic shared memory: Triton's ``metadata.shared`` (what the launcher requests);
- the SASS (instruction mix, tensor-core shapes, TMA): ``nvdisasm`` of the cubin's
  code sections (``code_sections``), many kernels per run (``disassemble``);
- tensor-core instructions: HMMA/HGMMA/... opcodes in that SASS and
  ``mma.sync`` / ``wgmma.mma_async`` in the PTX.

Everything here runs in a compiler worker process (``workers.py``), whose Triton
was imported without TRITON_INTERPRET.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import itertools
import os
import re
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from .case import CompileCase
from .sass import SASS_INSTRUCTION_RE, TENSOR_CORE, programs_per_sm, sass_profile

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


def run_tool(name: str, *args: str) -> str:
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
    to end. nvdisasm's start-up is most of the work for a small kernel; sm_80+
    instructions are 16 bytes, so the blobs split back by address. ``--no-dataflow``
    skips the branch-stack analysis, which changes labels, not instructions."""
    with tempfile.TemporaryDirectory(prefix="fastgpt-kernel-report-") as scratch:
        path = os.path.join(scratch, "code.bin")
        with open(path, "wb") as out:
            out.write(b"".join(codes))
        text = run_tool("nvdisasm", "--binary", sass_arch, "--no-dataflow", path)
    starts = list(itertools.accumulate((len(code) for code in codes[:-1]), initial=0))
    lines: list[list[str]] = [[] for _ in codes]
    for found in _SASS_ADDRESS_RE.finditer(text):
        line_end = text.find("\n", found.start())
        lines[bisect.bisect_right(starts, int(found.group(1), 16)) - 1].append(
            text[found.start():line_end if line_end >= 0 else len(text)])
    return ["\n".join(blob) for blob in lines]


def disassemble_each(sass_arch: str, codes: list[bytes]) -> list:
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
                answers.append({"error": error_text(error)})
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
        usage = RESOURCE_USAGE_RE.search(run_tool("cuobjdump", "-res-usage", cubin_path))
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


def error_text(error: BaseException) -> str:
    # Triton's CompilationError text starts "at LINE:COL:" and needs no type name;
    # a ptxas error carries its whole log, so keep the JSON readable.
    text = str(error).strip() or type(error).__name__
    text = text if text.startswith("at ") else f"{type(error).__name__}: {text}"
    return text[:MAX_ERROR_CHARS]



def _ptxas_version(arch: int) -> str | None:
    """The ptxas release Triton uses for this arch (3.9 uses its newer ptxas from sm_90 on)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).version
    except Exception:  # a private helper: the report must not depend on it
        return None

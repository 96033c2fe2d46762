"""Reading a kernel's machine code: the SASS instruction mix, and how many programs fit on one SM.

Until a GPU measures a kernel, its SASS (``nvdisasm`` of the cubin) is the
evidence for speed: tensor-core instructions and their shapes (HGMMA with N ≥ 64
on sm_90), TMA (``UTMALDG``) or ``cp.async`` (``LDGSTS``) loads, integer and
special-function (MUFU) work, and registers and shared memory per program,
which bound how many programs share an SM (occupancy).

Counts are static: instructions in the binary, not executed ones. Loops and
their unrolled bodies count once per copy, so comparing two variants of one
kernel (with and without dropout, say) compares the code each step runs.
"""

from __future__ import annotations

import re
from collections import Counter

# One instruction line of nvdisasm: "/*0a30*/  @!P0 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], ..."
SASS_INSTRUCTION_RE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")

TENSOR_CORE = {"HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "DMMA", "BMMA", "HMMA2"}
# Classes by base opcode (before the first "."); anything unlisted counts as "other".
CLASSES = {
    "tensor_core": TENSOR_CORE,
    "mufu": {"MUFU"},
    "fp_alu": {"FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FRND", "FSWZADD",
               "HADD2", "HFMA2", "HMUL2", "HMNMX2", "HSETP2", "HSET2", "DADD", "DMUL", "DFMA"},
    "convert": {"F2F", "F2I", "I2F", "F2FP", "I2FP", "F2IP", "I2I", "I2IP"},
    "int_alu": {"IMAD", "IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "IMNMX", "LEA", "IABS",
                "POPC", "FLO", "BREV", "PRMT", "SGXT", "BMSK", "IMUL", "IDP", "VIADD", "VIMNMX", "VIADDMNMX",
                "ISCADD", "IMADSP", "BFE", "BFI"},
    "move": {"MOV", "SEL", "P2R", "R2P", "S2R", "CS2R", "MOVM", "PLOP3", "VOTE", "VOTEU"},
    "shuffle": {"SHFL"},
    "global_load": {"LDG"},
    "global_store": {"STG"},
    "cp_async": {"LDGSTS", "LDGDEPBAR"},
    "tma": {"UTMALDG", "UTMASTG", "UTMAPF", "UTMACCTL", "UTMACMDFLUSH", "UBLKCP", "UBLKRED", "UBLKPF"},
    "shared_load": {"LDS", "LDSM"},
    "shared_store": {"STS", "STSM"},
    "local": {"LDL", "STL"},
    "atomic": {"ATOM", "ATOMG", "ATOMS", "RED", "REDG"},
    "barrier": {"BAR", "SYNCS", "DEPBAR", "WARPSYNC", "WARPGROUP", "MEMBAR", "ERRBAR", "FENCE", "CCTL",
                "ARRIVES", "BSSY", "BSYNC"},
    "control": {"BRA", "EXIT", "CALL", "RET", "NOP", "YIELD", "BPT", "JMP", "JMX", "BRX", "KILL"},
}
_CLASS_OF = {opcode: name for name, opcodes in CLASSES.items() for opcode in opcodes}


def instruction_class(opcode: str) -> str:
    base = opcode.split(".", 1)[0]
    if base in _CLASS_OF:
        return _CLASS_OF[base]
    if base.startswith("U") or base in ("R2UR", "S2UR"):
        return "uniform"  # the uniform datapath: once per warp, not per thread
    return "other"


def sass_profile(sass: str) -> dict:
    """Total instructions, counts by class, and the tensor-core instructions by full shape."""
    opcodes = SASS_INSTRUCTION_RE.findall(sass)
    classes = Counter(instruction_class(op) for op in opcodes)
    shapes = Counter(op for op in opcodes if op.split(".", 1)[0] in TENSOR_CORE)
    return {"total": len(opcodes), "classes": dict(sorted(classes.items())), "tensor_core_shapes": dict(shapes)}


_WGMMA_SHAPE_RE = re.compile(r"^[A-Z]+GMMA\.(\d+)x(\d+)x(\d+)")


def smallest_wgmma_n(profile: dict) -> int | None:
    """The smallest N of the HGMMA/QGMMA/IGMMA shapes (M×N×K) in a profile, or None without any."""
    ns = [int(m.group(2)) for op in profile.get("tensor_core_shapes", {}) if (m := _WGMMA_SHAPE_RE.match(op))]
    return min(ns) if ns else None


# Per-SM limits of the architectures the report targets (CUDA's occupancy rules):
# 64K registers allocated per warp in units of 256, shared memory per SM with 1 KB
# reserved per resident block, 2048 threads and 32 blocks.
SM_LIMITS = {80: {"registers": 65536, "shared": 167936, "threads": 2048, "blocks": 32},
             90: {"registers": 65536, "shared": 233472, "threads": 2048, "blocks": 32}}
_SHARED_RESERVED_PER_BLOCK = 1024


def programs_per_sm(arch: int, registers: int, num_warps: int, shared_bytes: int) -> dict:
    """How many programs (CTAs) of this kernel one SM holds at once, and which resource limits it."""
    limits = SM_LIMITS[arch]
    registers_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    bounds = {
        "registers": (limits["registers"] // registers_per_warp) // num_warps,
        "shared": limits["shared"] // (shared_bytes + _SHARED_RESERVED_PER_BLOCK),
        "threads": limits["threads"] // (32 * num_warps),
        "blocks": limits["blocks"],
    }
    limiter = min(bounds, key=bounds.get)
    return {"programs": bounds[limiter], "limited_by": limiter, "warps": bounds[limiter] * num_warps}

"""The catalogue of compile cases: every kernel × specialisation the library can launch.

Each kernel module under ``kernels/`` defines ``compile_cases() -> list[CompileCase]``
listing every configuration it can launch (block sizes, warps, dtypes, constexpr
flags). ``python -m fastgpt.kernels.report`` compiles each case ahead of time for
sm_80 and sm_90 on a machine with no GPU and reports registers, spills, shared
memory and tensor-core use. Importing this file does not import Triton;
``all_cases()`` does (through the kernel modules).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

# Kernel modules (under fastgpt.kernels) that define compile_cases().
KERNEL_MODULES: tuple[str, ...] = ("layer_norm", "gelu", "attention", "decode_attention")


@dataclass(frozen=True)
class CompileCase:
    kernel: str                       # display name, e.g. "layer_norm_fwd"
    fn: object                        # the @triton.jit function
    signature: dict                   # every argument name -> Triton type: "*fp32", "*bf16", "i32", "fp32", "constexpr"
    constexprs: dict = field(default_factory=dict)  # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 3
    config: str = ""                  # human-readable label, e.g. "BLOCK_N=1024 bf16"
    expects_tensor_cores: bool = False  # True for kernels built on tl.dot


def all_cases() -> list[CompileCase]:
    cases: list[CompileCase] = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"fastgpt.kernels.{name}")
        cases.extend(module.compile_cases())
    return cases

"""A compile case: one kernel × one specialisation the library can launch, and what it must show.

The catalogue (``catalogue.py``) lists every configuration each kernel can launch
(block sizes, warps, dtypes, constexpr flags) as a ``CompileCase``;
``python -m fastgpt.kernels.report`` compiles each ahead of time for sm_80 and
sm_90 on a machine with no GPU and reports registers, spills, shared memory, the
instruction mix and occupancy. Importing this file does not import Triton.

A case is best described by a *launch*: the arguments the library's launcher
passes (on meta tensors of a real model's shapes). The report then binds them
with Triton's own launcher code, so integer arguments that are multiples of 16
are compiled as divisible by 16, 1 as a constant, and ``do_not_specialize``
arguments as plain integers -- exactly the variant that runs. A case may instead
give an explicit ``signature`` (the report's own test fixtures do).
"""

from __future__ import annotations

from dataclasses import dataclass, field

_LAUNCH_OPTIONS = ("num_warps", "num_stages")

# Constexprs that specialise a launch on its integers, as Triton's own "divisible by 16" does
# (layer_norm's ROW_ALIGN: the power of two dividing the width and row strides). The catalogue
# compiles them at the shapes it lists (GPT-2's widths and two ragged ones); a launch matches a case
# whatever their value, as it does whatever its strides' divisibility.
INTEGER_SPECIALISATIONS = frozenset({"ROW_ALIGN"})


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument of a launch, as Triton's launcher sees it: a dtype and a 16-byte-aligned address."""

    dtype: object  # torch.dtype

    def data_ptr(self) -> int:
        return 0

    @property
    def type_name(self) -> str:
        return "*" + {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64",
                      "int32": "i32"}[str(self.dtype).removeprefix("torch.")]


@dataclass(frozen=True)
class Pruning:
    """How a launcher that chooses its config by shared memory (attention: ``attention_configs.candidates``)
    treats this case on the archs the report checks from sm_80's compile (sm_86, sm_89: 99 KB per block).
    The launcher keeps the configs of one tuned list whose estimate fits the device, or the list's last
    entry when none does; the report holds each kept config's compiled shared memory to the limit."""

    group: str         # the configs one launch chooses among (one tuned list), e.g. "attention_fwd fp16 d=64"
    size: int          # how many configs that list holds (a filtered report may hold fewer)
    estimate: int      # the launcher's estimate of this config's shared memory, bytes (Config.shared_bytes)
    last: bool         # the list's last entry: kept when the estimate prunes every config
    pinned: bool = False  # also the pinned tile, launched unpruned (the tests, FASTGPT_ATTENTION_PINNED=1)


@dataclass(frozen=True)
class CompileCase:
    kernel: str                       # display name, e.g. "layer_norm_fwd"
    fn: object                        # the @triton.jit function
    signature: dict | None = None     # explicit types, arg -> "*fp32"/"i32"/"fp32"/"constexpr" (or None: from args)
    constexprs: dict = field(default_factory=dict)  # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 3
    config: str = ""                  # human-readable label, e.g. "BLOCK_N=1024 bf16"
    expects_tensor_cores: bool = False  # True for kernels built on tl.dot
    args: tuple | None = None         # a launch's positional arguments (TensorArg for tensors)
    shape: str = ""                   # which model shape the launch's arguments come from
    archs: tuple | None = None        # the compute capabilities that launch it (None: all); TMA needs 90
    expects_min_wgmma_n: int | None = None  # on sm_90, fail unless every HGMMA has N >= this
    expects_tma: bool = False               # on sm_90, fail unless tiles move through TMA
    expects_max_dropout_cost: float | None = None  # fail if SASS > this × its p = 0 twin's
    representative: bool = False      # in the subset every Triton compiles (catalogue.representative_cases)
    pruning: Pruning | None = None    # chosen by shared memory on sm_86/sm_89 (None: launched on every card)

    @classmethod
    def of_launch(cls, kernel: str, fn, launch, **fields) -> "CompileCase":
        """A case from a launcher's (grid, positional arguments, keyword arguments)."""
        _, args, meta = launch
        args = tuple(TensorArg(a.dtype) if hasattr(a, "data_ptr") else a for a in args)
        constexprs = {k: v for k, v in meta.items() if k not in _LAUNCH_OPTIONS}
        return cls(kernel=kernel, fn=fn, constexprs=constexprs, args=args,
                   num_warps=meta.get("num_warps", 4), num_stages=meta.get("num_stages", 3), **fields)

    @property
    def pointer_types(self) -> dict:
        """Pointer argument name -> Triton type ("*bf16", ...)."""
        if self.args is not None:
            return {name: a.type_name for name, a in zip(self.fn.arg_names, self.args) if isinstance(a, TensorArg)}
        return {name: t for name, t in self.signature.items() if str(t).startswith("*")}


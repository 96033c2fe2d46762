"""Building the report: every case compiled for every arch and Triton, each row checked against its expectations.

A row fails if its case does not compile, spills, needs more shared memory than
the architecture allows one block, declares ``expects_tensor_cores`` yet emitted
no tensor-core instruction, misses its sm_90 expectations (wgmma width, TMA), or
is an ``X+dropout`` row over its dropout cost against its twin ``X``. Field
meanings are documented in kernels/README.md.

sm_86 and sm_89 (RTX 30 and 40) run sm_80's instructions with 99 KB of shared
memory per block: they are held from the sm_80 compile, without compiling again
(``check_derived_archs``). An sm_80 row fails there if its config is launched on
such a card (no launcher prunes it, or the launcher's estimate keeps it, or it is
the list's fallback) and needs more than 99 KB; a tuned list none of whose kept
configs fits fails as a launch group.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata as package_metadata

import triton

from .case import CompileCase
from .sass import smallest_wgmma_n
from .workers import DEFAULT_TIMEOUT_S, bind_keys, compile_and_disassemble, default_jobs

# Largest shared memory one block may use, static + dynamic (CUDA's
# "max shared memory per block, opt-in"): A100 163 KB, RTX 30/40 99 KB, H100/H200 227 KB.
SHARED_MEMORY_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
COMPILED_ARCHS = (80, 90)  # the archs --arch takes
DEFAULT_ARCHS = (80, 90)
# Archs held from another arch's compile (no compile of their own: CI time): sm_86 and sm_89 run
# sm_80's instructions (mma.sync, cp.async, the same shared-memory layouts) with less shared memory.
DERIVED_ARCHS = {86: 80, 89: 80}


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
    pruning: dict | None = None   # case.Pruning: how the launcher keeps or prunes this config by shared memory
    derived: dict = field(default_factory=dict)  # sm_80 rows: arch -> {limit, verdict} held from this compile
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
    if result.shared_bytes is not None and result.shared_bytes > limit:
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


@dataclass
class Report:
    archs: list[int]
    case_count: int
    results: list[CaseResult]
    group_failures: list[str] = field(default_factory=list)  # launch groups with no config that fits (derived archs)

    @property
    def failed(self) -> list[CaseResult]:
        return [result for result in self.results if not result.ok]

    @property
    def derived_archs(self) -> list[int]:
        """The archs held from another arch's compile (sm_86, sm_89 from sm_80's), when that one is compiled."""
        return [arch for arch, source in DERIVED_ARCHS.items() if source in self.archs]

    @property
    def failure_count(self) -> int:
        return len(self.failed) + len(self.group_failures)

    @property
    def spill_count(self) -> int:
        return sum(result.spilled for result in self.results)

    @property
    def compile_error_count(self) -> int:
        return sum(result.error is not None for result in self.results)

    def summary(self) -> dict:
        return {"cases": self.case_count, "archs": len(self.archs),
                "held_archs": [arch_name(arch) for arch in sorted(self.archs + self.derived_archs)],
                "compiled": len(self.results) - self.compile_error_count,
                "compile_errors": self.compile_error_count, "spills": self.spill_count,
                "failures": self.failure_count, "ok": not self.failure_count}

    @property
    def triton_versions(self) -> list[str]:
        return list(dict.fromkeys(r.triton_version for r in self.results if r.triton_version))

    def summary_line(self) -> str:
        not_compiled = f" ({self.compile_error_count} did not compile)" if self.compile_error_count else ""
        versions = f" with Triton {', '.join(self.triton_versions)}" if self.triton_versions else ""
        # Cases whose launches bind to one specialisation share a row (build_report).
        variants = len({(r.kernel, r.config, tuple(r.shapes)) for r in self.results})
        merged = f" ({plural(variants, 'distinct variant')})" if 0 < variants < self.case_count else ""
        held = ""
        if self.derived_archs:
            names = [arch_name(arch) for arch in sorted(self.archs + self.derived_archs)]
            derived = "/".join(arch_name(arch) for arch in self.derived_archs)
            sources = "/".join(sorted({arch_name(DERIVED_ARCHS[arch]) for arch in self.derived_archs}))
            held = f" for {', '.join(names)} ({derived} from the {sources} compile)"
        return (f"{plural(self.case_count, 'case')}{merged} × {plural(len(self.archs), 'arch')} compiled"
                f"{versions}{not_compiled}{held}, {plural(self.spill_count, 'spill')}, "
                f"{plural(self.failure_count, 'failure')}")

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
            "shared_memory_limits": {arch_name(arch): SHARED_MEMORY_LIMITS[arch]
                                     for arch in sorted(self.archs + self.derived_archs)},
            "derived_archs": {arch_name(arch): arch_name(DERIVED_ARCHS[arch]) for arch in self.derived_archs},
            "cases": [asdict(result) for result in self.results],
            "group_failures": self.group_failures,
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


def build_report(cases: list[CompileCase], archs=DEFAULT_ARCHS, jobs: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, triton_sites=(None,)) -> Report:
    """Compile every case for every arch, with the installed Triton (site None) and with each
    other Triton folder in ``triton_sites``, and check each result. Cases whose launches
    bind to the same specialisation (a ragged shape that launches the GPT-2 variant, say)
    compile once: their row lists every shape. Never raises for a bad case: its failure
    is recorded in its row."""
    archs = list(archs)
    unknown = [arch for arch in archs if arch not in COMPILED_ARCHS]
    if unknown:
        raise ValueError(f"cannot compile for archs {unknown}; compiled: {list(COMPILED_ARCHS)} "
                         f"(sm_86 and sm_89 are held from the sm_80 compile)")
    results = []
    for site in triton_sites:
        groups: dict = {}  # specialisation key -> indices of the cases that bind to it, in catalogue order
        errors = {}
        for index, (key, error) in enumerate(bind_keys(cases, site, timeout) if cases else []):
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
        outcomes = iter(compile_and_disassemble(work, max(1, jobs or default_jobs()), timeout, site))
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
                                    pruning=asdict(case.pruning) if case.pruning else None,
                                    error=outcome.get("error"), **measured)
                result.failures = failure_reasons(result)
                results.append(result)
    built = Report(archs=archs, case_count=len(cases), results=results)
    check_dropout_costs(built)
    check_derived_archs(built)
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


def check_dropout_costs(built: "Report") -> None:
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


def check_derived_archs(built: "Report") -> None:
    """Hold every sm_80 row against the shared memory of the archs derived from it (sm_86, sm_89: 99 KB).

    A config no launcher prunes (every kernel's one derived config, a pinned tile) must fit. Where a
    launcher chooses by shared memory (``row.pruning``: attention's tuned lists), it keeps the configs
    whose estimate fits, or the list's last when none does: each kept config must fit as compiled (an
    estimate that says "fits" for a config that does not is a failure), and a launch group (one list,
    Triton and shape) held whole by the report with no kept config that fits fails as a group. Sets
    ``row.derived[arch] = {"limit", "verdict"}``: "fits", "pruned" (its launcher skips it there), or
    "over" (with the row's failure). Derived archs of one limit share one verdict and one failure line."""
    by_limit: dict = {}
    for arch in built.derived_archs:
        by_limit.setdefault((DERIVED_ARCHS[arch], SHARED_MEMORY_LIMITS[arch]), []).append(arch)
    for (source, limit), archs in by_limit.items():
        where = "/".join(arch_name(arch) for arch in archs)
        rows = [r for r in built.results
                if r.arch == arch_name(source) and r.error is None and r.shared_bytes is not None]
        groups: dict = {}
        for row in rows:
            if row.pruning:
                for shape in row.shapes or [""]:
                    groups.setdefault((row.pruning["group"], row.triton_version, shape), []).append(row)
        kept: set = set()
        for (group, version, shape), members in groups.items():
            chosen = ([r for r in members if r.pruning["estimate"] <= limit]
                      or [r for r in members if r.pruning["last"]])
            kept.update(id(r) for r in chosen)
            whole = len({r.config for r in members}) >= members[0].pruning["size"]
            if whole and not any(r.shared_bytes <= limit for r in chosen):
                shown = ", ".join(f"{r.config}: {r.shared_bytes} bytes" for r in chosen) or "none"
                built.group_failures.append(
                    f"{group} [{shape or 'no shape'}] Triton {version or '?'} on {where}: no config its launcher "
                    f"keeps fits the limit of {limit} bytes per block (kept: {shown})")
        for row in rows:
            fits = row.shared_bytes <= limit
            launched = row.pruning is None or row.pruning["pinned"] or id(row) in kept
            verdict = "pruned" if not launched else "fits" if fits else "over"
            for arch in archs:
                row.derived[arch_name(arch)] = {"limit": limit, "verdict": verdict}
            if verdict != "over":
                continue
            needs = f"needs {row.shared_bytes} bytes of shared memory compiled, over the limit of {limit} bytes"
            if row.pruning is None:
                why = "no launcher prunes it"
            elif row.pruning["estimate"] <= limit:
                why = f"the launcher's estimate ({row.pruning['estimate']} bytes) says it fits"
            elif id(row) in kept:
                why = "the launcher falls back on it (the estimate prunes every config of its list)"
            else:
                why = "the pinned tile is launched unpruned"
            row.failures.append(f"on {where} (held from this compile): {why}, but it {needs}")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _installed_version(package: str) -> str | None:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return None


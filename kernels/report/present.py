"""Presenting the report (the table, the dropout costs, the failures) and the command line.

    python -m fastgpt.kernels.report [--arch 80,90] [--subset NAME] [--triton DIR]... [--no-installed]
                                     [--kernel REGEX] [--config REGEX] [--json FILE] [--jobs N] [--no-strict]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from .build import (COMPILED_ARCHS, DEFAULT_ARCHS, DERIVED_ARCHS, CaseResult, Report, arch_name, build_report,
                    config_label, plural)
from .case import CompileCase
from .catalogue import SUBSETS, all_cases
from .workers import DEFAULT_TIMEOUT_S, default_jobs

TABLE_COLUMNS = ("kernel", "config", "shapes", "arch", "triton", "warps", "stages", "regs", "spill st/ld B",
                 "smem B", "progs/SM", "SASS", "tensor cores", "MUFU", "int ALU", "LDG/LDGSTS/TMA", "status",
                 "sm_86/89")
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
            _tensor_core_cell(result), count("mufu"), count("int_alu"), loads, "ok" if result.ok else "FAIL",
            _derived_cell(result))


def _derived_cell(result: CaseResult) -> str:
    """The derived archs' verdict on an sm_80 row (fits, pruned: its launcher skips it there, FAIL); '-' elsewhere."""
    verdicts = {held["verdict"] for held in result.derived.values()}
    if not verdicts:
        return "-"
    return "FAIL" if "over" in verdicts else "/".join(sorted(verdicts))


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


def format_estimate(report: Report) -> str:
    """How the launcher's shared-memory estimate (attention_configs.candidates) compares with the compiled
    size, over the rows it prunes: a line only where it is below (it fails a row only where that keeps a
    tile over a card's limit: the sm_86/89 column)."""
    pruned = [r for r in report.results if r.pruning and r.shared_bytes is not None]
    below = [r for r in pruned if r.shared_bytes > r.pruning["estimate"]]
    if not below:
        return ""
    worst = max(below, key=lambda r: r.shared_bytes - r.pruning["estimate"])
    return (f"shared-memory estimate: below the compiled size on {len(below)} of {plural(len(pruned), 'pruned row')} "
            f"(most: {worst.label}, {worst.pruning['estimate']} vs {worst.shared_bytes} bytes)")


def format_failures(report: Report) -> str:
    """One line per failing case naming kernel, config, arch and reason; compile
    errors keep a few lines of the compiler's message below."""
    lines = []
    for result in report.failed:
        for reason in result.failures:
            lines.append(f"FAIL {result.label}: {reason}")
        if result.error:
            lines.extend("    " + line for line in result.error.strip().splitlines()[:12])
    lines.extend(f"FAIL {failure}" for failure in report.group_failures)
    return "\n".join(lines)


def parse_archs(text: str) -> list[int]:
    archs = []
    for item in text.split(","):
        digits = item.strip().lower().removeprefix("sm_").removeprefix("sm")
        if digits.isdigit() and int(digits) in DERIVED_ARCHS:
            raise argparse.ArgumentTypeError(
                f"{arch_name(int(digits))} is held from the {arch_name(DERIVED_ARCHS[int(digits)])} compile: "
                f"pass {DERIVED_ARCHS[int(digits)]}")
        if not digits.isdigit() or int(digits) not in COMPILED_ARCHS:
            raise argparse.ArgumentTypeError(
                f"unknown arch {item.strip()!r}; choose from {','.join(map(str, COMPILED_ARCHS))}")
        archs.append(int(digits))
    return archs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastgpt.kernels.report",
        description="Compile every fastgpt Triton kernel at every catalogued config for real GPU targets "
                    "(no GPU needed) and report registers, spills, shared memory and tensor-core use.")
    parser.add_argument("--arch", type=parse_archs, default=list(DEFAULT_ARCHS),
                        help="comma-separated compute capabilities (default: 80,90); sm_86 and sm_89 "
                             "(99 KB of shared memory per block) are held from the sm_80 compile")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument("--jobs", type=int, default=None, help="compiles at once (default: usable CPU cores)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds before one compile counts as hung (default: %(default)s)")
    parser.add_argument("--subset", choices=sorted(SUBSETS), default=None,
                        help="only a named subset of the catalogue: 'representative' (each kernel's dtypes at "
                             "GPT-2 small's shape, with and without dropout, each arch family's pinned and first "
                             "tuned tile, TMA; every kind of check) is what CI compiles with the installed Triton")
    parser.add_argument("--kernel", metavar="REGEX", default=None,
                        help="only the cases whose kernel name matches REGEX (re.search), e.g. 'attention_fwd'")
    parser.add_argument("--config", metavar="REGEX", default=None,
                        help="only the cases whose config label matches REGEX, e.g. 'bf16 d=64'")
    parser.add_argument("--triton", metavar="DIR", action="append", default=[],
                        help="also compile with the Triton installed in DIR (e.g. `pip install --target DIR "
                             "triton==3.6.0`); repeatable. The installed Triton runs first, unless --no-installed")
    parser.add_argument("--installed", action=argparse.BooleanOptionalAction, default=True,
                        help="compile with the installed Triton (default); --no-installed compiles with the "
                             "--triton folders only")
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                        help="exit 1 if any case fails (default); --no-strict only reports")
    return parser


def main(argv: list[str] | None = None, cases: list[CompileCase] | None = None) -> int:
    """The CLI. `cases` replaces the catalogue (for tests)."""
    args = _parser().parse_args(argv)
    if not args.installed and not args.triton:
        print("--no-installed needs a --triton DIR to compile with", file=sys.stderr)
        return 2
    if cases is None:
        cases = all_cases()
    if args.subset:
        cases = SUBSETS[args.subset](cases)
    if args.kernel:
        cases = [case for case in cases if re.search(args.kernel, case.kernel)]
    if args.config:
        cases = [case for case in cases if re.search(args.config, config_label(case))]
    if not cases:
        print("no kernels in the catalogue (or none its filters select): nothing to compile")
    else:
        jobs = min(args.jobs or default_jobs(), len(cases) * len(args.arch))
        print(f"compiling {plural(len(cases), 'case')} × {plural(len(args.arch), 'arch')} "
              f"on {plural(jobs, 'worker')}...", file=sys.stderr, flush=True)
    for site in args.triton:
        if not os.path.isfile(os.path.join(site, "triton", "__init__.py")):
            print(f"--triton {site}: no triton package in that folder "
                  f"(install one with: pip install --target {site} triton==3.6.0)", file=sys.stderr)
            return 2
    report = build_report(cases, args.arch, jobs=args.jobs, timeout=args.timeout,
                          triton_sites=[None, *args.triton] if args.installed else args.triton)
    if report.results:
        print(format_table(report))
        if cost := format_dropout_cost(report):
            print()
            print(cost)
        if estimate := format_estimate(report):
            print(estimate)
    if report.failure_count:
        print()
        print(format_failures(report))
    print(report.summary_line())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report.to_json(), out, indent=2)
            out.write("\n")
    return 1 if args.strict and report.failure_count else 0

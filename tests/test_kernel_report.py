"""The ahead-of-time kernel report (python -m fastgpt.kernels.report), on fixture kernels.

The fixtures compile for real (sm_80 and sm_90, no GPU needed), so each one proves a
check can fail: an element-wise add (passes, no tensor cores), an fp16 tl.dot matmul
(tensor cores on both archs), a register tile too big for one warp (spills), a matmul
with too many pipeline stages (shared memory over the limit) and a non-power-of-two
tl.arange (does not compile). Exact register counts depend on the ptxas release
Triton ships, so the tests assert ranges and booleans.
"""

import json
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastgpt.kernels.report import build, compiler, present  # noqa: E402
from fastgpt.kernels.report.case import CompileCase  # noqa: E402
from fastgpt.kernels.report.sass import SASS_INSTRUCTION_RE, sass_profile  # noqa: E402

ARCHS = (80, 90)
HELD = " for sm_80, sm_86, sm_89, sm_90 (sm_86/sm_89 from the sm_80 compile)"

# Plain @triton.jit: under the suite's TRITON_INTERPRET=1 these are interpreted
# functions here, and the report's worker processes import this module afresh to
# compile them for real.


@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask), mask=mask)


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows, cols, inner = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rows[:, None] * K + (k + inner)[None, :])
        b = tl.load(b_ptr + (k + inner)[:, None] * BN + cols[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rows[:, None] * BN + cols[None, :], acc)


@triton.jit
def whole_tile_kernel(x_ptr, out_ptr, BM: tl.constexpr, BN: tl.constexpr):
    # Both reductions need the whole tile live at once: 128×64 fp32 over one warp is
    # 256 values per thread, past the 255-register cap.
    offsets = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    tile = tl.load(x_ptr + offsets)
    out = tile * tl.sum(tile, axis=1)[:, None] + tl.sum(tile * tile, axis=0)[None, :]
    tl.store(out_ptr + offsets, out)


@triton.jit
def double_kernel(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) * 2)


MATMUL_SIGNATURE = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32",
                    "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
ADD = CompileCase("add", add_kernel,
                  {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                  {"BLOCK": 1024}, num_warps=4, config="BLOCK=1024 fp32")
MATMUL = CompileCase("matmul", matmul_kernel, MATMUL_SIGNATURE, {"BM": 64, "BN": 64, "BK": 32},
                     num_warps=4, num_stages=3, expects_tensor_cores=True)
SPILLS = CompileCase("whole_tile", whole_tile_kernel,
                     {"x_ptr": "*fp32", "out_ptr": "*fp32", "BM": "constexpr", "BN": "constexpr"},
                     {"BM": 128, "BN": 64}, num_warps=1)
# 8 stages of 128×128 fp16 operand tiles: ~256 KB on sm_80, ~289 KB on sm_90. Only
# because the report compiles pointers 16-byte aligned, as launches are: unaligned,
# the loop is not pipelined and needs a quarter of that.
TOO_MUCH_SMEM = CompileCase("matmul_deep_pipeline", matmul_kernel, MATMUL_SIGNATURE,
                            {"BM": 128, "BN": 128, "BK": 128}, num_warps=8, num_stages=8,
                            expects_tensor_cores=True)
BROKEN = CompileCase("double", double_kernel, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 48})
FIXTURE_CASES = [ADD, MATMUL, SPILLS, TOO_MUCH_SMEM, BROKEN]


@pytest.fixture(scope="module")
def fixture_report():
    return build.build_report(FIXTURE_CASES, ARCHS)


def rows(built, kernel):
    found = {row.arch: row for row in built.results if row.kernel == kernel}
    assert set(found) == {"sm_80", "sm_90"}
    return found


def test_one_row_per_case_and_arch_in_catalogue_order(fixture_report):
    assert [(row.kernel, row.arch) for row in fixture_report.results] == [
        (case.kernel, f"sm_{arch}") for case in FIXTURE_CASES for arch in ARCHS]
    assert fixture_report.case_count == 5


def test_element_wise_kernel_passes_without_tensor_cores(fixture_report):
    for row in rows(fixture_report, "add").values():
        assert row.ok and row.error is None and row.failures == []
        assert 8 <= row.registers <= 128
        assert row.spill_stores_bytes == row.spill_loads_bytes == row.stack_bytes == 0
        assert 0 <= row.shared_bytes < 4096
        assert row.tensor_cores is False and row.tensor_core_instructions == {}
        assert row.compile_seconds > 0
        assert (row.num_warps, row.num_stages, row.config) == (4, 3, "BLOCK=1024 fp32")


def test_dot_kernel_emits_tensor_core_instructions_on_both_archs(fixture_report):
    by_arch = rows(fixture_report, "matmul")
    assert by_arch["sm_80"].tensor_core_instructions.get("HMMA", 0) > 0
    sm90 = by_arch["sm_90"].tensor_core_instructions
    assert sum(sm90.get(name, 0) for name in ("wgmma.mma_async", "HGMMA", "mma.sync", "HMMA")) > 0
    for row in by_arch.values():
        assert row.ok, row.failures
        assert row.tensor_cores is True
        assert row.config == "BM=64 BN=64 BK=32"  # no label given: built from the constexprs
        assert 0 < row.shared_bytes <= build.SHARED_MEMORY_LIMITS[int(row.arch[3:])]


def test_register_hungry_kernel_is_reported_as_spilling(fixture_report):
    for row in rows(fixture_report, "whole_tile").values():
        assert not row.ok
        assert row.registers >= 200
        assert row.spill_stores_bytes > 0 and row.spill_loads_bytes > 0 and row.stack_bytes > 0
        assert any(reason.startswith("spills ") for reason in row.failures)


def test_shared_memory_over_the_arch_limit_fails(fixture_report):
    for arch, row in rows(fixture_report, "matmul_deep_pipeline").items():
        limit = build.SHARED_MEMORY_LIMITS[int(arch[3:])]
        assert row.shared_bytes > limit
        assert not row.ok
        assert any("shared memory" in reason and str(limit) in reason for reason in row.failures)
        assert row.tensor_cores is True


def test_compile_error_is_a_failed_row_not_a_crash(fixture_report):
    for row in rows(fixture_report, "double").values():
        assert not row.ok
        assert "power of 2" in row.error
        assert row.failures == ["did not compile: arange's range must be a power of 2"]
        assert row.registers is None and row.shared_bytes is None and row.tensor_cores is None


def test_summary_counts_rows(fixture_report):
    summary = fixture_report.summary()
    assert summary == {"cases": 5, "archs": 2, "held_archs": ["sm_80", "sm_86", "sm_89", "sm_90"], "compiled": 8,
                       "compile_errors": 2, "spills": summary["spills"], "failures": 6, "ok": False}
    assert summary["spills"] >= 2
    assert re.fullmatch(rf"5 cases × 2 archs compiled with Triton {re.escape(triton.__version__)} "
                        rf"\(2 did not compile\){re.escape(HELD)}, \d+ spills, 6 failures",
                        fixture_report.summary_line())


def test_table_has_one_line_per_row(fixture_report):
    lines = present.format_table(fixture_report).splitlines()
    assert lines[0].split()[:5] == ["kernel", "config", "shapes", "arch", "triton"]
    assert len(lines) == 2 + len(fixture_report.results)
    matmul_sm80 = next(line for line in lines if line.startswith("matmul ") and "sm_80" in line)
    assert "HMMA.16816×" in matmul_sm80 and matmul_sm80.split()[-2:] == ["ok", "fits"]  # status, sm_86/89
    assert lines[0].split()[-2:] == ["status", "sm_86/89"]
    assert all(line.endswith("-") for line in lines[2:] if "sm_90" in line)  # held from sm_80 rows only
    failures = present.format_failures(fixture_report)
    assert "FAIL whole_tile [BM=128 BN=64] sm_90: spills " in failures
    assert "FAIL double [BLOCK=48] sm_80: did not compile: arange's range must be a power of 2" in failures


def passing_row(arch, **changes):
    values = dict(kernel="k", config="c", arch=arch, num_warps=4, num_stages=3, expects_tensor_cores=False,
                  registers=32, spill_stores_bytes=0, spill_loads_bytes=0, stack_bytes=0, shared_bytes=0,
                  tensor_cores=False, tensor_core_instructions={}, compile_seconds=0.1)
    values.update(changes)
    return build.CaseResult(**values)


@pytest.mark.parametrize("arch, limit", [("sm_80", 166912), ("sm_86", 101376), ("sm_89", 101376), ("sm_90", 232448)])
def test_shared_memory_limit_is_inclusive(arch, limit):
    assert build.failure_reasons(passing_row(arch, shared_bytes=limit)) == []
    [reason] = build.failure_reasons(passing_row(arch, shared_bytes=limit + 1))
    assert reason == f"needs {limit + 1} bytes of shared memory, over the {arch} limit of {limit} bytes per block"


def test_a_case_expecting_tensor_cores_fails_without_them():
    assert build.failure_reasons(passing_row("sm_90", expects_tensor_cores=True)) == [
        "expects tensor cores but emitted no tensor-core instruction"]
    assert build.failure_reasons(passing_row("sm_90", expects_tensor_cores=True, tensor_cores=True,
                                              tensor_core_instructions={"HGMMA": 4})) == []


def test_tensor_core_counting_reads_sass_opcodes_and_ptx():
    sass = ("        /*0a30*/                   HMMA.16816.F32 R4, R8, R12, R4 ;\n"
            "        /*0a40*/              @!P0 HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ ;\n"
            "        /*0a50*/                   FFMA R1, R2, R3, R1 ;\n")
    ptx = ("\tmma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f1};\n"
           "\twgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%f1}, %rd1, %rd2, p, 1, 1, 0, 1;\n"
           "\twgmma.fence.sync.aligned;\n")
    assert compiler.count_tensor_core_instructions(ptx, sass) == {
        "HMMA": 1, "HGMMA": 1, "mma.sync": 1, "wgmma.mma_async": 1}


# Compiles ADD and MATMUL for sm_80 and sm_90 in a process without the interpreter, and
# keeps each cubin beside the code sections the report reads from it.
_COMPILE_FIXTURES = """
import sys, triton
from fastgpt.kernels.report import compiler
import test_kernel_report as fixtures
out, kernels = sys.argv[1], []
compile_for_real = triton.compile
triton.compile = lambda *args, **kwargs: kernels.append(compile_for_real(*args, **kwargs)) or kernels[-1]
for name in ("ADD", "MATMUL"):
    for arch in (80, 90):
        _, machine_code = compiler.compile_case(getattr(fixtures, name), arch)
        open(f"{out}/{name}-{arch}.cubin", "wb").write(kernels[-1].asm["cubin"])
        open(f"{out}/{name}-{arch}.code", "wb").write(machine_code.code)
        open(f"{out}/{name}-{arch}.arch", "w").write(machine_code.sass_arch)
"""


def test_batched_disassembly_reads_each_kernel_as_nvdisasm_reads_its_cubin(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _COMPILE_FIXTURES, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    def opcodes(sass):
        return SASS_INSTRUCTION_RE.findall(sass)

    for arch in (80, 90):
        codes = [(tmp_path / f"{name}-{arch}.code").read_bytes() for name in ("ADD", "MATMUL")]
        sass_arch = (tmp_path / f"ADD-{arch}.arch").read_text()
        assert sass_arch == {80: "SM80", 90: "SM90a"}[arch]
        batched = compiler.disassemble(sass_arch, codes)
        for name, sass in zip(("ADD", "MATMUL"), batched):
            whole_cubin = compiler.run_tool("nvdisasm", "--print-code", str(tmp_path / f"{name}-{arch}.cubin"))
            assert opcodes(sass) == opcodes(whole_cubin) and len(opcodes(sass)) > 20, (name, arch)
        one_at_a_time = compiler.disassemble(sass_arch, codes[:1]) + compiler.disassemble(sass_arch, codes[1:])
        assert [opcodes(sass) for sass in batched] == [opcodes(sass) for sass in one_at_a_time]
        assert sass_profile(batched[1])["classes"].get("tensor_core")  # MATMUL's HMMA / HGMMA
        # A truncated blob (half an instruction) fails its own row; the batch is redone without it.
        *good, truncated = compiler.disassemble_each(sass_arch, codes + [b"\0" * 8])
        assert [opcodes(sass) for sass in good] == [opcodes(sass) for sass in batched]
        assert "truncated" in truncated["error"]
    with pytest.raises(ValueError, match="not a 64-bit ELF cubin"):
        compiler.code_sections(b"PK\x03\x04 not an ELF file")


def test_interpreted_kernels_compile_and_malformed_cases_fail_alone():
    from triton.runtime.interpreter import InterpretedFunction

    @triton.jit
    def local_kernel(x_ptr):
        tl.store(x_ptr, 1.0)

    cases = [CompileCase("interpreted", InterpretedFunction(double_kernel.fn), BROKEN.signature, {"BLOCK": 64}),
             CompileCase("local", local_kernel, {"x_ptr": "*fp32"}),
             CompileCase("no_signature", double_kernel, {"x_ptr": "*fp32"}, {"BLOCK": 64}),
             CompileCase("unpicklable", double_kernel, BROKEN.signature, {"BLOCK": lambda: 64})]
    interpreted, local, unsigned, unpicklable = build.build_report(cases, (80,), jobs=1).results
    assert interpreted.ok, interpreted.failures  # the worker imports the module without the interpreter
    assert not local.ok and "defined at module level" in local.error
    assert not unsigned.ok and "signature lacks arguments ['BLOCK']" in unsigned.error
    assert not unpicklable.ok and "cannot send the case to a compiler process" in unpicklable.error


class KillsItsUnpickler:
    """A constexpr value whose unpickling ends the worker process, as a compiler crash would."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_dying_or_hung_worker_fails_only_its_own_case():
    cases = [CompileCase("crashes", double_kernel, BROKEN.signature, {"BLOCK": KillsItsUnpickler()}), ADD]
    crashed, after = build.build_report(cases, (80,), jobs=1).results
    assert crashed.failures == ["did not compile: the compiler process died (exit code 3)"]
    assert after.ok  # a fresh worker took over
    [hung] = build.build_report([ADD], (80,), timeout=0.5).results
    assert hung.failures == ["did not compile: compilation timed out after 0.5 s"]


def test_a_dropout_twin_over_its_expected_cost_fails_on_either_arch():
    def rows(arch, total_with, total_without=1000, version="3.6.0", shapes=("gpt2",)):
        return [passing_row(arch, kernel="attn", sass={"total": total_without, "classes": {}}, triton_version=version,
                            shapes=list(shapes)),
                passing_row(arch, kernel="attn+dropout", sass={"total": total_with, "classes": {}},
                            triton_version=version, expects_max_dropout_cost=1.5, shapes=list(shapes))]
    # The ragged variant shares the config label (as N = 96 and N = 100 do at BLOCK_N = 128):
    # each dropout row is held against the twin of its own shapes.
    built = build.Report(archs=[80, 90], case_count=2,
                          results=rows("sm_90", 1500) + rows("sm_90", 600, 500, shapes=["ragged"])
                          + rows("sm_90", 1510, version="3.9.0") + rows("sm_80", 1900))
    build.check_dropout_costs(built)
    failures = [r.failures for r in built.results if r.kernel == "attn+dropout"]
    assert failures == [[],  # 1.5× exactly passes
                        [],  # 600 vs its own twin's 500 (keyed by config alone, the gpt2 row met this 500: 3×)
                        ["dropout costs 1.51× the SASS instructions of its p = 0 twin (1510 vs 1000), over 1.5×"],
                        ["dropout costs 1.90× the SASS instructions of its p = 0 twin (1900 vs 1000), over 1.5×"]]
    assert [(pair["shapes"], pair["ratio"]) for pair in built.dropout_cost()] == [
        (["gpt2"], 1.5), (["ragged"], 1.2), (["gpt2"], 1.51), (["gpt2"], 1.9)]
    lonely = build.Report(archs=[90], case_count=1, results=rows("sm_90", 1200)[1:])
    build.check_dropout_costs(lonely)
    assert lonely.results[0].failures == ["expects a dropout cost but its p = 0 twin is not in the report"]


JSON_CASE_FIELDS = {"kernel", "config", "arch", "num_warps", "num_stages", "expects_tensor_cores", "registers",
                    "spill_stores_bytes", "spill_loads_bytes", "stack_bytes", "shared_bytes", "tensor_cores",
                    "tensor_core_instructions", "expects_min_wgmma_n", "expects_tma", "expects_max_dropout_cost", "sass", "programs_per_sm", "compile_seconds", "triton_version",
                    "ptxas_version", "shapes", "pruning", "derived", "ok", "error", "failures"}


def test_cli_fails_strictly_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert present.main(["--json", str(out)], cases=[ADD, BROKEN]) == 1
    printed = capsys.readouterr().out
    assert "FAIL double [BLOCK=48] sm_90: did not compile" in printed
    assert printed.rstrip().endswith(f"2 cases × 2 archs compiled with Triton {triton.__version__} "
                                     f"(2 did not compile){HELD}, 0 spills, 2 failures")

    document = json.loads(out.read_text())
    assert {"tool", "created", "triton_version", "triton_versions", "torch_version", "python_version", "archs",
            "ptxas_versions", "shared_memory_limits", "derived_archs", "cases", "group_failures",
            "summary"} <= set(document)
    assert document["triton_versions"] == [triton.__version__]
    assert document["triton_version"] == triton.__version__
    assert document["archs"] == ["sm_80", "sm_90"]
    assert document["shared_memory_limits"] == {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448}
    assert document["derived_archs"] == {"sm_86": "sm_80", "sm_89": "sm_80"}
    assert [(case["kernel"], case["arch"], case["ok"]) for case in document["cases"]] == [
        ("add", "sm_80", True), ("add", "sm_90", True), ("double", "sm_80", False), ("double", "sm_90", False)]
    for case in document["cases"]:
        assert set(case) == JSON_CASE_FIELDS
    assert document["summary"]["failures"] == 2 and document["summary"]["ok"] is False


def test_cli_exit_status_without_failures_or_without_strict(capsys):
    assert present.main(["--arch", "sm_90"], cases=[ADD]) == 0
    assert present.main(["--arch", "80", "--no-strict"], cases=[BROKEN]) == 0
    assert (f"1 case × 1 arch compiled with Triton {triton.__version__} (1 did not compile) for sm_80, sm_86, "
            "sm_89 (sm_86/sm_89 from the sm_80 compile), 0 spills, 1 failure") in capsys.readouterr().out


def test_cli_rejects_an_arch_without_a_known_limit(capsys):
    with pytest.raises(SystemExit) as exit_info:
        present.main(["--arch", "80,75"], cases=[])
    assert exit_info.value.code == 2
    assert "unknown arch '75'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        present.main(["--arch", "86"], cases=[])
    assert "sm_86 is held from the sm_80 compile: pass 80" in capsys.readouterr().err


def test_module_entry_point_on_an_empty_catalogue_under_triton_interpret(tmp_path):
    # Run as `python -m` would, in a fresh process started outside the repository root
    # (so `kernels/` is not importable as a top-level package), with the catalogue
    # pinned empty whatever kernel modules exist by then.
    script = ("import runpy, fastgpt.kernels.report.catalogue as catalogue\n"
              "catalogue.KERNELS = {}\n"
              "runpy.run_module('fastgpt.kernels.report', run_name='__main__', alter_sys=True)\n")
    out = tmp_path / "empty.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script, "--json", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no kernels in the catalogue" in done.stdout
    assert done.stdout.rstrip().endswith(f"0 cases × 2 archs compiled{HELD}, 0 spills, 0 failures")
    document = json.loads(out.read_text())
    assert document["cases"] == [] and document["summary"]["ok"] is True


# ---------------------------------------------------------------- the launched specialisation

@triton.jit(do_not_specialize=["n_rows"])
def scale_rows_kernel(x_ptr, out_ptr, n_rows, n_cols, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = (cols < n_cols) & (row < n_rows)
    tl.store(out_ptr + row * stride + cols, tl.load(x_ptr + row * stride + cols, mask=mask) * 2, mask=mask)


def _launch_case(n_rows, n_cols, shape, **fields):
    from fastgpt.kernels.report.case import TensorArg
    import torch
    x = TensorArg(torch.float32)
    return CompileCase.of_launch("scale_rows", scale_rows_kernel,
                                 ((n_rows,), (x, x, n_rows, n_cols, n_cols), {"BLOCK": 1024, "num_warps": 4}),
                                 config="BLOCK=1024", shape=shape, **fields)


def test_launches_compile_as_tritons_launcher_specialises_them():
    # 768 columns: divisible by 16 (vectorised loads); 700 is not; 1 becomes a constant.
    # n_rows is do_not_specialize: 8192 and 100 rows bind to one variant.
    cases = [_launch_case(8192, 768, "gpt2"), _launch_case(100, 768, "ragged rows"),
             _launch_case(100, 700, "ragged width"), _launch_case(100, 1, "one column")]
    built = build.build_report(cases, (90,), jobs=2)
    assert [row.shapes for row in built.results] == [["gpt2", "ragged rows"], ["ragged width"], ["one column"]]
    divisible, ragged, one = built.results
    assert all(row.ok for row in built.results), [row.failures for row in built.results]
    # The divisible width vectorises: fewer, wider loads than the ragged one.
    assert divisible.sass["classes"]["global_load"] < ragged.sass["classes"]["global_load"]
    assert "(3 distinct variants)" in built.summary_line()


def test_sass_profile_counts_classes_and_tensor_core_shapes(fixture_report):
    from fastgpt.kernels.report.sass import smallest_wgmma_n
    sm90 = rows(fixture_report, "matmul")["sm_90"]
    assert sm90.sass["total"] > 50 and sm90.sass["classes"]["tensor_core"] > 0
    assert any(op.startswith("HGMMA.64x64x16") for op in sm90.sass["tensor_core_shapes"])
    assert smallest_wgmma_n(sm90.sass) == 64
    sm80 = rows(fixture_report, "matmul")["sm_80"]
    assert smallest_wgmma_n(sm80.sass) is None and "HMMA" in " ".join(sm80.sass["tensor_core_shapes"])
    add = rows(fixture_report, "add")["sm_90"]
    assert add.sass["classes"]["global_load"] > 0 and "tensor_core" not in add.sass["classes"]


def test_programs_per_sm_follow_cudas_occupancy_rules():
    from fastgpt.kernels.report.sass import programs_per_sm
    # 128 registers × 256 threads = 32K: two programs fit in 64K registers.
    assert programs_per_sm(90, 128, 8, 1000) == {"programs": 2, "limited_by": "registers", "warps": 16}
    # 100 KB of shared memory each: two fit in sm_90's 228 KB, one in sm_80's 164 KB.
    assert programs_per_sm(90, 32, 4, 100_000)["programs"] == 2
    assert programs_per_sm(80, 32, 4, 100_000) == {"programs": 1, "limited_by": "shared", "warps": 4}
    assert programs_per_sm(90, 16, 1, 0) == {"programs": 32, "limited_by": "blocks", "warps": 32}


def test_a_case_for_one_arch_is_compiled_for_that_arch_only():
    built = build.build_report([_launch_case(8192, 768, "gpt2", archs=(90,))], (80, 90), jobs=1)
    assert [row.arch for row in built.results] == ["sm_90"]


def test_another_triton_is_imported_from_its_folder(tmp_path, capsys):
    site = tmp_path / "site"
    (site / "triton").mkdir(parents=True)
    (site / "triton" / "__init__.py").write_text("raise ImportError('the stub Triton of this test')\n")
    [row] = build.build_report([ADD], (90,), jobs=1, triton_sites=[str(site)]).results
    assert not row.ok and "compiler process died" in row.error  # the worker imported the stub
    # --no-installed: that folder's Triton alone (CI compiles the catalogue with Triton 3.6 so).
    assert present.main(["--arch", "90", "--triton", str(site), "--no-installed", "--no-strict"], cases=[ADD]) == 0
    assert capsys.readouterr().out.rstrip().endswith("1 case × 1 arch compiled (1 did not compile), 0 spills, 1 failure")
    assert present.main(["--triton", str(tmp_path / "nowhere")], cases=[ADD]) == 2
    assert "no triton package in that folder" in capsys.readouterr().err


def test_the_cli_filters_cases_by_kernel_and_config(capsys):
    assert present.main(["--arch", "90", "--kernel", "^add$", "--config", "fp32"], cases=[ADD, MATMUL, BROKEN]) == 0
    assert capsys.readouterr().out.rstrip().endswith(
        f"1 case × 1 arch compiled with Triton {triton.__version__}, 0 spills, 0 failures")


def test_wgmma_width_and_tma_expectations_fail_a_row_that_misses_them():
    narrow = {"total": 100, "classes": {"tensor_core": 2}, "tensor_core_shapes": {"HGMMA.64x32x16.F32.BF16": 2}}
    wide = {"total": 100, "classes": {"tensor_core": 2, "tma": 3}, "tensor_core_shapes": {"HGMMA.64x64x16.F32.BF16": 2}}
    expects = dict(expects_tensor_cores=True, tensor_cores=True, expects_min_wgmma_n=64, expects_tma=True)
    assert build.failure_reasons(passing_row("sm_90", sass=narrow, **expects)) == [
        "expects wgmma (HGMMA) with N >= 64, emitted HGMMA.64x32x16.F32.BF16",
        "expects TMA loads (UTMALDG) but emitted none"]
    assert build.failure_reasons(passing_row("sm_90", sass=wide, **expects)) == []
    assert build.failure_reasons(passing_row("sm_80", sass=narrow, **expects)) == []  # sm_90 expectations only


# ---------------------------------------------------------------- sm_86 / sm_89, held from the sm_80 compile

def test_fixture_rows_are_held_against_99_kb_from_their_sm80_compile(fixture_report):
    matmul, deep = rows(fixture_report, "matmul")["sm_80"], rows(fixture_report, "matmul_deep_pipeline")["sm_80"]
    assert matmul.derived == {"sm_86": {"limit": 101376, "verdict": "fits"},
                              "sm_89": {"limit": 101376, "verdict": "fits"}}
    assert deep.derived["sm_86"]["verdict"] == "over"
    assert f"on sm_86/sm_89 (held from this compile): no launcher prunes it, but it needs {deep.shared_bytes} " \
           "bytes of shared memory compiled, over the limit of 101376 bytes" in deep.failures
    assert rows(fixture_report, "matmul")["sm_90"].derived == {}
    assert rows(fixture_report, "double")["sm_80"].derived == {}  # nothing compiled, nothing held


def _pruned_row(config, shared, estimate, last=False, pinned=False, size=3, group="attn fp16 d=128", shapes=("gpt2",)):
    return passing_row("sm_80", kernel="attn", config=config, shared_bytes=shared, shapes=list(shapes),
                       triton_version="3.6.0", pruning={"group": group, "size": size, "estimate": estimate,
                                                        "last": last, "pinned": pinned})


def _held(results, archs=(80, 90)):
    built = build.Report(archs=list(archs), case_count=len(results), results=results)
    build.check_derived_archs(built)
    for result in results:
        result.ok = not result.failures  # as build_report does
    return built


def test_a_launcher_that_prunes_by_an_estimate_is_held_to_what_it_keeps():
    # Pruned by the estimate (too big anyway), kept and fitting, kept by an estimate the compile contradicts.
    big, good, wrong = (_pruned_row("A", 140_000, 131_072), _pruned_row("B", 90_000, 81_920),
                        _pruned_row("C", 110_000, 98_304, last=True))
    built = _held([big, good, wrong])
    assert [r.derived["sm_89"]["verdict"] for r in (big, good, wrong)] == ["pruned", "fits", "over"]
    assert big.failures == good.failures == []
    assert wrong.failures == ["on sm_86/sm_89 (held from this compile): the launcher's estimate (98304 bytes) says "
                              "it fits, but it needs 110000 bytes of shared memory compiled, over the limit of "
                              "101376 bytes"]
    assert built.group_failures == []  # B fits
    assert _held([_pruned_row("A", 140_000, 131_072)], archs=(90,)).results[0].derived == {}  # no sm_80 compile


def test_a_list_whose_estimate_prunes_everything_falls_back_on_its_last_config():
    # attention d = 128 on a 99 KB card: both estimates are over, the launcher keeps the last config.
    first, last = _pruned_row("A", 114_688, 131_072, size=2), _pruned_row("B", 90_112, 114_688, last=True, size=2)
    built = _held([first, last])
    assert (first.derived["sm_86"]["verdict"], last.derived["sm_86"]["verdict"]) == ("pruned", "fits")
    assert built.group_failures == [] and built.failure_count == 0
    over = _pruned_row("B", 105_000, 114_688, last=True, size=2)
    built = _held([_pruned_row("A", 114_688, 131_072, size=2), over])
    assert over.failures == ["on sm_86/sm_89 (held from this compile): the launcher falls back on it (the estimate "
                             "prunes every config of its list), but it needs 105000 bytes of shared memory compiled, "
                             "over the limit of 101376 bytes"]
    assert built.group_failures == ["attn fp16 d=128 [gpt2] Triton 3.6.0 on sm_86/sm_89: no config its launcher "
                                    "keeps fits the limit of 101376 bytes per block (kept: B: 105000 bytes)"]
    assert built.summary()["failures"] == 2 and "FAIL attn fp16 d=128 [gpt2]" in present.format_failures(built)


def test_a_partial_launch_group_is_not_failed_as_a_group_and_a_pinned_tile_must_fit():
    # A filtered report holding one of the list's three configs says nothing about the list.
    built = _held([_pruned_row("A", 140_000, 131_072)])
    assert built.group_failures == [] and built.results[0].derived["sm_86"]["verdict"] == "pruned"
    pinned = _pruned_row("P", 120_000, 131_072, pinned=True, size=1, group="other")
    assert _held([pinned]).results[0].derived["sm_86"]["verdict"] == "over"
    assert "the pinned tile is launched unpruned" in pinned.failures[0]


def test_an_estimate_below_the_compiled_size_is_reported_without_failing_under_the_limit():
    under, over = _pruned_row("A", 41_088, 36_864, size=2), _pruned_row("B", 40_000, 40_960, last=True, size=2)
    built = _held([under, over])
    assert built.failure_count == 0
    assert present.format_estimate(built) == ("shared-memory estimate: below the compiled size on 1 of 2 pruned rows "
                                              "(most: attn [A] sm_80, 36864 vs 41088 bytes)")
    assert present.format_estimate(_held([over])) == ""

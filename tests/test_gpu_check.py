"""benchmarks/gpu_check.py's contract and arithmetic, without running a check (CI runs --dry-run itself)."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_output_contract_is_checked(gpu_check, tmp_path):
    for name in gpu_check.FILES:
        (tmp_path / name).write_text("x")
    assert gpu_check.contract_problems(tmp_path) == []
    assert len(gpu_check.FILES) == gpu_check.MAX_FILES
    (tmp_path / "nested").mkdir()
    (tmp_path / "bad name.txt").write_text("x")
    with open(tmp_path / "summary.md", "wb") as f:
        f.truncate(gpu_check.MAX_FILE_BYTES + 1)
    problems = "\n".join(gpu_check.contract_problems(tmp_path))
    assert "10 entries" in problems and "nested: not a plain file" in problems
    assert "bad name.txt: name outside" in problems and "summary.md: 16777217 bytes" in problems


def test_records_survive_a_line_cut_by_a_kill(gpu_check, tmp_path):
    gpu_check.emit(tmp_path, {"kind": "ceiling", "name": "copy", "GB/s": 4300.0})
    with open(tmp_path / "bench.jsonl", "a") as f:
        f.write('{"kind": "attention", "ms"')  # the check was stopped mid-line
    assert gpu_check.read_records(tmp_path) == [{"kind": "ceiling", "name": "copy", "GB/s": 4300.0}]


def test_headline_ratios_compare_fastgpt_with_the_fastest_peer(gpu_check):
    shape = {"B": 16, "H": 12, "T": 1024, "d": 64, "dropout": 0.0, "mode": "fwd", "kind": "attention"}
    records = [
        {"kind": "ceiling", "name": "copy", "GB/s": 4000.0},
        {**shape, "impl": "fastgpt", "ms": 0.5, "TFLOP/s": 300.0},
        {**shape, "impl": "sdpa-flash", "ms": 0.6},
        {**shape, "impl": "sdpa-cudnn", "ms": 0.4},
        {**shape, "impl": "sdpa-efficient", "error": "RuntimeError: no kernel"},
        {**shape, "T": 2048, "impl": "fastgpt", "error": "RuntimeError: out of memory"},
        {"kind": "decode", "impl": "fastgpt", "B": 8, "S": 1024, "ms": 0.01, "GB/s": 2000.0},
        {"kind": "decode", "impl": "sdpa", "B": 8, "S": 1024, "ms": 0.02},
        {"kind": "elementwise", "op": "layer_norm", "direction": "fwd", "rows": 8192, "width": 768,
         "impl": "fastgpt", "ms": 0.01, "GB/s": 3000.0},
        {"kind": "elementwise", "op": "layer_norm", "direction": "fwd", "rows": 8192, "width": 768,
         "impl": "eager", "ms": 0.03},
    ]
    rows = {" ".join(row[0].split()): row for row in gpu_check.headline_rows(records)}  # labels, unpadded
    attention = rows["attention fwd T=1024 p=0.0"]
    assert attention[2] == "0.4000 (sdpa-cudnn)" and attention[3] == "0.80×" and attention[4] == "300.0 TFLOP/s"
    assert rows["attention fwd T=2048 p=0.0"][1].startswith("error: RuntimeError: out of memory")
    assert rows["decode B=8 S=1024"][3] == "2.00×" and rows["decode B=8 S=1024"][4] == "0.50 of copy"
    assert rows["layer_norm fwd N=768"][3] == "3.00×" and rows["layer_norm fwd N=768"][4] == "0.75 of copy"
    table = gpu_check.format_headline(list(rows.values()))
    assert all(row[0] in table and row[3] in table for row in rows.values())


def test_the_bench_step_times_the_suites_cases_into_records_the_headline_reads(gpu_check, tmp_path, monkeypatch):
    """gpu_check's bench step runs benchmarks/cases.py's cases (the op suites' own) against the peers
    `fastgpt check` does not time; their records carry what headline_rows matches on. The ceilings are
    called once; the peers with a CPU kernel are built, not timed (no interpreter here)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    sections = dict(gpu_check.bench_sections(dry=True))
    assert set(sections) == {"ceilings", "attention", "elementwise"}  # decode vs SDPA: the check times it
    impls = {case.record.get("impl") for name in ("attention", "elementwise") for case in sections[name]}
    assert impls == {"fastgpt", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "torch.compile"}  # no eager
    calls = []

    def timer(step):
        calls.append(step())
        return 2.0

    def built_only(step):
        return 2.0
    for name in ("ceilings", "attention", "elementwise"):
        for case in sections[name]:
            impl = case.record.get("impl")
            if name == "ceilings":
                gpu_check.measure(tmp_path, timer, case)
            elif impl in ("sdpa-flash", "torch.compile") and case.record.get("dropout", 0.0) == 0.0:  # CPU kernels
                gpu_check.measure(tmp_path, built_only, case)
    records = gpu_check.read_records(tmp_path)
    assert records and len(calls) == len([r for r in records if r["kind"] == "ceiling"])
    assert all("ms" in r and "error" not in r for r in records), [r for r in records if "error" in r]
    assert all(("TFLOP/s" in r) != ("GB/s" in r) for r in records)
    # Ours twice as slow as each peer: every case gets a headline row with the ratio 0.50×.
    ours = [{**r, "impl": "fastgpt", "ms": 4.0} for r in records if r["kind"] in ("attention", "decode", "elementwise")]
    # SDPA's flash kernel runs on CPU tensors: an attention peer that recorded nothing is a failure, not a skip.
    assert any(r["kind"] == "attention" for r in records), records
    rows = gpu_check.headline_rows(records + ours)
    assert len(rows) == len(ours) and all(row[3] == "0.50×" for row in rows), rows

def test_junit_counts_read_pytests_xml(gpu_check, tmp_path):
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="2.5">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_a" name="test_skip"><skipped/></testcase>'
        '</testsuite></testsuites>')
    counts = gpu_check.junit_counts(tmp_path)
    assert counts == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "time_s": 2.5,
                      "failed": ["tests.test_a::test_bad"]}


def test_the_check_refuses_a_folder_with_other_files_and_a_machine_without_cuda(gpu_check, tmp_path, capsys):
    (tmp_path / "old-results.json").write_text(json.dumps({}))
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main([str(tmp_path), "--dry-run"])
    assert stopped.value.code == 2 and "use an empty folder" in capsys.readouterr().err
    os.remove(tmp_path / "old-results.json")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.main([str(tmp_path)])
        assert "use --dry-run on a CPU machine" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main([str(tmp_path), "--steps", "env,nope"])
    assert "unknown steps ['nope']" in capsys.readouterr().err


def test_a_test_run_stopped_before_its_junit_file_is_counted_from_its_log(gpu_check, tmp_path):
    (tmp_path / "tests.txt").write_text(
        "[gw0] [ 10%] PASSED tests/test_a.py::test_one\n[gw1] [ 20%] FAILED tests/test_a.py::test_two\n"
        "[gw0] [ 30%] SKIPPED tests/test_a.py::test_three\ntests/test_b.py::test_four PASSED [ 40%]\n"
        "\n[gpu_check] stopped after its 150 s limit\n")
    assert gpu_check.log_counts(tmp_path) == {"passed": 2, "failed": 1, "error": 0, "skipped": 1}
    gpu_check.write_summary(tmp_path, dry=True, timings={"tests": "exit 124"})
    assert "2 passed, 1 failed" in (tmp_path / "summary.md").read_text()


def test_the_steps_fit_eight_minutes_and_keep_90_s_for_the_compiled_decode(gpu_check):
    assert sum(gpu_check.BUDGETS.values()) <= 8 * 60
    assert gpu_check.BUDGETS["decode_compiled"] == 90 and "decode_compiled" in gpu_check.NOT_IMPLEMENTED
    assert list(gpu_check.STEPS) == ["env", "tests", "check", "bench", "decode_compiled", "sanitizer", "profile"]
    assert set(gpu_check.DRY_BUDGETS) == set(gpu_check.BUDGETS)
    assert gpu_check.check_command(Path("rows.json"), dry=True)[-5:] == ["fastgpt", "check", "--json", "rows.json",
                                                                         "--interpret"]
    assert "--interpret" not in gpu_check.check_command(Path("rows.json"), dry=False)


_FAKE_CHECK = """
import json, sys
rows = [{"op": "layer_norm", "shape": "(16, 64) infer", "dtype": "float32", "triton_ms": 2.0, "eager_ms": 3.0,
         "speedup": 1.5, "max_error": 1e-7, "verdict": "triton", "status": "faster"}]
json.dump(rows, open(sys.argv[sys.argv.index("--json") + 1], "w"))
print("op          shape           verdict")
print("layer_norm  (16, 64) infer  triton")
print("1 case: 1 faster with Triton (median 1.5x), 0 kept on eager, 0 disagreements")
print("[fastgpt] check 1/1 layer_norm", file=sys.stderr)
"""


def test_the_check_step_records_the_rows_and_puts_the_table_in_the_summary(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "check_command",
                        lambda path, dry: [sys.executable, "-c", _FAKE_CHECK, "check", "--json", str(path)])
    assert gpu_check.step_check(tmp_path, dry=True, env=dict(os.environ), limit=60) == 0
    records = gpu_check.read_records(tmp_path)
    assert [r["kind"] for r in records] == ["check", "check-table"]
    assert records[0]["verdict"] == "triton" and records[0]["speedup"] == 1.5
    assert records[1]["exit"] == 0 and records[1]["rows"] == 1 and "reason" not in records[1]
    gpu_check.write_summary(tmp_path, dry=True, timings={"check": "exit 0"})
    summary = (tmp_path / "summary.md").read_text()
    assert "## fastgpt check" in summary and "1 case: 1 faster with Triton" in summary
    assert "`fastgpt check --json" in summary and "[fastgpt] check 1/1" not in summary  # progress stays out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.jsonl", "summary.md"]  # no extra file


def test_a_missing_or_failing_check_is_a_failed_step_with_its_reason(gpu_check, tmp_path, monkeypatch):
    missing = ("import sys; print(\"fastgpt: error: argument command: invalid choice: 'check'\", file=sys.stderr); "
               "sys.exit(2)")
    monkeypatch.setattr(gpu_check, "check_command", lambda path, dry: [sys.executable, "-c", missing, "check"])
    assert gpu_check.step_check(tmp_path, dry=True, env=dict(os.environ), limit=60) == 2
    gpu_check.write_summary(tmp_path, dry=True, timings={"check": "exit 2"})
    summary = (tmp_path / "summary.md").read_text()
    assert "FAILED: exit 2: fastgpt: error: argument command: invalid choice: 'check'" in summary
    hangs = "import time; time.sleep(30)"
    monkeypatch.setattr(gpu_check, "check_command", lambda path, dry: [sys.executable, "-c", hangs, "check"])
    assert gpu_check.step_check(tmp_path, dry=True, env=dict(os.environ), limit=1) == 124
    assert gpu_check.read_records(tmp_path)[-1]["reason"].startswith("stopped after its 1 s limit")


def test_the_reserved_step_records_that_it_is_not_implemented(gpu_check, tmp_path):
    assert gpu_check.step_not_implemented(tmp_path, "decode_compiled") == 0
    [record] = gpu_check.read_records(tmp_path)
    assert record == {"kind": "skipped", "name": "decode_compiled",
                      "reason": gpu_check.NOT_IMPLEMENTED["decode_compiled"]}

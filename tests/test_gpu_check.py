"""benchmarks/gpu_check.py's contract and arithmetic, without running a check (CI runs --dry-run itself)."""

import importlib.util
import json
import os
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
    """gpu_check's bench step runs benchmarks/cases.py's cases (the op suites' own); their records carry
    what headline_rows matches on. The peers' CPU cases, each called once (no interpreter, no compile)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    sections = dict(gpu_check.bench_sections(dry=True))
    assert set(sections) == {"ceilings", "attention", "decode", "elementwise"}
    calls = []

    def timer(step):
        calls.append(step())
        return 2.0
    for name in ("ceilings", "attention", "decode", "elementwise"):
        for case in sections[name]:
            impl = case.record.get("impl")
            if impl in ("eager", "sdpa") and case.record.get("dropout", 0.0) == 0.0 or name == "ceilings":
                gpu_check.measure(tmp_path, timer, case)
    records = gpu_check.read_records(tmp_path)
    assert records and len(calls) == len(records) and all("ms" in r and "error" not in r for r in records)
    assert all(("TFLOP/s" in r) != ("GB/s" in r) for r in records)
    # Ours twice as slow as each peer: every case gets a headline row with the ratio 0.50×.
    ours = [{**r, "impl": "fastgpt", "ms": 4.0} for r in records if r["kind"] in ("attention", "decode", "elementwise")]
    if not any(r["kind"] == "attention" for r in records):  # a CPU build without SDPA's CPU kernel
        pytest.skip("no attention peer ran")
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

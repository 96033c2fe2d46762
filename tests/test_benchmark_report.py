"""benchmarks/report.py: one pytest-benchmark JSON -> a markdown report with ratios, and throughput plots."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parent.parent / "benchmarks" / "report.py"


def _bench(test, group, impl_param, label, median, suite=None, seq_len=None, batch=1, **extra):
    info = {"impl": label, **extra}
    if suite:
        info.update(suite=suite, model="gpt2-small", dtype="bfloat16", batch=batch, seq_len=seq_len)
    return {"group": group, "name": f"{test}[{impl_param}]", "fullname": f"benchmarks/x.py::{test}[{impl_param}]",
            "params": {"impl": impl_param}, "param": impl_param, "extra_info": info, "options": {},
            "stats": {"min": median * 0.9, "max": median * 1.2, "mean": median, "stddev": 0.0, "rounds": 5,
                      "median": median, "iqr": 0.0, "q1": median, "q3": median, "iqr_outliers": 0,
                      "stddev_outliers": 0, "outliers": "0;0", "ld15iqr": median, "hd15iqr": median,
                      "ops": 1 / median, "total": 5 * median, "iterations": 1}}


def _report_json(tmp_path) -> Path:
    benches = []
    for seq_len, scale in ((256, 1.0), (1024, 4.0)):
        group = f"forward · gpt2-small bfloat16 · batch 8 × seq {seq_len}"
        for param, label, median in (("fastgpt-triton", "fastgpt (triton)", 0.010), ("fastgpt-eager",
                                     "fastgpt (eager)", 0.020), ("transformers", "transformers", 0.030)):
            seconds = median * scale
            benches.append(_bench("test_forward", group, param, label, seconds, suite="forward", seq_len=seq_len,
                                  batch=8, **{"tokens/s": 8 * seq_len / seconds, "MFU": 0.4 / scale}))
    # A batch sweep point at one length: a table, but no plot.
    benches.append(_bench("test_forward", "forward · gpt2-small bfloat16 · batch 1 × seq 1024", "fastgpt-eager",
                          "fastgpt (eager)", 0.005, suite="forward", seq_len=1024, **{"tokens/s": 204800.0}))
    # A kernel-level suite: no suite key, grouped by its file.
    for param, median in (("triton", 0.001), ("eager", 0.003)):
        bench = _bench("test_layer_norm_forward", "layer_norm fwd 8192x768", param, param, median, **{"GB/s": 1e3})
        bench["fullname"] = f"benchmarks/test_op_layer_norm.py::test_layer_norm[layer_norm-fwd-8192x768-{param}]"
        benches.append(bench)
    data = {"machine_info": {"node": "box", "fastgpt": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0",
                                                         "triton": "3.6.0", "transformers": "4.57.0",
                                                         "python": "3.12.3", "mode": "GPU, full sweep (--full)",
                                                         "compile_backend": "inductor", "model": "gpt2-small",
                                                         "dtype": "bfloat16", "note": None, "cuda": "12.8"}},
            "commit_info": {"id": "0123456789abcdef", "dirty": True}, "benchmarks": benches,
            "datetime": "2026-11-24T12:00:00+00:00", "version": "5.3.1"}
    path = tmp_path / "nvidia-h100-2026-11-24.json"
    path.write_text(json.dumps(data))
    return path


def _run(*args):
    return subprocess.run([sys.executable, str(REPORT), *map(str, args)], capture_output=True, text=True, timeout=300)


def _table_row(md: str, group: str, label: str) -> list[str]:
    section = md.split(f"### {group}\n", 1)[1].split("###", 1)[0]
    line = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_markdown_has_the_header_one_table_per_group_and_ratios_from_the_medians(tmp_path):
    pytest.importorskip("matplotlib")
    source, out = _report_json(tmp_path), tmp_path / "out"
    result = _run(source, out)
    assert result.returncode == 0, result.stderr
    md_path = out / "nvidia-h100-2026-11-24.md"
    md = md_path.read_text()
    # The header says what ran where: device, versions, mode, compile backend, commit.
    for fragment in ("NVIDIA H100 80GB HBM3", "2.11.0", "3.6.0", "4.57.0", "GPU, full sweep (--full)", "inductor",
                     "0123456789ab"):
        assert fragment in md.split("###", 1)[0], fragment
    # The model suite and the op suite (no extra_info["suite"]: by its file) get sections of their own.
    assert md.index("## Model forward") < md.index("### forward ·")
    assert md.index("### layer_norm fwd 8192x768") > md.index("## ", md.index("### forward ·"))
    group = "forward · gpt2-small bfloat16 · batch 8 × seq 1024"
    columns = _table_row(md.replace("| implementation |", "| header |"), group, "header")

    def cell(label, column):
        return _table_row(md, group, label)[columns.index(column)]
    # 0.04 s, 0.08 s, 0.12 s: Triton is 2× eager and 3× transformers (ratios of medians).
    assert [cell("fastgpt (triton)", c) for c in ("vs eager", "vs transformers")] == ["2.00×", "3.00×"]
    assert [cell("fastgpt (eager)", c) for c in ("vs eager", "vs transformers")] == ["1.00×", "1.50×"]
    assert [cell("transformers", c) for c in ("vs eager", "vs transformers")] == ["0.67×", "1.00×"]
    assert cell("fastgpt (triton)", "MFU").startswith("10.0")
    # Rows in a fixed order, groups in natural order (seq 256 before seq 1024).
    table = md.split(f"### {group}\n", 1)[1]
    assert table.index("| fastgpt (triton) |") < table.index("| fastgpt (eager) |") < table.index("| transformers |")
    assert md.index("batch 1 × seq 1024") < md.index("batch 8 × seq 256") < md.index("batch 8 × seq 1024")
    kernel = "layer_norm fwd 8192x768"
    assert "3.00×" in _table_row(md, kernel, "triton")  # eager's median over Triton's

    # One plot: the forward sweep at batch 8 (batch 1 has a single length).
    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == ["nvidia-h100-2026-11-24-forward-b8.png"]
    png = (out / plots[0]).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert "](nvidia-h100-2026-11-24-forward-b8.png)" in md  # the markdown shows it
    assert result.stdout.split() == [str(md_path), str(out / plots[0])]


def test_no_plots_needs_no_matplotlib(tmp_path):
    out = tmp_path / "out"
    result = _run(_report_json(tmp_path), out, "--no-plots", "--title", "My run")
    assert result.returncode == 0, result.stderr
    assert (out / "nvidia-h100-2026-11-24.md").read_text().startswith("# My run\n")
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ("not json", "not JSON"),
    ('{"results": []}', "not a pytest-benchmark report"),
    ('{"benchmarks": []}', "holds no timed benchmarks"),
])
def test_bad_input_is_a_clear_error(tmp_path, content, message):
    source = tmp_path / "in.json"
    if content is not None:
        source.write_text(content)
    result = _run(source, tmp_path / "out")
    assert result.returncode == 2
    assert re.search(f"error: .*{message}", result.stderr) and "Traceback" not in result.stderr

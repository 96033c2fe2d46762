"""`fastgpt check` and `fastgpt.check(...)`: the verdict table, end to end under the interpreter."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import fastgpt
from fastgpt import checking, trust, verdicts

CLOSING = re.compile(r"^(\d+) cases: (\d+) faster with Triton( \(median [\d.]+×\))?, (\d+) kept on eager, "
                     r"(\d+) disagreements?", re.M)


def _fastgpt(*args, cwd, **env):
    # A scratch folder keeps the repository root off sys.path; no GPU, whatever the machine.
    return subprocess.run([sys.executable, "-m", "fastgpt", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env={**os.environ, "FASTGPT_BACKEND": "", "CUDA_VISIBLE_DEVICES": "",
                                            "TRITON_INTERPRET": "0", **env})


def test_check_interpret_end_to_end(tmp_path):
    cache = tmp_path / "verdicts.json"
    done = _fastgpt("check", "--interpret", "--dtype", "float32", "--op", "layer_norm", "--op", "causal_attention",
                    "--op", "linear_cross_entropy", "--json", str(tmp_path / "rows.json"),
                    cwd=tmp_path, FASTGPT_VERDICTS=str(cache))
    assert done.returncode == 0, done.stderr[-3000:]
    closing = CLOSING.search(done.stdout)
    assert closing, done.stdout
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert int(closing.group(1)) == len(rows) == 6   # layer_norm ×2, attention ×3, loss ×1
    assert int(closing.group(5)) == 0                 # the real kernels agree with eager
    assert {r["op"] for r in rows} == {"layer_norm", "causal_attention", "linear_cross_entropy"}
    assert all(r["status"] in ("faster", "slower") and r["max_error"] < 1e-4 for r in rows), rows
    assert "[fastgpt] check 6/6" in done.stderr       # progress on stderr
    saved = json.loads(cache.read_text())["verdicts"]
    assert len(saved) == 6 and all(v["path"] in ("triton", "eager") for v in saved.values())


def test_check_without_cuda_says_so_and_exits_0(tmp_path):
    done = _fastgpt("check", cwd=tmp_path, FASTGPT_VERDICTS=str(tmp_path / "v.json"))
    assert done.returncode == 0
    assert "no CUDA device" in done.stdout and not (tmp_path / "v.json").exists()


def test_check_refuses_bad_choices(tmp_path):
    done = _fastgpt("check", "--interpret", "--op", "softmax", cwd=tmp_path, FASTGPT_VERDICTS="off")
    assert done.returncode == 2 and "unknown op 'softmax'" in done.stderr
    with pytest.raises(ValueError, match="bfloat16.*interpreter"):
        fastgpt.check(interpret=True, dtypes=["bfloat16"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpret=True needs the interpreter from the start; "
                                                     "on a GPU the subprocess test above runs it")
def test_the_python_twin_returns_the_rows_and_records_them(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTGPT_VERDICTS", str(tmp_path / "v.json"))
    verdicts.reset()
    trust.reset()
    monkeypatch.setattr(trust, "clock", lambda which, fn, reps, device: [1.0 if which == "triton" else 3.0] * reps)
    lines = []
    rows = fastgpt.check(ops=["gelu"], dtypes=["float16"], interpret=True, progress=lines.append)
    assert [(r.op, r.dtype, r.pass_) for r in rows] == [("gelu", "float16", "forward"), ("gelu", "float16", "fwd+bwd")]
    assert all(r.verdict == "triton" and r.speedup == 3.0 for r in rows)
    assert len(lines) == 2
    assert checking.summary(rows) == "2 cases: 2 faster with Triton (median 3.0×), 0 kept on eager, 0 disagreements"
    assert len(verdicts.store().entries()) == 2
    verdicts.reset()
    trust.reset()


def test_the_gpu_matrix_covers_the_issue(monkeypatch):
    cases = checking.cases()
    ops = {c.op for c in cases}
    assert ops == {"layer_norm", "gelu", "linear_gelu", "dropout_add_layer_norm", "causal_attention",
                   "cached_attention", "linear_cross_entropy"}
    labels = " ".join(c.label for c in cases)
    for text in ("(8192, 1600)", "T=8192", "T=1024", "cache=128", "cache=8192", "p=0.1", "train", "infer"):
        assert text in labels

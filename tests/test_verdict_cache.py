"""The per-user verdict file (fastgpt/verdicts.py): round trip, two writers, corrupt files, relocation, off."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from fastgpt import ops, trust, verdicts


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTGPT_VERDICTS", str(tmp_path / "verdicts.json"))
    verdicts.reset()
    trust.reset()
    yield
    verdicts.reset()
    trust.reset()


def entry(key, path="triton"):
    return {"key": key, "op": "gelu", "shape": "rows=8 width=64", "dtype": "float32", "device": "cpu",
            "path": path, "status": "faster" if path == "triton" else "slower"}


def test_round_trip(tmp_path):
    verdicts.store().put("a", entry("a"))
    verdicts.reset()  # a new process
    assert verdicts.store().get("a") == entry("a")
    saved = json.loads((tmp_path / "verdicts.json").read_text())
    assert saved["format"] == verdicts.FORMAT and list(saved["verdicts"]) == ["a"]


def test_two_writers_keep_each_others_verdicts(tmp_path):
    first, second = verdicts.VerdictStore(), verdicts.VerdictStore()
    first.get("x"), second.get("x")  # both read the file before either writes
    first.put("from first", entry("from first"))
    second.put("from second", entry("from second", "eager"))
    assert set(json.loads((tmp_path / "verdicts.json").read_text())["verdicts"]) == {"from first", "from second"}


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    script = ("import sys; from fastgpt import verdicts\n"
              "for i in range(25):\n"
              "    k = f'{sys.argv[1]}-{i}'; verdicts.store().put(k, {'key': k, 'path': 'eager'})\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, name], cwd=tmp_path, env=dict(os.environ))
             for name in ("p", "q")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    saved = json.loads((tmp_path / "verdicts.json").read_text())["verdicts"]
    assert len(saved) == 50


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "someone-else", "verdicts": {}}), "[1, 2]"])
def test_a_corrupt_or_foreign_file_warns_once_is_ignored_and_left_alone(tmp_path, content):
    path = tmp_path / "verdicts.json"
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match="not a fastgpt verdict file"):
        assert verdicts.store().get("a") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verdicts.store().put("a", entry("a"))      # kept in this process, not written over the file
        assert verdicts.store().get("a") == entry("a")
    assert path.read_text() == content


def test_relocation_and_the_default_place(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTGPT_VERDICTS", str(tmp_path / "deep" / "er" / "v.json"))
    verdicts.store().put("a", entry("a"))
    assert (tmp_path / "deep" / "er" / "v.json").exists()
    monkeypatch.delenv("FASTGPT_VERDICTS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert verdicts.cache_path() == str(tmp_path / "xdg" / "fastgpt" / "verdicts.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert verdicts.cache_path() == str(tmp_path / "home" / ".cache" / "fastgpt" / "verdicts.json")


def test_off_disables_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTGPT_VERDICTS", "off")
    assert verdicts.cache_path() is None
    verdicts.store().put("a", entry("a"))
    assert verdicts.store().get("a") == entry("a")  # this process still remembers
    assert list(tmp_path.iterdir()) == []


def test_a_verdict_from_the_file_is_used_without_measuring(monkeypatch):
    monkeypatch.setattr(trust, "_policy", "check")
    monkeypatch.setattr(ops, "_measure_on_cpu", True)
    calls = []
    monkeypatch.setattr(ops, "_triton_kernel", lambda op: ((lambda x: calls.append(x) or F.gelu(x)),
                                                           lambda *a: None))
    x = torch.randn(8, 64)
    key = trust.full_key(trust.short_key("gelu", (x,)))
    verdicts.store().put(key, entry(key, "eager"))
    verdicts.reset()
    ops.gelu(x)
    assert trust.measured["gelu"] == 0 and not calls and ops.dispatch_counts[("gelu", "eager")] == 1

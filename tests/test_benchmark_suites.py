"""The benchmark suites' cases on a machine without CUDA (collected, not run: CI runs them)."""

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL_SUITES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("test_model_*.py"))
OP_SUITES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("test_op_*.py"))

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU cases; a GPU runs them all")


def _pytest(*args):
    # The pytest script, not `python -m pytest`: the repository root stays off sys.path (docs/design.md).
    script = Path(sys.executable).parent / "pytest"
    return subprocess.run([str(script), "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_cpu_cases_are_the_meaningful_ones():
    result = _pytest("--collect-only", "-q", *MODEL_SUITES, *OP_SUITES)
    assert result.returncode == 0, result.stdout + result.stderr
    collected = re.findall(r"^(benchmarks/test_\w+\.py)::(test_\w+)\[(.+)\]$", result.stdout, re.MULTILINE)
    # Every suite has cases here, and none runs a Triton kernel: the interpreter is not a speed.
    assert {path for path, _, _ in collected} >= set(OP_SUITES) | {"benchmarks/test_model_forward.py"}
    assert not [case for case in collected if "fastgpt-triton" in case[2] or re.search(r"-fastgpt(-p|$)", case[2])]
    by_test = defaultdict(lambda: defaultdict(set))
    for _, test, params in collected:
        shape = re.match(r"B(\d+)-T(\d+)-([\w.-]+)$", params)
        if shape:
            by_test[test][shape[3]].add((int(shape[1]), int(shape[2])))
    assert by_test
    for test, impls in by_test.items():
        # torch.compile at one shape at most (its compiles are slow on a CPU); the others at the same shapes.
        assert len(impls.pop("torch.compile", {None})) == 1, test
        shapes = list(impls.values())
        assert len(impls) >= 2 and all(s == shapes[0] for s in shapes), test


def test_the_full_sweep_needs_cuda():
    result = _pytest("--collect-only", "-q", "--full", "benchmarks/test_model_forward.py")
    assert result.returncode != 0
    assert "--full is the GPU sweep and needs a CUDA device" in result.stderr

"""The model-level benchmark suites' cases on a machine without CUDA (collected, not run: CI runs them)."""

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SUITES = ["benchmarks/test_model_forward.py", "benchmarks/test_model_training.py",
          "benchmarks/test_model_generation.py"]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU cases; a GPU runs them all")


def _pytest(*args):
    # The pytest script, not `python -m pytest`: the repository root stays off sys.path (DESIGN.md).
    script = Path(sys.executable).parent / "pytest"
    return subprocess.run([str(script), "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_cpu_cases_are_the_meaningful_ones():
    result = _pytest("--collect-only", "-q", *SUITES)
    assert result.returncode == 0, result.stdout + result.stderr
    ids = re.findall(r"::(test_\w+)\[B(\d+)-T(\d+)-([\w.-]+)\]", result.stdout)
    assert len(ids) > 20
    by_test = defaultdict(lambda: defaultdict(set))
    for test, batch, seq, impl in ids:
        by_test[test][impl].add((int(batch), int(seq)))
    # The fused loss against the unfused one at GPT-2 small's width: two implementations, one shape.
    assert {impl: shapes for impl, shapes in by_test.pop("test_fused_loss_memory").items()} == \
        {"fastgpt-fused": {(4, 256)}, "fastgpt-eager": {(4, 256)}}
    for test, impls in by_test.items():
        # No Triton case without CUDA (the interpreter is not a speed); training adds the fused loss ...
        extra = {"fastgpt-fused"} if test == "test_train_step" else set()
        assert set(impls) == {"fastgpt-eager", "torch.compile", "transformers"} | extra, test
        # ... torch.compile at one shape (its compiles are slow on a CPU), the others at every shape.
        assert len(impls["torch.compile"]) == 1 and impls["fastgpt-eager"] == impls["transformers"], test
        assert impls["torch.compile"] <= impls["fastgpt-eager"] and len(impls["fastgpt-eager"]) >= 2, test
        assert all(impls[impl] == impls["fastgpt-eager"] for impl in extra), test
    assert set(by_test) == {"test_forward", "test_train_step", "test_prefill", "test_first_token", "test_decode"}


def test_the_full_sweep_needs_cuda():
    result = _pytest("--collect-only", "-q", "--full", SUITES[0])
    assert result.returncode != 0
    assert "--full is the GPU sweep and needs a CUDA device" in result.stderr

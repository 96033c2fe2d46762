"""`fastgpt profile`: the main job prints its figures on a CPU-only machine, and bad options fail clearly."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fastgpt.profiling import profile_forward


def _fastgpt(*args: str, cwd) -> subprocess.CompletedProcess:
    # Run from a scratch folder so the repository root is not on sys.path.
    return subprocess.run([sys.executable, "-m", "fastgpt", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, "FASTGPT_BACKEND": ""})


def test_profile_prints_latency_throughput_and_paths(tmp_path):
    result = _fastgpt("profile", "--seq-len", "16", "--batch", "2", "--warmup", "1", "--iters", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "gpt2-small, random weights, 163.0M parameters (124.4M with the output head tied)" in out
    assert "device     cpu, float32, backend auto" in out
    assert "causal_attention eager×12, gelu eager×12, layer_norm eager×25" in out
    assert "batch 2 × seq_len 16, 3 timed forward passes" in out
    median = float(re.search(r"latency    median ([\d.]+) ms", out).group(1))
    tokens_per_s = float(re.search(r"throughput ([\d,]+) tokens/s", out).group(1).replace(",", ""))
    assert median > 0
    assert tokens_per_s == pytest.approx(2 * 16 / (median / 1000), rel=0.01)
    assert "pass 3/3" in result.stderr  # progress goes to stderr, figures to stdout


def test_console_script_is_installed():
    bin_dir = os.path.dirname(sys.executable)
    assert shutil.which("fastgpt", path=bin_dir), f"no fastgpt command in {bin_dir}"


@pytest.mark.parametrize("args,fragment", [
    (["profile", "--backend", "cuda"], "invalid choice: 'cuda'"),
    (["profile", "--seq-len", "2000"], "seq_len must be in [1, 1024] (the context length), got 2000"),
    (["profile", "--batch", "0"], "must be a positive integer, got 0"),
    (["profile", "--backend", "triton", "--iters", "1", "--warmup", "0"], "no Triton kernel for"),
    (["profile", "--dtype", "float64"], "invalid choice: 'float64'"),
    (["tokenize"], "invalid choice: 'tokenize'"),
])
def test_bad_options_exit_2_with_a_message_and_no_traceback(tmp_path, args, fragment):
    result = _fastgpt(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_cuda_is_a_clear_error(tmp_path):
    result = _fastgpt("profile", "--device", "cuda", cwd=tmp_path)
    assert result.returncode == 2
    assert "device 'cuda' requested but torch.cuda.is_available() is False" in result.stderr


def test_profile_forward_reports_what_it_measured():
    result = profile_forward(size="124M", seq_len=4, warmup=0, iters=2, backend="eager")
    assert len(result.latencies_ms) == 2 and all(t > 0 for t in result.latencies_ms)
    assert result.paths == {"causal_attention": {"eager": 12}, "gelu": {"eager": 12}, "layer_norm": {"eager": 25}}

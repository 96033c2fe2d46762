"""`fastgpt profile`: the main job prints its figures on a CPU-only machine, and bad options fail clearly."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from fastgpt.profiling import profile


def _fastgpt(*args: str, cwd, **env) -> subprocess.CompletedProcess:
    # Run from a scratch folder so the repository root is not on sys.path. These tests
    # check the CLI on a CPU: a GPU machine hides its GPUs from it (benchmarks/gpu_check.py
    # runs the CUDA profile).
    return subprocess.run([sys.executable, "-m", "fastgpt", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env={**os.environ, "FASTGPT_BACKEND": "", "TRITON_INTERPRET": "0",
                                            "CUDA_VISIBLE_DEVICES": "", **env})


def _number(pattern: str, text: str) -> float:
    return float(re.search(pattern, text).group(1).replace(",", ""))


def test_profile_prints_latency_throughput_paths_and_the_op_table(tmp_path):
    result = _fastgpt("profile", "--seq-len", "16", "--batch", "2", "--warmup", "1", "--iters", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("fastgpt profile · forward · gpt2-small, random weights\n")
    assert ("model       163.0M parameters (124.4M with the output head tied; 123.6M in matmuls)") in out
    assert re.search(r"device      cpu: .*, \d+ threads · float32 · backend auto", out)
    assert ("paths       causal_attention eager×12, dropout_add_layer_norm eager×12, layer_norm eager×13, "
            "linear_gelu eager×12  (calls per pass)") in out
    assert "batch 2 × seq_len 16, 3 timed forward passes after 1 warm-up" in out
    median = _number(r"latency     median ([\d.,]+) ms per pass", out)
    assert median > 0
    # tokens/s at the median, as printed (whole tokens/s from 100 up, one decimal below).
    assert _number(r"throughput  ([\d.,]+) tokens/s", out) == pytest.approx(2 * 16 / (median / 1000), rel=0.01,
                                                                          abs=0.06)
    assert "MFU n/a on cpu: pass --peak-tflops" in out
    assert re.search(r"memory      peak [\d,]+ MiB, [\d,]+ MiB before the timed steps", out)
    # The per-op table: every group with its share and path; the shares add up.
    assert "self CPU time, per pass over 3 profiled passes" in out
    shares = {}
    for group in ("attention", "layernorm", "gelu", "matmul", "other"):
        line = re.search(rf"^{group} +([\d.,]+) +([\d.]+)% +(.*)$", out, re.M)
        assert line, f"no {group} row in\n{out}"
        shares[group] = float(line.group(2))
    assert sum(shares.values()) == pytest.approx(100, abs=0.3)
    assert re.search(r"^attention .*causal_attention eager×12$", out, re.M)
    assert re.search(r"^  aten::native_layer_norm +25 ", out, re.M)
    assert re.search(r"^total +[\d.,]+ +100\.0%$", out, re.M)
    # Progress goes to stderr, figures to stdout.
    assert "pass 3/3" in result.stderr and "profiling 3 more passes" in result.stderr
    assert "[fastgpt]" not in out


def test_quiet_json_and_trace(tmp_path):
    report, trace = tmp_path / "report.json", tmp_path / "trace.json"
    result = _fastgpt("profile", "--seq-len", "8", "--warmup", "0", "--iters", "2", "--quiet", "--json", str(report),
                      "--trace", str(trace), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # --quiet: no progress, and none of the profiler's own chatter either
    data = json.loads(report.read_text())
    run = data["runs"][0]
    assert data["tool"] == "fastgpt profile" and run["mode"] == "forward" and run["seq_len"] == 8
    assert len(run["latency_ms"]["all"]) == 2
    assert run["tokens_per_s"] == pytest.approx(8 / (run["latency_ms"]["median"] / 1000))
    assert {g["name"] for g in run["ops"]["groups"]} == {"attention", "layernorm", "gelu", "matmul", "other"}
    assert json.loads(trace.read_text())["traceEvents"]
    assert f"trace       {trace}" in result.stdout


def test_json_to_stdout_replaces_the_table(tmp_path):
    result = _fastgpt("profile", "--mode", "generate", "--seq-len", "8", "--new-tokens", "3", "--warmup", "0",
                      "--iters", "1", "--no-ops", "--json", "-", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)["runs"][0]
    assert run["mode"] == "generate" and run["new_tokens"] == 3 and run["ops"] is None
    assert run["generation"]["decode_tokens_per_s_median"] > 0
    assert run["paths_per_pass"]["cached_attention"] == {"eager": 24}  # 12 layers × 2 decode steps
    assert run["paths_per_pass"]["causal_attention"] == {"eager": 12}  # the prefill


def test_train_step_mode(tmp_path):
    result = _fastgpt("profile", "--mode", "train-step", "--seq-len", "8", "--warmup", "0", "--iters", "1",
                      "--no-ops", "--peak-tflops", "100", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "batch 1 × seq_len 8, 1 timed steps (forward + backward + AdamW) after 0 warm-up" in out
    assert re.search(r"\(\d[\d.]* GFLOP/token, 6·N \+ 12·L·T·d\); MFU [\d.]+% of 100 TFLOP/s \(given\)", out)
    assert "train steps use the preset's dropout (0.1)" in out


def test_help_and_version_answer_without_loading_torch_even_with_a_bad_backend_variable(tmp_path):
    code = ("import sys\nfrom fastgpt.cli import main\n"
            "for args in (['--help'], ['--version'], ['profile', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit as stop:\n        assert stop.code == 0, stop.code\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    env = {**os.environ, "FASTGPT_BACKEND": "junk"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "usage: fastgpt" in result.stdout and "fastgpt 0.1.0" in result.stdout
    assert result.stderr.strip() == "False"
    # The variable is still refused, clearly, once a command needs the backends.
    ran = _fastgpt("profile", "--iters", "1", cwd=tmp_path, FASTGPT_BACKEND="junk")
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert "environment variable FASTGPT_BACKEND='junk': unknown backend 'junk'" in ran.stderr


def test_the_backend_variable_is_honoured_and_backend_overrides_it(tmp_path):
    forced = _fastgpt("profile", "--seq-len", "4", "--iters", "1", "--warmup", "0", "--no-ops", cwd=tmp_path,
                      FASTGPT_BACKEND="triton")
    assert forced.returncode == 2 and "backend 'triton' is forced on a cpu device" in forced.stderr
    chosen = _fastgpt("profile", "--seq-len", "4", "--iters", "1", "--warmup", "0", "--no-ops", "--backend", "eager",
                      cwd=tmp_path, FASTGPT_BACKEND="triton")
    assert chosen.returncode == 0, chosen.stderr
    assert "backend eager" in chosen.stdout
    per_op = _fastgpt("profile", "--seq-len", "4", "--iters", "1", "--warmup", "0", "--no-ops", cwd=tmp_path,
                      FASTGPT_BACKEND="auto,gelu=eager")
    assert per_op.returncode == 0, per_op.stderr
    assert "backend auto,gelu=eager" in per_op.stdout


def test_outputs_are_checked_before_the_work_and_the_trace_is_really_written(tmp_path):
    folder = tmp_path / "traces"
    folder.mkdir()
    result = _fastgpt("profile", "--trace", str(folder), cwd=tmp_path)
    assert result.returncode == 2 and f"cannot write the trace to {folder}: it is a folder" in result.stderr
    assert "warm-up" not in result.stderr and "building" not in result.stderr  # refused before any work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["traces"]  # and no stray DIR.tmp
    result = _fastgpt("profile", "--json", str(tmp_path / "no-folder" / "r.json"), cwd=tmp_path)
    assert result.returncode == 2 and "building" not in result.stderr


def test_the_cli_names_the_backends_ops_has():
    from fastgpt import cli, ops
    assert cli.BACKENDS == ops.BACKENDS


def test_console_script_is_installed():
    bin_dir = os.path.dirname(sys.executable)
    assert shutil.which("fastgpt", path=bin_dir), f"no fastgpt command in {bin_dir}"


@pytest.mark.parametrize("args,fragment", [
    (["profile", "--backend", "cuda"], "invalid choice: 'cuda'"),
    (["profile", "--mode", "backward"], "invalid choice: 'backward'"),
    (["profile", "--seq-len", "2000"], "seq_len must be in [1, 1024] (the context length), got 2000"),
    (["profile", "--batch", "0"], "must be a positive integer, got 0"),
    (["profile", "--warmup", "-1"], "must be an integer >= 0, got -1"),
    (["profile", "--backend", "triton", "--iters", "1", "--warmup", "0"], "backend 'triton' is forced on a cpu device"),
    (["profile", "--dtype", "float64"], "invalid choice: 'float64'"),
    (["profile", "--new-tokens", "8"], "new_tokens applies to mode 'generate' only, not 'forward'"),
    (["profile", "--mode", "generate", "--seq-len", "1000", "--new-tokens", "64"],
     "a 1000-token prompt and 64 new tokens need 1063 cache positions, more than the context length 1024"),
    (["profile", "--peak-tflops", "0"], "must be a positive number, got 0"),
    (["profile", "--trace", "no/such/folder/trace.json"], "cannot write the trace to no/such/folder/trace.json"),
    (["profile", "--json", "no/such/folder/r.json"], "cannot write the JSON report to no/such/folder/r.json"),
    (["profile", "--compare", "--backend", "eager"], "--compare runs the eager and Triton backends itself"),
    (["profile", "--compare"], "--compare needs Triton kernels that run on cpu"),
    (["tokenize"], "invalid choice: 'tokenize'"),
])
def test_bad_options_exit_2_with_a_message_and_no_traceback(tmp_path, args, fragment):
    result = _fastgpt(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_forced_triton_that_cannot_run_here_is_refused_before_any_work(tmp_path):
    result = _fastgpt("profile", "--backend", "triton", "--seq-len", "4", "--iters", "1", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    # The error is the one line on stderr: no progress line went before it.
    assert result.stderr.startswith("fastgpt profile: error: backend 'triton' is forced on a cpu device; ")
    assert "TRITON_INTERPRET=1" in result.stderr and result.stderr.count("\n") == 1
    assert "building" not in result.stderr and "warm-up" not in result.stderr


def _main_without_torch(*args: str, cwd) -> subprocess.CompletedProcess:
    """``fastgpt ARGS`` in a fresh process that prints its exit code and whether torch was imported."""
    code = ("import sys\nfrom fastgpt.cli import main\n"
            "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as stop:\n    code = stop.code\n"
            "print(code, 'torch' in sys.modules)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "FASTGPT_BACKEND": "", "CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.parametrize("command", [["profile"], ["generate", "x"]])
@pytest.mark.parametrize("device,message", [
    ("bogus", "unknown device 'bogus'; use cpu, cuda, cuda:N or mps"),
    ("cuda:x", "unknown device 'cuda:x'; use cpu, cuda, cuda:N or mps"),
    ("meta", "device 'meta' holds shapes but no data, so it cannot run a model; use cpu, cuda or mps"),
])
def test_a_malformed_device_is_refused_before_torch_is_imported(tmp_path, command, device, message):
    result = _main_without_torch(*command, "--device", device, cwd=tmp_path)
    assert result.stdout == "2 False\n", result.stderr
    assert result.stderr == f"fastgpt {command[0]}: error: {message}\n"


def test_asking_for_cuda_without_cuda_is_a_clear_error(tmp_path):
    result = _fastgpt("profile", "--device", "cuda", cwd=tmp_path)
    assert result.returncode == 2
    assert "device 'cuda' requested but torch.cuda.is_available() is False" in result.stderr


def test_profile_reports_what_it_measured_for_a_preset():
    result = profile(size="124M", seq_len=4, warmup=0, iters=2, backend="eager", profile_ops=False)
    assert len(result.latencies_ms) == 2 and all(t > 0 for t in result.latencies_ms)
    assert result.size == "124M" and result.parameters == 163_009_536 and result.ops is None
    assert result.paths == {"causal_attention": {"eager": 12}, "dropout_add_layer_norm": {"eager": 12},
                            "layer_norm": {"eager": 13}, "linear_gelu": {"eager": 12}}

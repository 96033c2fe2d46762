"""Interleaved timing: every implementation of one shape measured round by round, in rotating order.

Timing one implementation's rounds back to back, then the next one's, lets a
burst of machine load (another process on a shared 2-core CPU, a frequency
change) land on one implementation and not another, so their ratio measures
the machine. Here each round runs every implementation once -- in an order
rotated every round, so none is always first after the others -- and the
ratios are ratios of medians taken from the same rounds.

pytest-benchmark still gets one case per implementation (its tables and
``benchmarks/report.py`` compare cases of one group): ``report`` hands a case
the durations its implementation took in the shared rounds, which the model
suites measure once per shape, in that shape's first case.

An implementation's call may be split into timed phases (a training step:
forward + backward, then the optimizer); its round's duration is their sum,
and each phase's median is recorded too. ``peak memory`` is measured once per
implementation, on one untimed call of every phase, after its warm-up.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fastgpt.profiling.run import _PeakMemory
from timing import synchronized


@dataclass
class Contender:
    """One implementation: its phases, in order (name -> callable taking ``setup()``'s arguments)."""

    phases: dict[str, Callable]
    setup: Optional[Callable[[], tuple]] = None  # untimed, before every call; returns the phases' arguments
    warm_up: Optional[Callable[[], None]] = None  # untimed, once, before the rounds (default: one call)
    info: dict = field(default_factory=dict)  # what the warm-up found out (dispatch paths, ...), for the report


@dataclass
class Measured:
    durations: list[float]                                   # seconds per round, all phases
    phases: dict[str, list[float]] = field(default_factory=dict)
    peak_memory_bytes: Optional[int] = None                  # growth over one call: above what existed before it
    peak_memory_method: str = ""
    order: str = ""


def measure(contenders: dict[str, Contender], rounds: int, device: torch.device) -> dict[str, Measured]:
    """Warm each contender up, measure its peak memory, then time ``rounds`` rounds of all of them interleaved."""
    timed = {name: {phase: synchronized(fn, device) for phase, fn in c.phases.items()}
             for name, c in contenders.items()}

    def call(name: str) -> dict[str, float]:
        contender = contenders[name]
        args = contender.setup() if contender.setup else ()
        seconds = {}
        for phase, fn in timed[name].items():
            start = time.perf_counter()
            fn(*args)
            seconds[phase] = time.perf_counter() - start
        return seconds

    results = {}
    for name, contender in contenders.items():
        contender.warm_up() if contender.warm_up else call(name)
        peak = _PeakMemory(device)
        peak.start()
        call(name)
        memory = peak.stop()
        growth = None if memory.peak_bytes is None or memory.before_bytes is None else \
            memory.peak_bytes - memory.before_bytes
        results[name] = Measured([], {phase: [] for phase in contender.phases}, growth, memory.method)
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds = call(name)
            results[name].durations.append(sum(seconds.values()))
            for phase, s in seconds.items():
                results[name].phases[phase].append(s)
    for measured in results.values():
        measured.order = f"{rounds} rounds of {', '.join(names)} interleaved (order rotated each round)"
    return results


def report(benchmark, measured: Measured, peers: dict[str, Measured]) -> None:
    """Give pytest-benchmark this implementation's rounds, and record phases, memory and ratios to its peers."""
    info = benchmark.extra_info
    if measured.peak_memory_bytes is not None:
        info["peak memory MiB"] = round(measured.peak_memory_bytes / 2**20, 1)
        info["peak memory"] = f"growth over one call; {measured.peak_memory_method}"
    # pytest-benchmark has no public way to take durations measured elsewhere. Do
    # what its pedantic() does: mark the fixture used, fill the stats object
    # _make_stats returns, one update per round (--benchmark-disable: no stats).
    benchmark._mode = "interleaved rounds (benchmarks/interleaved.py)"
    if benchmark.disabled or not measured.durations:
        return
    info["timing"] = measured.order
    for phase, seconds in measured.phases.items():
        if len(measured.phases) > 1:
            info[f"{phase} s"] = round(statistics.median(seconds), 6)
    mine = statistics.median(measured.durations)
    # A peer's median over this one's (above 1: this one is faster), from the same rounds.
    info["speed-up vs"] = {peer: round(statistics.median(m.durations) / mine, 4) for peer, m in peers.items()
                           if m is not measured}
    make_stats = getattr(benchmark, "_make_stats", None)
    if make_stats is None:
        raise RuntimeError("this pytest-benchmark has no BenchmarkFixture._make_stats; the interleaved suites "
                           "need it to report their rounds (pytest-benchmark 3.1 to 5.x have it)")
    stats = make_stats(1)
    for seconds in measured.durations:
        stats.update(seconds)

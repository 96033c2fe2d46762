"""The tile-config tuner (kernels/autotune.py). Its timing runs on a GPU only, so here it times
with a stand-in clock; the rules around it (capture, failures, cache, keys) are the same.
"""

import json
import warnings

import pytest
import torch

from fastgpt.kernels import autotune
from fastgpt.kernels.autotune import Config, Tuner

pytestmark = pytest.mark.kernels

A, B, C = Config(64, 32, 4, 2), Config(128, 64, 8, 3), Config(32, 16, 4, 2)


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """The tuner as on a GPU: not pinned, not in the interpreter, a stand-in clock."""
    monkeypatch.setattr(autotune, "interpreter_on", lambda: False)
    monkeypatch.delenv(autotune.PINNED_ENV, raising=False)
    monkeypatch.delenv(autotune.TUNE_CACHE_ENV, raising=False)
    times = {A: 2.0, B: 1.0, C: 3.0}
    timed = []

    def bench(fn):
        config = fn()
        timed.append(config)
        if isinstance(times[config], Exception):
            raise times[config]
        return times[config]
    monkeypatch.setattr(autotune, "_bench", bench)
    return times, timed


def launch(config):
    return config  # the stand-in clock reads which config "ran"


def test_the_fastest_candidate_wins_and_is_remembered(tuning):
    times, timed = tuning
    tuner = Tuner()
    assert tuner.choose("fwd", "key", [A, B], launch, C) == B
    assert timed == [A, B]
    assert tuner.choose("fwd", "key", [A, B], launch, C) == B and timed == [A, B]  # cached: no second tuning
    [record] = tuner.records
    assert record.chosen == repr(B) and record.timings_ms == {repr(A): 2.0, repr(B): 1.0} and record.seconds >= 0


def test_no_tuning_while_capturing_or_tracing(tuning, monkeypatch):
    times, timed = tuning
    tuner = Tuner()
    monkeypatch.setattr(autotune, "_capturing_or_tracing", lambda: True)
    assert tuner.choose("fwd", "key", [A, B], launch, C) == A  # the heuristic default: the first candidate
    assert timed == [] and tuner.table == {}  # nothing timed, nothing cached
    monkeypatch.setattr(autotune, "_capturing_or_tracing", lambda: False)
    assert tuner.choose("fwd", "key", [A, B], launch, C) == B
    # Captured later at another length or grid: the config tuned for this kernel already
    # (compiled: nothing compiles inside a capture), not the untimed first candidate.
    tuner.table = {"fwd|d=64|bfloat16|T=1024|fill=2^0|gpu": B}
    monkeypatch.setattr(autotune, "_capturing_or_tracing", lambda: True)
    assert tuner.choose("fwd", "fwd|d=64|bfloat16|T=4096|fill=2^2|gpu", [A, B], launch, C) == B
    assert tuner.choose("fwd", "fwd|d=32|bfloat16|T=4096|fill=2^2|gpu", [A, B], launch, C) == A


def test_a_failing_candidate_is_reported_and_skipped_and_all_failing_raises(tuning):
    times, _ = tuning
    times[B] = RuntimeError("out of resource: shared memory")
    tuner = Tuner()
    with pytest.warns(RuntimeWarning, match=r"config BLOCK_M=128 BLOCK_N=64 .* failed .*out of resource"):
        assert tuner.choose("fwd", "key", [A, B], launch, C) == A
    assert "out of resource" in tuner.records[0].failures[repr(B)]
    times[A] = RuntimeError("out of resource: registers")
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="every candidate config failed"):
        Tuner().choose("fwd", "other key", [A, B], launch, C)


def test_a_broken_cuda_context_is_raised_not_skipped(tuning):
    times, _ = tuning
    times[A] = RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        Tuner().choose("fwd", "key", [A, B], launch, C)


def test_forced_and_pinned_configs_come_first(tuning, monkeypatch):
    tuner = Tuner()
    with tuner.use_config("fwd", A):
        assert tuner.choose("fwd", "key", [A, B], launch, C) == A
    monkeypatch.setenv(autotune.PINNED_ENV, "1")
    assert tuner.choose("fwd", "key", [A, B], launch, C) == C


def test_the_tune_cache_file_is_written_and_read_back(tuning, tmp_path, monkeypatch):
    _, timed = tuning
    path = tmp_path / "not yet" / "tune.json"  # the folder is made when the first choice is saved
    monkeypatch.setenv(autotune.TUNE_CACHE_ENV, str(path))
    Tuner().choose("fwd", "key", [A, B], launch, C)
    saved = json.loads(path.read_text())
    assert saved["configs"] == {"key": {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}}
    timed.clear()
    assert Tuner().choose("fwd", "key", [A, B], launch, C) == B  # a new process reads it
    assert timed == []
    # A cached choice that is no longer a candidate is tuned afresh.
    assert Tuner().choose("fwd", "key", [A, C], launch, C) == A
    # Two processes saving: neither loses the other's choices.
    first, second = Tuner(), Tuner()
    first.choose("fwd", "first key", [A, B], launch, C)
    second.choose("fwd", "second key", [A, B], launch, C)
    assert {"key", "first key", "second key"} <= set(json.loads(path.read_text())["configs"])
    path.write_text("{not json")
    # A corrupt file: one warning, ignored (tuned afresh), never a crash, and left as it is.
    tuner = Tuner()
    with pytest.warns(RuntimeWarning, match=f"{autotune.TUNE_CACHE_ENV}=.*not a fastgpt tune cache"):
        assert tuner.choose("fwd", "key", [A, B], launch, C) == B
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuner.choose("fwd", "other key", [A, B], launch, C)  # no second warning
    assert path.read_text() == "{not json"


def test_the_key_tells_grid_fullness_apart(monkeypatch):
    monkeypatch.setattr(autotune, "_device_name_and_sms", lambda device: ("NVIDIA H200", 132))
    cpu = torch.device("cpu")
    key = Tuner.key_for
    assert key("fwd", 64, torch.bfloat16, 1000, 96, cpu) == key("fwd", 64, torch.bfloat16, 1024, 96, cpu)
    assert key("fwd", 64, torch.bfloat16, 1024, 96, cpu) != key("fwd", 64, torch.bfloat16, 1024, 8 * 96, cpu)
    assert key("fwd", 64, torch.bfloat16, 1024, 96, cpu) != key("fwd", 64, torch.float16, 1024, 96, cpu)
    assert [autotune.fill_bucket(p, 132) for p in (1, 33, 132, 264, 528, 10_000)] == [-2, -2, 0, 1, 2, 3]

"""Shared fixtures. Run the suite with plain `pytest` from the repository root:
tests/ (not the root) goes on sys.path, so `kernels/` is never imported as a
top-level package by accident."""

import os

import torch

# With no GPU, Triton kernels run under the interpreter on CPU tensors. Triton
# reads this when a kernel is decorated, so it must be set before any
# fastgpt.kernels module is imported (fastgpt itself imports none at startup).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Attention tests run one pinned tile config (small tiles: short sequences
# cross several tiles; on sm_90 the half-precision d = 64 one is the smallest
# wgmma tile, 64 × 64); test_attention.py runs every tuned config on a GPU.
os.environ.setdefault("FASTGPT_ATTENTION_PINNED", "1")
# Measured auto (fastgpt/trust.py): the suite never writes the user's verdict cache, and keeps
# auto as it was (Triton wherever it supports the case, on a GPU too); tests of the check
# (test_trust.py, test_verdict_cache.py, test_check_command.py) turn it on with a file in tmp_path.
os.environ["FASTGPT_VERDICTS"] = "off"
os.environ.setdefault("FASTGPT_TRUST", "trust")

import pytest  # noqa: E402

from fastgpt import ops  # noqa: E402
from helpers import TINY  # noqa: E402


@pytest.fixture
def tiny_cfg():
    return dict(TINY)


@pytest.fixture(autouse=True)
def _restore_dispatch_state():
    """Tests may change the backend or swap kernels in (ops._triton_kernel); undo it after each."""
    saved_choice, saved_scopes, saved_lookup = ops._global_choice, ops._scopes.get(), ops._triton_kernel
    yield
    ops._global_choice = saved_choice
    ops._scopes.set(saved_scopes)
    ops._triton_kernel = saved_lookup
    ops.reset_dispatch_counts()


@pytest.fixture
def forced_triton(monkeypatch):
    """Kernel tests: every op forced to Triton (no silent eager fallback), kernel
    outputs poisoned with NaN (an unwritten element fails), counters reset."""
    import fastgpt.kernels.outputs as outputs
    monkeypatch.setattr(outputs, "poison", True)
    ops.set_backend("triton")
    ops.reset_dispatch_counts()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run fastest on one thread, above all when another process holds the other core."""
    from seed_training import one_thread
    with one_thread():
        yield

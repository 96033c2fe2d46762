"""Shared fixtures. Run the suite with plain `pytest` from the repository root:
tests/ (not the root) goes on sys.path, so `kernels/` is never imported as a
top-level package by accident."""

import pytest

from fastgpt import ops
from helpers import TINY


@pytest.fixture
def tiny_cfg():
    return dict(TINY)


@pytest.fixture(autouse=True)
def _restore_dispatch_state():
    """Tests may change the backend or register fake kernels; undo it after each."""
    saved_backend, saved_per_op = ops.get_backend(), dict(ops._op_backends)
    saved_kernels, saved_locations = dict(ops._kernels), dict(ops._KERNEL_LOCATIONS)
    yield
    ops.set_backend(saved_backend)
    ops._op_backends.update(saved_per_op)
    ops._kernels.clear()
    ops._kernels.update(saved_kernels)
    ops._KERNEL_LOCATIONS.clear()
    ops._KERNEL_LOCATIONS.update(saved_locations)
    ops.reset_dispatch_counts()

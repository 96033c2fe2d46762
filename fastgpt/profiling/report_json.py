"""The machine-readable report ``fastgpt profile --json`` writes: the runs, the versions, the speed-ups."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from typing import Optional

import torch

from .. import __version__


def report_json(results: list, comparison=None) -> dict:
    """The report for ``results`` (``ProfileResult``s) and, with ``compare``, their ``Comparison``."""
    return {
        "tool": "fastgpt profile", "fastgpt_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__, "triton_version": _triton_version(),
        "python_version": platform.python_version(),
        "runs": [r.to_dict() for r in results],
        "speedup_eager_over_triton": comparison.to_dict() if comparison else None,
    }


def _triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:  # not installed, or broken: the report still works
        return None
    return triton.__version__

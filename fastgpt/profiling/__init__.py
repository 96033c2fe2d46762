"""Profiling GPT-2's latency: what ``fastgpt profile`` runs and reports.

* ``run.py``: ``profile(...)`` builds a random GPT-2 and measures one mode
  (forward, train-step, generate), ``compare(...)`` runs eager and Triton on
  the same weights; devices, timing, peak memory;
* ``op_table.py``: torch.profiler events grouped into the per-op table;
* ``flops.py``: model FLOPs per token, GPU peaks and MFU;
* ``stats.py``: parameter counts and memory size, as the seed reports them;
* ``report_text.py`` and ``report_json.py``: the table printed, the JSON written.
"""

from .report_json import report_json
from .run import (
    DTYPES, MODES, Comparison, ProfileResult, check_writable, compare, cpu_name, default_device, profile,
    resolve_device, triton_side,
)

__all__ = [
    "profile", "compare", "report_json", "ProfileResult", "Comparison", "MODES", "DTYPES", "default_device",
    "resolve_device", "check_writable", "cpu_name", "triton_side",
]

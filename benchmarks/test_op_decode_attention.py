"""Decode attention: one new query row per sequence against its KV cache, fastgpt's Triton kernel vs SDPA.

GB/s counts K and V read once (benchmarks/cases.py, which gpu_check.py times
too). GPU target (H100/H200, bf16, batch 8, a 1k–8k cache): ≥ 70% of the copy
bandwidth.

    pytest benchmarks/test_op_decode_attention.py --benchmark-group-by=group --benchmark-json out.json
"""

import pytest

import cases
from timing import ON_GPU, time_case

# Without a GPU only SDPA runs (Triton's interpreter is not a speed).
IMPLEMENTATIONS = cases.DECODE_IMPLEMENTATIONS if ON_GPU else ["sdpa"]


@pytest.mark.parametrize("case", cases.decode_cases(impls=IMPLEMENTATIONS), ids=cases.case_id)
def test_decode_attention(benchmark, case):
    time_case(benchmark, case)

"""Bias + GELU (tanh), the FeedForward's activation: Triton vs eager PyTorch vs torch.compile.

On a (rows × 4·width) matmul output, timed without the matmul (the same for
every implementation), forward, backward alone and both; GB/s counts the
activation and its gradient read and written once (benchmarks/cases.py, which
gpu_check.py times too). GPU target (H100, bf16, 8192 rows × 4·768–4·1600):
≥ 1.5× the eager sequence.

    pytest benchmarks/test_op_gelu.py --benchmark-group-by=group --benchmark-json out.json
"""

import pytest

import cases
from timing import ON_GPU, time_case

# Without a GPU only the eager forms run (Triton's interpreter is not a speed).
IMPLEMENTATIONS = cases.ELEMENTWISE_IMPLEMENTATIONS if ON_GPU else ["eager"]
CASES = cases.elementwise_cases(ops_=["bias_gelu"], impls=IMPLEMENTATIONS, directions=cases.MODES)


@pytest.mark.parametrize("case", CASES, ids=cases.case_id)
def test_bias_gelu(benchmark, case):
    time_case(benchmark, case)

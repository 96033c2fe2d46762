"""Causal attention: fastgpt's Triton kernels vs F.scaled_dot_product_attention -- PyTorch's own choice
and each of its FLASH, CUDNN and EFFICIENT backends forced -- vs the seed's eager attention.

TFLOP/s counts 4·B·H·T²·d·½ for a causal forward (two matmuls), 2.5× that for the
backward alone and 3.5× for forward + backward (benchmarks/cases.py, which
gpu_check.py times too). Dropout 0 and 0.1 (GPT-2's training rate). GPU targets
(H100/H200, bf16, d = 64, T = 1k–8k): forward ≥ 1.0× SDPA's FLASH backend and
≥ 0.8× its CUDNN backend, backward ≥ 1.0× FLASH, dropout 0.1 costing ≤ 25% over p = 0.

    pytest benchmarks/test_op_attention.py --benchmark-group-by=group --benchmark-json out.json
"""

import pytest

import cases
from timing import ON_GPU, time_case

# Without a GPU: SDPA's CPU kernel and the eager reference (Triton's interpreter is not a speed,
# and the forced FLASH / CUDNN / EFFICIENT backends are CUDA kernels).
IMPLEMENTATIONS = ([*cases.ATTENTION_IMPLEMENTATIONS, cases.EAGER_REFERENCE] if ON_GPU
                   else ["sdpa", cases.EAGER_REFERENCE])


@pytest.mark.parametrize("case", cases.attention_cases(impls=IMPLEMENTATIONS), ids=cases.case_id)
def test_attention(benchmark, case):
    # A forced SDPA backend that does not take this case (dtype, dropout, GPU): a peer, not ours.
    time_case(benchmark, case, skip_if=lambda error: case.record["impl"].startswith("sdpa-"))

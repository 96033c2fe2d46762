"""LayerNorm and the fused dropout + residual add + LayerNorm: Triton vs eager PyTorch vs torch.compile.

Time and GB/s, forward, backward alone and both. GB/s counts the bytes each op
must read and write once (activations and their gradients; parameters and
per-row statistics are small and left out: benchmarks/cases.py, which
gpu_check.py times too). GPU targets (H100, bf16, 8192 rows × 768–1600):
LayerNorm forward ≥ 85% and forward+backward ≥ 70% of measured HBM bandwidth;
the fused add+LayerNorm ≥ 1.5× its eager sequence.

    pytest benchmarks/test_op_layer_norm.py --benchmark-group-by=group --benchmark-json out.json
"""

import pytest

import cases
from timing import ON_GPU, time_case

# Without a GPU only the eager forms run (Triton's interpreter is not a speed).
IMPLEMENTATIONS = cases.ELEMENTWISE_IMPLEMENTATIONS if ON_GPU else ["eager"]
CASES = cases.elementwise_cases(ops_=["layer_norm", "dropout_add_layer_norm"], impls=IMPLEMENTATIONS,
                                directions=cases.MODES)


@pytest.mark.parametrize("case", CASES, ids=cases.case_id)
def test_layer_norm(benchmark, case):
    time_case(benchmark, case)

"""torch.compile traces the model whole (no graph breaks) and computes the same logits."""

import pytest
import torch

from fastgpt import GPTModel, ops
from helpers import TINY, rel_err


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_fullgraph_compile_matches_eager(backend):
    torch._dynamo.reset()
    model = GPTModel(TINY).eval()
    idx = torch.randint(0, TINY["vocab_size"], (2, 11))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        expected = model(idx)
        ops.reset_dispatch_counts()
        out = compiled(idx)
    assert rel_err(out, expected) <= 1e-6
    # Dispatch is decided while tracing; traced calls are not counted as runs.
    assert not ops.dispatch_counts

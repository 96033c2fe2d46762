"""torch.compile traces the model whole (no graph breaks) in both dispatch backends and computes the same logits."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastgpt
from fastgpt import GPTModel, ops
from helpers import TINY, kernel_device, rel_err

DEVICE = kernel_device()  # CUDA when present; else CPU tensors, which forced Triton runs under the interpreter

CFG = {**TINY, "emb_dim": 64, "n_heads": 2}  # head_dim 32: a size the attention kernel takes
# The custom ops a Triton forward pass puts in the graph (GELU runs as the fused bias + GELU op).
TRITON_GRAPH_OPS = {"layer_norm", "dropout_add_layer_norm", "gelu", "causal_attention"}


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("fastgpt_backend", ["eager", "triton"])
def test_fullgraph_compile_matches_the_uncompiled_model(fastgpt_backend, compile_backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPTModel(CFG).to(DEVICE).eval()
    idx = torch.randint(0, CFG["vocab_size"], (2, 11), device=DEVICE)
    fastgpt.set_backend(fastgpt_backend)
    counter = CompileCounterWithBackend(compile_backend)  # the backend, plus a record of the graphs
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        expected = model(idx)
        ops.reset_dispatch_counts()
        out = compiled(idx)
    assert rel_err(out, expected) <= 1e-6
    # Dispatch is decided while tracing; traced calls are not counted as runs.
    assert not ops.dispatch_counts
    assert counter.frame_count == 1
    # What the graph runs: our kernels' custom ops with Triton, none with eager.
    in_graph = {str(node.target).split(".")[1] for graph in counter.graphs for node in graph.graph.nodes
                if node.op == "call_function" and str(node.target).startswith("fastgpt.")}
    assert in_graph == (TRITON_GRAPH_OPS if fastgpt_backend == "triton" else set())

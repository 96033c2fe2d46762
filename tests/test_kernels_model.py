"""GPTModel with every available Triton kernel against the eager model: loss, gradients, torch.compile."""

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import GPTModel, ops
from helpers import TINY, kernel_device, rel_err

pytestmark = pytest.mark.kernels
DEVICE = kernel_device()
CFG = {**TINY, "qkv_bias": True, "emb_dim": 96, "n_heads": 3}  # width 96: not a power of two; head_dim 32


def _force_triton_where_available():
    """Triton for every op that has a kernel; the rest stay eager (and are named in the test output)."""
    with_kernels = tuple(op for op in ops.OPS if op in ops._TRITON_FORMS)
    fastgpt.set_backend("eager")
    for op in with_kernels:
        fastgpt.set_backend("triton", op=op)
    return with_kernels


def _loss_and_grads(model, idx, targets, run=None):
    """Loss and parameter gradients of ``run`` (default: model itself, e.g. a compiled wrapper of it)."""
    model.zero_grad(set_to_none=True)
    logits = (run if run is not None else model)(idx)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_triton_model_matches_the_float64_eager_model():
    torch.manual_seed(0)
    model = GPTModel(CFG).to(DEVICE).train()  # train mode with drop_rate 0: the training code path
    reference = GPTModel(CFG).to(DEVICE).train()
    reference.load_state_dict(model.state_dict())
    reference.double()
    idx = torch.randint(0, CFG["vocab_size"], (2, 19), device=DEVICE)
    targets = torch.randint(0, CFG["vocab_size"], (2, 19), device=DEVICE)

    with fastgpt.use_backend("eager"):
        ref_logits, ref_loss, ref_grads = _loss_and_grads(reference, idx, targets)
    triton_ops = _force_triton_where_available()
    ops.reset_dispatch_counts()
    logits, loss, grads = _loss_and_grads(model, idx, targets)

    # The ops a full forward pass runs (GELU runs fused in linear_gelu; cached
    # attention only with a KV cache): all of them must have taken the kernel.
    forward_ops = {"layer_norm", "linear_gelu", "dropout_add_layer_norm", "causal_attention"}
    assert forward_ops <= set(triton_ops)
    assert {op for (op, path), n in ops.dispatch_counts.items() if n} == forward_ops
    for op in forward_ops:
        assert ops.dispatch_counts[(op, "triton")] > 0 and ops.dispatch_counts[(op, "eager")] == 0, op
    assert rel_err(logits, ref_logits) <= 1e-5
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for name, grad in grads.items():
        ref_grad = ref_grads[name]
        if name.endswith("W_key.bias"):  # zero in exact arithmetic: compare against the whole gradient
            assert grad.double().sub(ref_grad).norm() <= 1e-6, name
        else:
            assert rel_err(grad, ref_grad) <= 1e-4, name


def test_triton_model_trains_with_dropout():
    torch.manual_seed(1)
    model = GPTModel({**CFG, "drop_rate": 0.2}).to(DEVICE).train()
    _force_triton_where_available()
    idx = torch.randint(0, CFG["vocab_size"], (2, 11), device=DEVICE)
    torch.manual_seed(5)
    a = model(idx)
    torch.manual_seed(5)
    b = model(idx)
    c = model(idx)
    a.sum().backward()
    assert torch.equal(a, b), "same seed, same dropout masks"
    assert not torch.allclose(a, c), "dropout is active"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_fullgraph_compile_traces_the_custom_ops():
    # aot_eager runs our torch.library ops' fake implementations while tracing
    # forward and backward; any graph break fails fullgraph=True.
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = GPTModel(CFG).to(DEVICE).train()
    idx = torch.randint(0, CFG["vocab_size"], (2, 13), device=DEVICE)
    targets = torch.randint(0, CFG["vocab_size"], (2, 13), device=DEVICE)
    _force_triton_where_available()
    logits, loss, grads = _loss_and_grads(model, idx, targets)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    c_logits, c_loss, c_grads = _loss_and_grads(model, idx, targets, run=compiled)
    assert rel_err(c_logits, logits) <= 1e-6
    for name in grads:
        assert torch.allclose(c_grads[name], grads[name], rtol=1e-5, atol=1e-7), name

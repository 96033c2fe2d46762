"""Training step: forward, cross-entropy, backward and AdamW, in tokens/s, MFU and peak memory.

The implementations train the same weights on the same random batch (targets:
the inputs shifted by one), like for like: fastgpt and transformers both tie
the output head to the token embedding (transformers' default), so AdamW
updates as many parameters in each, and each has its own AdamW (lr 1e-4,
PyTorch's fastest: ``fused`` where the device has it, else ``foreach``).
Parameters, gradients and optimizer state are in the model's dtype (bfloat16
on CUDA: pure bf16 training). Dropout is 0, so all compute the same function.

* fastgpt (triton) -- CUDA: Triton kernels and the fused linear + cross-entropy
  (``GPTModel.loss``: no logits tensor).
* fastgpt (eager, fused loss) -- CPU: eager ops and the fused loss.
* fastgpt (eager): eager ops and ``F.cross_entropy`` over the logits, the seed's way.
* torch.compile of fastgpt (eager) and transformers: ``F.cross_entropy`` over the logits.
* fastgpt + Liger-Kernel loss -- CUDA, when ``liger-kernel`` is installed:
  fastgpt's model (Triton kernels) with Liger's fused linear cross-entropy.

Each round runs every implementation of a shape once (interleaved.py); each
case records the median forward + backward and optimizer times separately, and
the peak memory of one step (growth above what the model, its optimizer state
and the batch hold before it). MFU counts 6·N + 12·n_layers·T·emb_dim model
FLOPs per token (fastgpt/profiling/flops.py) against the GPU's dense peak.

``test_fused_loss_memory`` runs GPT-2 small's width and vocabulary (one block)
at batch 4 × 256 on the CPU: the fused loss against the unfused one.

    pytest benchmarks/test_model_training.py [--full] --benchmark-json out.json
"""

import pytest
import torch
import torch.nn.functional as F

import fastgpt
import interleaved
from fastgpt import ops
from fastgpt.profiling import flops
from models import (CPU_ROUNDS, DEVICE, DTYPE, DTYPE_NAME, MODEL_NAME, ON_GPU, SETTINGS, Models, backend_of, cases,
                    check_paths, compile_model, fastest_adamw, random_ids, record, shared_rounds,
                    start_counting)

if ON_GPU and SETTINGS.full:
    SEQ_SWEEP = [(8, t) for t in (128, 256, 512, 1024)]
    BATCH_SWEEP = [(b, 1024) for b in (4, 16)]
elif ON_GPU:
    SEQ_SWEEP, BATCH_SWEEP = [(8, 256), (8, 1024)], []
else:
    SEQ_SWEEP, BATCH_SWEEP = [(1, 32), (1, 64)], [(4, 32)]
SHAPES = SEQ_SWEEP + [shape for shape in BATCH_SWEEP if shape not in SEQ_SWEEP]
IMPLEMENTATIONS = (["fastgpt-triton", "fastgpt-eager", "torch.compile", "transformers", "liger"] if ON_GPU
                   else ["fastgpt-fused", "fastgpt-eager", "torch.compile", "transformers"])
CASES = cases(SHAPES, IMPLEMENTATIONS)
ROUNDS = 10 if ON_GPU else CPU_ROUNDS
LEARNING_RATE = 1e-4
FUSED_LOSS = ("fastgpt-triton", "fastgpt-fused")
TRAIN_MODE = True  # the ``models`` fixture (conftest.py) in train mode; tied output head in both models


def _liger_loss():
    """Liger-Kernel's fused linear cross-entropy, or the reason it cannot run here (imported lazily)."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError as err:
        return None, f"Liger-Kernel is not installed ({err}); `pip install liger-kernel` adds this CUDA peer"
    return LigerFusedLinearCrossEntropyLoss(), None


def _loss_fn(impl, models, idx, targets):
    """() -> the loss of one implementation (model in train mode, its backend chosen)."""
    if impl == "transformers":
        return lambda: F.cross_entropy(models.hf(idx, use_cache=False).logits.flatten(0, 1), targets.flatten())
    model = models.fastgpt
    backend = backend_of(impl)
    if impl in FUSED_LOSS:
        def loss():
            with ops.use_backend(backend):
                return model.loss(idx, targets)
    elif impl == "liger":
        liger, _ = _liger_loss()

        def loss():
            with ops.use_backend(backend):
                hidden = model.hidden_states(idx)
                out = liger(model.out_head.weight, hidden.flatten(0, 1), targets.flatten())
            return out[0] if isinstance(out, tuple) else out  # newer versions may add a z-loss
    else:
        forward = compile_model(model) if impl == "torch.compile" else model

        def loss():
            with ops.use_backend(backend):
                return F.cross_entropy(forward(idx).flatten(0, 1), targets.flatten())
    return loss


def _contenders(models, batch, seq_len, impls):
    idx = random_ids(models.cfg, batch, seq_len)
    targets = torch.roll(idx, -1, dims=1)
    contenders = {}
    for impl in impls:
        model = models.hf if impl == "transformers" else models.fastgpt
        optimizer, described = fastest_adamw(model.parameters(), LEARNING_RATE)
        loss_fn = _loss_fn(impl, models, idx, targets)

        def forward_backward(loss_fn=loss_fn):
            loss = loss_fn()
            loss.backward()
            return loss

        def optimizer_step(optimizer=optimizer):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def warm_up(impl=impl, forward_backward=forward_backward, optimizer_step=optimizer_step):
            start_counting()  # the paths of one step: compilation, autotuning, optimizer state
            loss = forward_backward()
            optimizer_step()
            paths = contenders[impl].info["paths"] = check_paths(impl)
            assert torch.isfinite(loss), f"{impl}: loss {loss.item()}"
            if impl in FUSED_LOSS:
                assert set(paths.get("linear_cross_entropy", {})) == {"eager" if impl == "fastgpt-fused" else
                                                                      "triton"}, paths

        contenders[impl] = interleaved.Contender({"forward+backward": forward_backward, "optimizer": optimizer_step},
                                                 warm_up=warm_up, info={"optimizer": described})
    return contenders


def _available(impls):
    return [impl for impl in impls if impl != "liger" or _liger_loss()[0] is not None]


@pytest.mark.parametrize("batch,seq_len,impl", CASES)
def test_train_step(benchmark, models, batch, seq_len, impl):
    if impl == "liger" and _liger_loss()[0] is None:
        pytest.skip(_liger_loss()[1])
    benchmark.group = f"train step · {MODEL_NAME} {DTYPE_NAME} · batch {batch} × seq {seq_len}"
    impls = _available([c.values[2] for c in CASES if c.values[:2] == (batch, seq_len)])
    contenders, measured = shared_rounds(("train", batch, seq_len),
                                         lambda: _contenders(models, batch, seq_len, impls), ROUNDS, benchmark.disabled)
    interleaved.report(benchmark, measured[impl], measured)
    info = contenders[impl].info
    record(benchmark, impl, "train step", batch, seq_len, tokens=batch * seq_len,
           flops_per_token=flops.flops_per_token(models.cfg, seq_len, training=True), paths=info["paths"],
           optimizer=info["optimizer"], weights="output head tied to the token embedding (both models)",
           loss="fused linear + cross-entropy" if impl in FUSED_LOSS + ("liger",) else "F.cross_entropy on logits")


# ---------------------------------------------------------------- the fused loss at GPT-2 small's width, on a CPU

MEMORY_CFG = fastgpt.gpt2_config("gpt2-small", n_layers=1, context_length=256, drop_rate=0.0, qkv_bias=True)
MEMORY_SHAPE = (4, 256)
MEMORY_CASES = [pytest.param(*MEMORY_SHAPE, impl, id=f"B4-T256-{impl}") for impl in ("fastgpt-fused", "fastgpt-eager")]


@pytest.fixture(scope="module")
def wide_model():
    torch.manual_seed(0)
    model = fastgpt.tie_weights(fastgpt.GPTModel(MEMORY_CFG)).to(DEVICE, DTYPE).train()
    return Models(MEMORY_CFG, fastgpt=model, hf=None)  # no transformers peer in this check


@pytest.mark.skipif(ON_GPU, reason="the CPU memory check; on CUDA every train-step case records its peak memory")
@pytest.mark.parametrize("batch,seq_len,impl", MEMORY_CASES)
def test_fused_loss_memory(benchmark, wide_model, batch, seq_len, impl):
    benchmark.group = f"train step · gpt2-small width, 1 block {DTYPE_NAME} · batch {batch} × seq {seq_len}"
    contenders, measured = shared_rounds(
        ("memory", batch, seq_len), lambda: _contenders(wide_model, batch, seq_len, ["fastgpt-fused", "fastgpt-eager"]),
        1, benchmark.disabled)  # a memory check: one timed round (~2 s a step at this size on a CPU)
    interleaved.report(benchmark, measured[impl], measured)
    logits_bytes = batch * seq_len * MEMORY_CFG["vocab_size"] * torch.finfo(DTYPE).bits // 8
    fused, unfused = (measured[name].peak_memory_bytes for name in ("fastgpt-fused", "fastgpt-eager"))
    info = contenders[impl].info
    record(benchmark, impl, "train step", batch, seq_len, tokens=batch * seq_len, model="gpt2-small width, 1 block",
           flops_per_token=flops.flops_per_token(MEMORY_CFG, seq_len, training=True), paths=info["paths"],
           optimizer=info["optimizer"], weights="output head tied to the token embedding",
           **{"logits MiB": round(logits_bytes / 2**20, 1),
              "fused loss saves (logits tensors)": round((unfused - fused) / logits_bytes, 2)})
    # The unfused step holds the logits, their log-softmax and their gradient at once
    # (3 logits tensors); the fused one a chunk. Both still end the backward pass with
    # two vocabulary × width tensors (the head's gradient and the embedding's dense
    # one): 1.5 logits tensors at batch 4 × 256 -- the floor of any loss here.
    assert fused <= unfused - logits_bytes, (fused / 2**20, unfused / 2**20)

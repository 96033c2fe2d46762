"""Training step: forward, cross-entropy, backward and AdamW, in tokens/s and MFU.

fastgpt (Triton, eager), torch.compile and transformers train the same
weights on the same random batch (targets: the inputs shifted by one). Each
implementation gets its own AdamW (lr 1e-4, PyTorch's default implementation
for the device); parameters, gradients and optimizer state are in the
model's dtype (bfloat16 on CUDA: pure bf16 training). Dropout is 0, so the four
compute the same function. MFU counts 6·N + 12·n_layers·T·emb_dim model FLOPs
per token (fastgpt/flops.py) against the GPU's dense peak.

    pytest benchmarks/test_model_training.py [--full] --benchmark-json out.json
"""

import pytest
import torch
import torch.nn.functional as F

from fastgpt import flops
from models import (DEVICE, DTYPE_NAME, MODEL_NAME, ON_GPU, SETTINGS, build_models, cases, check_paths, forward_fn,
                    model_config, random_ids, record, start_counting)
from timing import synchronized

if ON_GPU and SETTINGS.full:
    SEQ_SWEEP = [(8, t) for t in (128, 256, 512, 1024)]
    BATCH_SWEEP = [(b, 1024) for b in (4, 16)]
elif ON_GPU:
    SEQ_SWEEP, BATCH_SWEEP = [(8, 256), (8, 1024)], []
else:
    SEQ_SWEEP, BATCH_SWEEP = [(1, 32), (1, 64)], [(4, 32)]
SHAPES = SEQ_SWEEP + [shape for shape in BATCH_SWEEP if shape not in SEQ_SWEEP]
ROUNDS = 10 if ON_GPU else 3
LEARNING_RATE = 1e-4


@pytest.fixture(scope="module")
def models():
    return build_models(model_config())


@pytest.mark.parametrize("batch,seq_len,impl", cases(SHAPES))
def test_train_step(benchmark, models, batch, seq_len, impl):
    benchmark.group = f"train step · {MODEL_NAME} {DTYPE_NAME} · batch {batch} × seq {seq_len}"
    model = models.hf if impl == "transformers" else models.fastgpt
    model.train()
    forward = forward_fn(impl, models)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    idx = random_ids(models.cfg, batch, seq_len)
    targets = torch.roll(idx, -1, dims=1)

    def step():
        loss = F.cross_entropy(forward(idx).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    run = synchronized(step, DEVICE)
    start_counting()  # the paths of one call, the warm-up
    loss = run()  # warm-up: compilation, autotuning, optimizer state
    paths = check_paths(impl)
    assert torch.isfinite(loss), f"{impl}: loss {loss.item()}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    record(benchmark, impl, "train step", batch, seq_len, tokens=batch * seq_len,
           flops_per_token=flops.flops_per_token(models.cfg, seq_len, training=True), paths=paths,
           optimizer=f"AdamW lr {LEARNING_RATE}")
    model.zero_grad(set_to_none=True)  # the next case starts without this one's gradients

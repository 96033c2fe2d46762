"""Model forward latency: fastgpt (Triton, eager), torch.compile and transformers on the same weights.

Inference forward passes (no grad, full logits) over random token ids, in a
sequence-length sweep at a fixed batch and a batch sweep at a fixed length.
Each case records tokens/s and, from 2·N + 4·n_layers·T·emb_dim model FLOPs
per token (fastgpt/profiling/flops.py), TFLOP/s and MFU where the GPU's peak is known.
One group per shape, so pytest-benchmark's tables compare the
implementations side by side; the implementations of a shape are timed in
interleaved rounds (interleaved.py), so their ratios come from the same rounds.

    pytest benchmarks/test_model_forward.py [--full] --benchmark-json out.json
"""

import pytest
import torch

import interleaved
from fastgpt.profiling import flops
from models import (CPU_ROUNDS, DTYPE_NAME, MODEL_NAME, ON_GPU, SETTINGS, cases, check_paths, forward_fn, random_ids,
                    record, shared_rounds, start_counting)

if ON_GPU and SETTINGS.full:
    SEQ_SWEEP = [(8, t) for t in (128, 256, 512, 1024)]
    BATCH_SWEEP = [(b, 1024) for b in (1, 2, 4, 16)]
elif ON_GPU:
    SEQ_SWEEP, BATCH_SWEEP = [(8, 256), (8, 1024)], [(1, 1024)]
else:
    SEQ_SWEEP, BATCH_SWEEP = [(1, 32), (1, 64), (1, 128)], [(4, 64)]
SHAPES = SEQ_SWEEP + [shape for shape in BATCH_SWEEP if shape not in SEQ_SWEEP]
CASES = cases(SHAPES)
ROUNDS = 20 if ON_GPU else CPU_ROUNDS


def _contenders(models, batch, seq_len):
    idx = random_ids(models.cfg, batch, seq_len)
    contenders = {}
    for impl in [c.values[2] for c in CASES if c.values[:2] == (batch, seq_len)]:
        forward = forward_fn(impl, models)

        def step(forward=forward):
            with torch.inference_mode():
                return forward(idx)

        def warm_up(impl=impl, step=step):  # compilation, autotuning, allocator; and the paths of one call
            start_counting()
            logits = step()
            contenders[impl].info["paths"] = check_paths(impl)
            assert logits.shape == (batch, seq_len, models.cfg["vocab_size"]) and torch.isfinite(logits).all()

        contenders[impl] = interleaved.Contender({"forward": step}, warm_up=warm_up)
    return contenders


@pytest.mark.parametrize("batch,seq_len,impl", CASES)
def test_forward(benchmark, models, batch, seq_len, impl):
    benchmark.group = f"forward · {MODEL_NAME} {DTYPE_NAME} · batch {batch} × seq {seq_len}"
    contenders, measured = shared_rounds(("forward", batch, seq_len), lambda: _contenders(models, batch, seq_len),
                                         ROUNDS, benchmark.disabled)
    interleaved.report(benchmark, measured[impl], measured)
    record(benchmark, impl, "forward", batch, seq_len, tokens=batch * seq_len,
           flops_per_token=flops.flops_per_token(models.cfg, seq_len, training=False),
           paths=contenders[impl].info["paths"])

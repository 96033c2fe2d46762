"""Training end to end: the seed's training step with our kernels tracks eager PyTorch, and a tiny model learns."""

import torch

import fastgpt
from fastgpt import GPTModel, ops
from seed_training import make_optimizer, one_thread, train_step

# Sentences from a five-word grammar: structured enough that a tiny model finds
# the structure within a few dozen steps, and generated, so nothing ships.
ANIMALS = ("cat", "dog", "hen", "fox", "owl")
TEXT = " ".join(f"the {a} sees the {b}." for a in ANIMALS for b in ANIMALS if a != b)
CHARS = sorted(set(TEXT))
TOKENS = torch.tensor([CHARS.index(c) for c in TEXT])

# head_dim 32, a size the attention kernel takes; one layer keeps the interpreter quick.
CFG = {"vocab_size": len(CHARS), "context_length": 32, "emb_dim": 64, "n_heads": 2, "n_layers": 1,
       "drop_rate": 0.0, "qkv_bias": False}


def batches(steps: int, batch_size: int, seq_len: int, seed: int = 0):
    """(inputs, next-character targets) windows at seeded random offsets in TEXT."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(TOKENS) - seq_len - 1, (batch_size,), generator=g).tolist()
        windows = torch.stack([TOKENS[s:s + seq_len + 1] for s in starts])
        yield windows[:, :-1], windows[:, 1:]


def train(backend: str, steps: int, batch_size: int, seq_len: int, cfg=CFG, lr: float = 1e-2) -> list[float]:
    torch.manual_seed(0)
    model = GPTModel(cfg).train()
    optimizer = make_optimizer(model, lr=lr)
    with fastgpt.use_backend(backend), one_thread():
        return [train_step(model, optimizer, x, y).item() for x, y in batches(steps, batch_size, seq_len)]


def test_twenty_training_steps_with_the_kernels_track_eager():
    # Forced Triton for every op the step runs (the interpreter without a GPU).
    ops.reset_dispatch_counts()
    triton_losses = train("triton", steps=20, batch_size=2, seq_len=8)
    for op in ("layer_norm", "linear_gelu", "dropout_add_layer_norm", "causal_attention"):
        assert ops.dispatch_counts[(op, "triton")] >= 20 and ops.dispatch_counts[(op, "eager")] == 0, op
    eager_losses = train("eager", steps=20, batch_size=2, seq_len=8)
    # Equal within float32 noise at every step: AdamW and clipping would amplify
    # any real difference in the gradients over 20 steps.
    for step, (got, want) in enumerate(zip(triton_losses, eager_losses)):
        assert abs(got - want) <= 1e-5 * want, (step, triton_losses, eager_losses)
    assert sum(triton_losses[-5:]) / 5 < 0.6 * triton_losses[0], triton_losses  # and it trains


def test_a_tiny_model_learns_the_text():
    # The default backend: the kernels on a GPU, eager PyTorch on a CPU.
    losses = train("auto", steps=60, batch_size=8, seq_len=24, cfg={**CFG, "n_layers": 2, "drop_rate": 0.1})
    start, end = losses[0], sum(losses[-10:]) / 10
    assert start > 2.5  # about ln(16): knows nothing yet
    assert end < 0.35 * start, losses

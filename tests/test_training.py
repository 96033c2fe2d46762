"""Training end to end: the seed's training step with our kernels tracks eager PyTorch, and a tiny model learns."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastgpt
from fastgpt import GPTModel, ops
from helpers import kernel_device
from seed_training import SEED_LOSSES, make_optimizer, one_thread, train_model_simple, train_step

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


DEVICE = kernel_device()  # CUDA when present; else CPU tensors, under the interpreter for Triton
# Losses that agree step by step: exactly on the interpreter (exact float32 dots);
# on a GPU, cuBLAS and the kernels sum in different orders, which AdamW amplifies.
LOSS_TOLERANCE = 1e-5 if DEVICE == "cpu" else 1e-4


def train(backend: str, steps: int, batch_size: int, seq_len: int, cfg=CFG, lr: float = 1e-2) -> list[float]:
    torch.manual_seed(0)
    model = GPTModel(cfg).to(DEVICE).train()
    optimizer = make_optimizer(model, lr=lr)
    with fastgpt.use_backend(backend), one_thread():
        return [train_step(model, optimizer, x.to(DEVICE), y.to(DEVICE)).item()
                for x, y in batches(steps, batch_size, seq_len)]


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
        assert abs(got - want) <= LOSS_TOLERANCE * want, (step, triton_losses, eager_losses)
    assert sum(triton_losses[-5:]) / 5 < 0.6 * triton_losses[0], triton_losses  # and it trains


def test_a_tiny_model_learns_the_text():
    # The default backend: the kernels on a GPU, eager PyTorch on a CPU.
    losses = train("auto", steps=60, batch_size=8, seq_len=24, cfg={**CFG, "n_layers": 2, "drop_rate": 0.1})
    start, end = losses[0], sum(losses[-10:]) / 10
    assert start > 2.5  # about ln(16): knows nothing yet
    assert end < 0.35 * start, losses


def _chapter5_run(losses, backend: str, device: str = "cpu"):
    """The seed's chapter-5 train_model_simple, 2 epochs of 2 batches, evaluating every 2 steps."""
    torch.manual_seed(0)
    model = GPTModel(CFG).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loaders = []
    for seed, count in ((1, 8), (2, 8)):
        windows = list(batches(count, 1, 16, seed=seed))
        inputs, targets = torch.cat([x for x, _ in windows]), torch.cat([y for _, y in windows])
        loaders.append(DataLoader(TensorDataset(inputs, targets), batch_size=4, shuffle=False))
    with fastgpt.use_backend(backend), one_thread():
        return train_model_simple(model, *loaders, optimizer, device, num_epochs=2, eval_freq=2, eval_iter=2,
                                  losses=losses)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_the_seeds_chapter5_loop_gives_the_same_losses_with_only_the_import_changed(backend):
    ops.reset_dispatch_counts()
    device = kernel_device() if backend == "triton" else "cpu"  # Triton: the interpreter without a GPU
    ours = _chapter5_run(fastgpt, backend, device)  # fastgpt.calc_loss_batch / calc_loss_loader: the fused loss
    # 4 training steps and 2 evaluations of 2 + 2 batches each.
    assert ops.dispatch_counts[("linear_cross_entropy", backend)] == 4 + 2 * 4
    assert not ops.dispatch_counts[("linear_cross_entropy", "eager" if backend == "triton" else "triton")]
    seeds = _chapter5_run(SEED_LOSSES, "eager")
    tolerance = 1e-5 if device == "cpu" else 1e-3  # a GPU's float32 matmuls round differently from the CPU's
    for name, got, want in zip(("train losses", "val losses", "tokens seen", "step losses"), ours, seeds):
        assert len(got) == len(want) and all(abs(a - b) <= tolerance * abs(b) for a, b in zip(got, want)), name
    assert ours[0][-1] < 0.9 * ours[0][0]  # and it learns

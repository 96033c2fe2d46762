"""The seed's training step ("LLMs from scratch" ch. 5 and appendix D), shared by the training,
mixed-precision and distributed tests: cross-entropy over the logits, AdamW, gradient clipping."""

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F


def random_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int, device="cpu"):
    """(inputs, targets): random token ids and the same ids shifted by one, as the seed's data loader pairs them."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g).to(device)
    return tokens[:, :-1], tokens[:, 1:]


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model) -> torch.Tensor:
    logits = model(input_batch)
    # float(): under autocast the logits are half precision; the seed's loss is float32.
    return F.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten())


def make_optimizer(model, lr: float = 4e-4) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)


def train_step(model, optimizer, input_batch, target_batch, *, max_norm: float = 1.0,
               autocast_dtype: Optional[torch.dtype] = None, scaler=None) -> torch.Tensor:
    """One optimizer step; returns the (detached) loss. ``scaler``: a GradScaler for float16."""
    optimizer.zero_grad()
    with torch.autocast(input_batch.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = calc_loss_batch(input_batch, target_batch, model)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


@contextmanager
def one_thread():
    """Run tiny CPU models on one thread: their ops are too small to split, and on a
    busy machine two threads waiting on each other run several times slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)

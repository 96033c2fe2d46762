"""The seed's training step ("LLMs from scratch" ch. 5 and appendix D), shared by the training,
mixed-precision and distributed tests: cross-entropy over the logits, AdamW, gradient clipping;
and the seed's chapter-5 training loop with its loss helpers."""

from contextlib import contextmanager
from types import SimpleNamespace
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


# ---------------------------------------------------------------- the seed's chapter-5 loop, verbatim
#
# ``losses`` stands for the import: a namespace with the seed's calc_loss_batch
# and calc_loss_loader (SEED_LOSSES), or the fastgpt package itself.

def seed_calc_loss_batch(input_batch, target_batch, model, device):
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())
    return loss


def seed_calc_loss_loader(data_loader, model, device, num_batches=None):
    total_loss = 0.
    if len(data_loader) == 0:
        return float("nan")
    elif num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i < num_batches:
            loss = seed_calc_loss_batch(input_batch, target_batch, model, device)
            total_loss += loss.item()
        else:
            break
    return total_loss / num_batches


SEED_LOSSES = SimpleNamespace(calc_loss_batch=seed_calc_loss_batch, calc_loss_loader=seed_calc_loss_loader)


def evaluate_model(model, train_loader, val_loader, device, eval_iter, losses=SEED_LOSSES):
    model.eval()
    with torch.no_grad():
        train_loss = losses.calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = losses.calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter,
                       losses=SEED_LOSSES):
    """The seed's loop without its sample printing: returns (train_losses, val_losses, tokens_seen),
    plus every step's training loss (the seed only prints them)."""
    train_losses, val_losses, track_tokens_seen, step_losses = [], [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = losses.calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            step_losses.append(loss.item())
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter, losses)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
    return train_losses, val_losses, track_tokens_seen, step_losses

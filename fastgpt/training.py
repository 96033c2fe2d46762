"""The seed's chapter-5 loss helpers, with the seed's signatures, on fastgpt's fused loss.

A training loop written against the seed's ``calc_loss_batch`` /
``calc_loss_loader`` switches by changing one import::

    from fastgpt import calc_loss_batch, calc_loss_loader   # was: from previous_chapters import ...

For a fastgpt ``GPTModel`` -- or a DDP, FSDP or ``torch.compile`` wrapper of
one, which hands keyword arguments on -- the loss runs as
``model(inputs, targets=targets)``: the output head and cross-entropy fused, no
logits tensor, and the wrapper's own forward (gradient sync, unsharding) runs
as usual. Any other model, the seed's own included, takes the seed's plain
path: ``cross_entropy(model(x).flatten(0, 1), y.flatten())``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import GPTModel


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model, device) -> torch.Tensor:
    """Mean cross-entropy of ``model``'s next-token predictions for one batch, on ``device``."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    if _runs_fastgpt_forward(model):
        return model(input_batch, targets=target_batch)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader, model, device, num_batches=None) -> float:
    """Average ``calc_loss_batch`` over the first ``num_batches`` batches (all by default); NaN for an empty loader."""
    total_loss = 0.0
    if len(data_loader) == 0:
        return float("nan")
    if num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def _runs_fastgpt_forward(model) -> bool:
    """True when ``model(x, targets=y)`` reaches ``GPTModel.forward``: the model itself (not a
    subclass with a forward of its own), or one inside wrappers that pass keyword arguments on."""
    while not isinstance(model, GPTModel):
        inner = _wrapped(model)
        if inner is None:
            return False
        model = inner
    return type(model).forward is GPTModel.forward


def _wrapped(model):
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, OptimizedModule):
        return model._orig_mod
    if isinstance(model, (DistributedDataParallel, DataParallel)):
        return model.module
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch without distributed support
        return None
    return model.module if isinstance(model, FullyShardedDataParallel) else None

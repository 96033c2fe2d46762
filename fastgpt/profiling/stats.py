"""Model size figures as the seed reports them: parameter counts and memory footprint."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def parameter_count(model: nn.Module, *, exclude_output_head: bool = False) -> int:
    """Number of parameters; with ``exclude_output_head`` the count under weight tying.

    GPT-2 ties its output head to the token embedding, so the released "124M"
    model is GPTModel(GPT_CONFIG_124M)'s 163,009,536 minus the 38,597,376 of
    ``out_head``: 124,412,160.
    """
    total = sum(p.numel() for p in model.parameters())
    if exclude_output_head:
        total -= sum(p.numel() for p in model.out_head.parameters())
    return total


def memory_size_mb(model: nn.Module, dtype: Optional[torch.dtype] = None) -> float:
    """Parameter memory in MiB (2**20 bytes), as the seed computes it.

    With ``dtype`` every parameter is counted at that dtype's size (float32:
    4 bytes, as the seed assumes); without, at its own dtype. Buffers, gradients
    and optimizer state are not included.
    """
    def itemsize(p: torch.Tensor) -> int:
        return (dtype or p.dtype).itemsize

    return sum(p.numel() * itemsize(p) for p in model.parameters()) / (1024 * 1024)

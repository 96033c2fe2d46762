"""Allocation of kernel outputs, with an optional NaN poison for tests.

Tests set ``poison = True`` so every output starts as NaN: an element a kernel
forgot to write then fails the comparison instead of passing as stale memory.
"""

import torch

poison = False


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison and out.is_floating_point():
        out.fill_(float("nan"))
    return out

"""Model FLOPs per token and MFU (model FLOPs utilisation) for GPT-2.

The count is the usual one (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022,
appendix B): per token, a forward pass does one multiply-add (2 FLOPs) per
weight of every matrix the token goes through, plus the attention matmuls::

    forward  = 2·N + 4·n_layers·T·emb_dim
    training = 3 × forward = 6·N + 12·n_layers·T·emb_dim     (forward + backward)

N is the non-embedding parameter count: every parameter except ``tok_emb`` and
``pos_emb`` (a lookup does no matmul). The output head is counted -- its matmul
is real work (GPT-2 small: 38.6M of its 123.6M). T is the sequence length; the
attention term counts the full T×T score matrix, as PaLM does, not the causal
half. The optimizer step, softmax, norms and activations are left out, so MFU
is a lower bound on the hardware's use, comparable across implementations.

    MFU = tokens/s × FLOPs per token / peak dense FLOP/s of the device

``peak_tflops`` knows the GPUs this project targets (dense tensor-core peaks
from NVIDIA's data sheets) and returns None for anything else, CPUs included;
pass a peak explicitly there.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import parameter_count_of


def non_embedding_parameters(cfg: dict) -> int:
    """Parameters of a GPTModel built from ``cfg``, minus the token and position embeddings."""
    return parameter_count_of(cfg) - (cfg["vocab_size"] + cfg["context_length"]) * cfg["emb_dim"]


def flops_per_token(cfg: dict, seq_len: int, *, training: bool) -> float:
    """Model FLOPs for one token at sequence length ``seq_len``: forward, or forward + backward."""
    forward = 2 * non_embedding_parameters(cfg) + 4 * cfg["n_layers"] * seq_len * cfg["emb_dim"]
    return 3.0 * forward if training else float(forward)


# Dense peaks in TFLOP/s: (16-bit tensor cores, TF32 tensor cores, FP32 without tensor cores).
# Checked in order: the first name fragment found in the device name wins.
_PEAKS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("H200 NVL", (835.0, 417.5, 60.0)),
    ("H200", (989.0, 494.5, 67.0)),      # SXM; the same compute as H100 SXM
    ("H100 NVL", (835.0, 417.5, 60.0)),
    ("H100 PCIE", (756.0, 378.0, 51.0)),
    ("H100", (989.0, 494.5, 67.0)),      # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", (312.0, 156.0, 19.5)),      # SXM and PCIe
)


def peak_tflops(device_name: str, dtype: torch.dtype, *, tf32: Optional[bool] = None) -> Optional[float]:
    """Dense peak TFLOP/s of a known GPU for matmuls in ``dtype``, else None.

    float32 matmuls count at the TF32 peak only when PyTorch may use TF32
    (``tf32`` defaults to ``torch.backends.cuda.matmul.allow_tf32``).
    """
    name = device_name.upper()
    for fragment, (half, tf32_peak, fp32) in _PEAKS:
        if fragment in name:
            if dtype in (torch.float16, torch.bfloat16):
                return half
            if dtype == torch.float32:
                use_tf32 = torch.backends.cuda.matmul.allow_tf32 if tf32 is None else tf32
                return tf32_peak if use_tf32 else fp32
            return None
    return None


def mfu(tokens_per_s: float, flops_per_token_: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1] (above 1 means the peak given is wrong), or None without a peak."""
    if peak is None:
        return None
    return tokens_per_s * flops_per_token_ / (peak * 1e12)

"""Helpers shared by the tests."""

import torch

# A config small enough for CPU tests, with a context and vocab that are not
# powers of two so off-by-one and padding mistakes show.
TINY = {"vocab_size": 97, "context_length": 40, "emb_dim": 64, "n_heads": 4,
        "n_layers": 2, "drop_rate": 0.0, "qkv_bias": False}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (docs/design.md's measure). NaN anywhere fails."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output has NaN/inf"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# docs/design.md's tolerances, relative to a float64 reference: (forward, gradients).
# float32 means full-precision dots: PyTorch's default, which the kernels follow on
# a GPU too (tl.dot with input_precision "tf32x3"; the interpreter multiplies exactly).
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (1e-2, 2e-2),
}
# float32 on a GPU once the user allows TF32 (torch.backends.cuda.matmul.allow_tf32,
# torch.set_float32_matmul_precision("high")): the kernels' dots then truncate to TF32.
TF32_TOLERANCES = (3e-3, 5e-3)


def kernel_device() -> str:
    """CUDA when present; else CPU tensors, which Triton runs under TRITON_INTERPRET=1."""
    return "cuda" if torch.cuda.is_available() else "cpu"

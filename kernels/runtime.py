"""What every kernel launcher needs besides the kernel: the device, fp32 dot precision, dropout seeds, shared helpers.

* **Device.** Triton launches on the *current* CUDA device and its current
  stream, not on the tensors' device. ``on_device(x)`` makes x's device current
  for the launch (and so orders the kernel on that device's current stream);
  ``same_device(...)`` refuses inputs spread over devices with a clear error.
* **fp32 dots.** ``tl.dot`` on float32 operands defaults to TF32, which
  truncates the operands to 10 mantissa bits (about 1e-3 relative error). We
  follow PyTorch's own switch instead: full precision (``"tf32x3"``: three TF32
  products, error near float32's, on the tensor cores) unless the user allowed
  TF32 (``torch.backends.cuda.matmul.allow_tf32 = True`` or
  ``torch.set_float32_matmul_precision("high"|"medium")``).
* **Dropout seeds.** A seed drawn on the host per call is frozen into a
  captured CUDA graph (every replay would reuse one mask), and as a plain
  integer argument Triton would specialise on it. So the seed lives in a
  one-element int64 tensor on the tensors' device, drawn from torch's generator
  for that device (CUDA-graph-capture safe), and kernels ``tl.load`` it.
* **What every kernel shares.** The dtypes they take (``DTYPES``, with their
  short names), running a launch description (``run``), log2(e), the SM count
  and whether the Triton interpreter is on. Nothing here imports Triton.
* **Which cards.** ``dot_refusal(device)``: below compute capability 8.0 (T4,
  V100) Triton lowers ``tl.dot`` to FMA, so the dot kernels (attention, decode)
  refuse there and fastgpt runs eager; the element-wise kernels run anywhere.
  ``shared_memory_per_block(device)``: the opt-in limit a launch's config must
  fit (99 KB on sm_86/sm_89, about 163 KB on sm_80, 227 KB on sm_90).
"""

from __future__ import annotations

import contextlib
import os

import torch

# The dtypes every kernel takes, with the short names the compile catalogue labels them by.
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
LOG2_E = 1.4426950408889634

# Largest seed drawn: Triton's Philox takes the seed's low and high 32 bits.
_SEED_HIGH = 2**62


def run(kernel, launch) -> None:
    """Launch ``kernel`` as a launch description says: (grid, positional arguments, keyword arguments).

    Each kernel module describes every launch once, by a function returning that triple; its
    launcher runs it here and the compile catalogue (kernels/report/catalogue.py) hands the same
    description, on meta tensors of real shapes, to the ahead-of-time report."""
    grid, args, meta = launch
    kernel[grid](*args, **meta)


def interpreter_on() -> bool:
    """Whether TRITON_INTERPRET asks for the Triton interpreter (kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def sm_count(device: torch.device, elsewhere: int) -> int:
    """The streaming multiprocessors of a CUDA ``device``; ``elsewhere`` for any other device
    (the interpreter's pretend GPU, each caller's own)."""
    if device.type != "cuda":
        return elsewhere
    return torch.cuda.get_device_properties(device).multi_processor_count


# tl.dot needs the tensor cores' mma.sync (sm_80 and up) to be worth running: below, Triton emits FMA.
MIN_DOT_CAPABILITY = (8, 0)


def dot_refusal(device: torch.device) -> str | None:
    """Why the ``tl.dot`` kernels refuse ``device``, or None: only a CUDA device below compute
    capability 8.0 is refused (the interpreter's CPU tensors are not)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_DOT_CAPABILITY:
        return (f"compute capability {major}.{minor}: Triton lowers tl.dot to FMA below "
                f"{MIN_DOT_CAPABILITY[0]}.{MIN_DOT_CAPABILITY[1]}; fastgpt runs eager there")
    return None


def shared_memory_per_block(device: torch.device) -> int:
    """The most shared memory one block may use on a CUDA ``device`` (the opt-in limit where the
    driver reports one): 101376 bytes on sm_86/sm_89, 166912 on sm_80, 232448 on sm_90."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", None) or props.shared_memory_per_block


def on_device(t: torch.Tensor):
    """Context manager making ``t``'s CUDA device current (a no-op for CPU tensors, the interpreter's)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def device_mismatch(**tensors: torch.Tensor | None) -> str | None:
    """None when every given tensor is on one device, else a sentence naming where each is."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) <= 1:
        return None
    where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
    return f"inputs on different devices ({where}); move them to one device"


def same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming each tensor's device unless they share one."""
    problem = device_mismatch(**tensors)
    if problem is not None:
        raise ValueError(f"{op}: {problem}")


def fp32_dot_precision() -> str:
    """``input_precision`` for tl.dot on float32 operands: "tf32" if the user allowed TF32, else "tf32x3"."""
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "tf32x3"


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` constexpr for dots on ``dtype`` operands (only float32 has a choice)."""
    return fp32_dot_precision() if dtype == torch.float32 else "tf32"


def dropout_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed: a one-element int64 tensor on ``device``, from torch's generator for it.

    ``torch.manual_seed`` makes it repeatable; under CUDA-graph capture torch's
    CUDA generator hands each replay a new value.
    """
    return torch.randint(0, _SEED_HIGH, (1,), device=device, dtype=torch.int64)

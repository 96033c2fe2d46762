"""The implementations the model-level suites compare, built on one set of weights.

* ``fastgpt (triton)``: fastgpt's GPTModel with backend ``auto`` on CUDA -- a
  Triton kernel wherever one supports the case (the decode kernel, for one,
  takes no long prefill). Each case records the paths its ops took and fails
  if none was Triton. Not run without CUDA: Triton's CPU interpreter is a
  correctness tool, not a speed.
* ``fastgpt (eager)``: the same model with every op in eager PyTorch.
* ``torch.compile``: ``torch.compile`` of the eager model, backend inductor on
  CUDA. On a CPU inductor builds C++ for ~40 s a graph, so the CPU run uses the
  ``aot_eager`` backend (dynamo + AOTAutograd, no code generation), at one size
  per suite: it proves the harness, not inductor's speed. ``--compile-backend``
  overrides the backend.
* ``transformers``: ``GPT2LMHeadModel`` (SDPA attention) built from a
  ``GPT2Config`` with seeded random weights -- no download -- which fastgpt
  loads through ``fastgpt.checkpoints.layouts.state_dict_from_hf_gpt2``. Both tie the
  output head to the token embedding, or neither does (``build_models(tied=)``).
* training only: ``fastgpt (eager, fused loss)`` (CPU) and, on CUDA with
  ``liger-kernel`` installed, fastgpt's model with Liger-Kernel's fused loss.

The implementations of a shape are timed in interleaved rounds
(interleaved.py); ``shared_rounds`` runs them once, in the shape's first case.

The model is GPT-2 small on CUDA (bfloat16), and a tiny GPT-2 on a CPU
(float32, 2 layers of width 128, a vocabulary of 8192) so CI runs in seconds.
Dropout is 0 everywhere, so the implementations compute the same function.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import fastgpt
from fastgpt import ops
from fastgpt.checkpoints.hf_config import config_from_hf_gpt2
from fastgpt.checkpoints.layouts import state_dict_from_hf_gpt2
from fastgpt.profiling import flops
from timing import ON_GPU

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: the weights are built here

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
DTYPE_NAME = str(DTYPE).removeprefix("torch.")

LABELS = {"fastgpt-triton": "fastgpt (triton)", "fastgpt-eager": "fastgpt (eager)",
          "torch.compile": "torch.compile", "transformers": "transformers",
          # training only: the fused loss on eager ops, and Liger-Kernel's fused loss on fastgpt (CUDA)
          "fastgpt-fused": "fastgpt (eager, fused loss)", "liger": "fastgpt + Liger-Kernel loss"}
IMPLEMENTATIONS = ["fastgpt-triton", "fastgpt-eager", "torch.compile", "transformers"] if ON_GPU else \
    ["fastgpt-eager", "torch.compile", "transformers"]
CPU_NOTE = ("no CUDA device: fastgpt (triton) is not run (Triton's CPU interpreter is not a speed); "
            "tiny model, CPU timings")

MODEL_NAME = "gpt2-small" if ON_GPU else "gpt2-tiny"
# GPT-2's shape at a size a 2-core CPU runs in milliseconds (head_dim 64, as in every GPT-2 size).
TINY = {"vocab_size": 8192, "context_length": 256, "emb_dim": 128, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}


@dataclass
class Settings:
    """Set from the command line by conftest.py before the suites are collected."""

    full: bool = False
    compile_backend: str = "inductor" if ON_GPU else "aot_eager"
    peak_tflops: Optional[float] = None
    mode: str = "GPU" if ON_GPU else "CPU"


SETTINGS = Settings()
# Interleaved rounds per shape without a GPU: a CPU run proves the harness (CI), its timings say little.
CPU_ROUNDS = 2


def model_config() -> dict:
    if ON_GPU:
        return fastgpt.gpt2_config("gpt2-small", drop_rate=0.0, qkv_bias=True)
    return dict(TINY)


def cases(shapes: list[tuple[int, int]], implementations: Optional[list[str]] = None) -> list:
    """(batch, seq_len, impl) parameters, ids like ``B1-T64-fastgpt-eager``: every implementation
    at every shape, except torch.compile on a CPU, which runs at the first shape only."""
    import pytest

    implementations = implementations or IMPLEMENTATIONS
    return [pytest.param(b, t, impl, id=f"B{b}-T{t}-{impl}") for i, (b, t) in enumerate(shapes)
            for impl in implementations if impl != "torch.compile" or ON_GPU or i == 0]


@dataclass
class Models:
    cfg: dict
    fastgpt: fastgpt.GPTModel
    hf: torch.nn.Module


def build_models(cfg: dict, seed: int = 0, tied: bool = True) -> Models:
    """transformers' GPT-2 with seeded random weights, and fastgpt's GPTModel holding the same weights.

    ``tied``: both tie the output head to the token embedding (transformers'
    default, GPT-2's release: ``fastgpt.tie_weights``), or neither does (the
    seed's layout) -- like for like, so an optimizer updates as many parameters.
    """
    import transformers

    hf_config = transformers.GPT2Config(
        vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"], n_embd=cfg["emb_dim"],
        n_layer=cfg["n_layers"], n_head=cfg["n_heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=cfg["vocab_size"] - 1, eos_token_id=cfg["vocab_size"] - 1, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa")
    ours = fastgpt.GPTModel({**config_from_hf_gpt2(hf.config), "drop_rate": 0.0})
    ours.load_state_dict(state_dict_from_hf_gpt2(hf.state_dict(), cfg["n_layers"]))
    if tied:
        fastgpt.tie_weights(ours)
    trainable = [sum(p.numel() for p in model.parameters()) for model in (ours, hf)]
    assert trainable[0] == trainable[1], f"fastgpt and transformers hold {trainable} parameters: not like for like"
    # The two must be one function before their speeds mean anything (float32, before any cast).
    probe = torch.randint(0, cfg["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode(), ops.use_backend("eager"):
        theirs, mine = hf.eval()(probe, use_cache=False).logits, ours.eval()(probe)
    error = ((mine - theirs).norm() / theirs.norm()).item()
    assert error < 1e-4, f"fastgpt and transformers disagree on the same weights (relative error {error:.2e})"
    return Models(cfg, ours.to(DEVICE, DTYPE), hf.to(DEVICE, DTYPE))


_session_models: dict = {}


def shared_models(train: bool) -> Models:
    """The forward, training and generation suites' models (``build_models`` of ``model_config()``),
    built once per session, in train or eval mode. Dropout is 0: the mode changes no result."""
    if "gpt2" not in _session_models:
        _session_models["gpt2"] = build_models(model_config())
    built = _session_models["gpt2"]
    built.fastgpt.train(train)
    built.hf.train(train)
    return built


def compile_model(model: torch.nn.Module, *, dynamic: Optional[bool] = False) -> torch.nn.Module:
    """``torch.compile`` with a clean dynamo cache, so no earlier case's recompiles push this
    one past the recompile limit (where dynamo would silently run eager)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graphs and graph breaks of this case only (see record)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    return torch.compile(model, backend=SETTINGS.compile_backend, dynamic=dynamic)


def backend_of(impl: str) -> str:
    return "eager" if impl in ("fastgpt-eager", "fastgpt-fused", "torch.compile") else "auto"


def fastest_adamw(parameters, lr: float) -> tuple[torch.optim.Optimizer, str]:
    """PyTorch's fastest AdamW for these parameters: ``fused`` where the device has it, else ``foreach``."""
    parameters = list(parameters)
    try:
        return torch.optim.AdamW(parameters, lr=lr, fused=True), f"AdamW lr {lr}, fused"
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype (torch version)
        return torch.optim.AdamW(parameters, lr=lr, foreach=True), f"AdamW lr {lr}, foreach"


# ---------------------------------------------------------------- interleaved rounds, shared by a shape's cases

_shared: dict = {}


def shared_rounds(key, build: Callable[[], dict], rounds: int, disabled: bool):
    """(contenders, measured) for ``key``: ``build()``'s contenders timed in interleaved rounds, once.

    The first case of a shape runs every implementation of it (interleaved.py);
    its other cases report from the same rounds. Only the latest shape is kept.
    """
    import interleaved

    if key not in _shared:
        _shared.clear()  # free the previous shape's models, caches and optimizer state first
        contenders = build()
        _shared[key] = contenders, interleaved.measure(contenders, 0 if disabled else rounds, DEVICE)
    return _shared[key]


def forward_fn(impl: str, models: Models) -> Callable[[torch.Tensor], torch.Tensor]:
    """idx -> logits for one implementation (the caller picks train or eval mode and grad)."""
    if impl == "transformers":
        return lambda idx: models.hf(idx, use_cache=False).logits
    model = compile_model(models.fastgpt) if impl == "torch.compile" else models.fastgpt
    backend = backend_of(impl)

    def forward(idx):
        with ops.use_backend(backend):
            return model(idx)
    return forward


def random_ids(cfg: dict, batch: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["vocab_size"], (batch, seq_len), generator=generator).to(DEVICE)


# ---------------------------------------------------------------- transformers' KV cache, across versions

def hf_cache(hf) -> object:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=hf.config)
    except TypeError:  # transformers 4.x
        return DynamicCache()


def hf_step(hf, idx, cache, *, last_only: bool = False):
    """One forward with transformers' cache (argument names changed between 4.x and 5.x)."""
    params = inspect.signature(hf.forward).parameters
    kwargs = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if last_only and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return hf(idx, **kwargs).logits


def hf_crop(cache, length: int) -> None:
    """Forget every cached position from ``length`` on (a negative crop works in 4.x and 5.x)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


# ---------------------------------------------------------------- recording

def start_counting() -> None:
    ops.reset_dispatch_counts()


def check_paths(impl: str) -> dict[str, dict[str, int]]:
    """The dispatch paths taken since ``start_counting``; fastgpt (triton) must have used Triton."""
    paths: dict[str, dict[str, int]] = {}
    for (op, path), count in sorted(ops.dispatch_counts.items()):
        paths.setdefault(op, {})[path] = count
    took_triton = any("triton" in by_path for by_path in paths.values())
    if impl == "fastgpt-triton":
        assert took_triton, f"fastgpt (triton) ran no Triton kernel: {paths} ({ops.triton_status() or 'no reason'})"
    elif impl in ("fastgpt-eager", "fastgpt-fused"):
        assert not took_triton, f"{LABELS[impl]} took a Triton path: {paths}"
    return paths


def record(benchmark, impl: str, suite: str, batch: int, seq_len: int, tokens: Optional[int],
           flops_per_token: Optional[float] = None, paths: Optional[dict] = None, model: str = MODEL_NAME,
           **extra) -> None:
    """Everything the report needs beside the timings: what ran, and tokens/s, TFLOP/s and MFU from the median."""
    info = benchmark.extra_info
    info.update(suite=suite, impl=LABELS[impl], model=model, device=str(DEVICE), dtype=DTYPE_NAME,
                batch=batch, seq_len=seq_len, **extra)
    if impl == "torch.compile":
        counters = torch._dynamo.utils.counters
        info.update(compile_backend=SETTINGS.compile_backend, graphs=counters["stats"]["unique_graphs"],
                    graph_breaks=sum(counters["graph_break"].values()))
    if impl == "transformers":
        import transformers
        info["transformers"] = transformers.__version__
    if paths:
        info["paths"] = paths
    if not ON_GPU:
        info["note"] = CPU_NOTE
    stats = benchmark.stats
    if stats is None or tokens is None:  # --benchmark-disable: ran once, untimed
        return
    tokens_per_s = tokens / stats.stats.median
    info["tokens/s"] = round(tokens_per_s, 1)
    if flops_per_token is not None:
        info["TFLOP/s"] = round(tokens_per_s * flops_per_token / 1e12, 4)
        peak = SETTINGS.peak_tflops or (flops.peak_tflops(torch.cuda.get_device_name(), DTYPE) if ON_GPU else None)
        mfu = flops.mfu(tokens_per_s, flops_per_token, peak)
        info["MFU"] = None if mfu is None else round(mfu, 4)
        info["peak TFLOP/s"] = peak

"""``from_pretrained``: which format a path holds, and its weights into a fastgpt ``GPTModel``.

The model's sizes come from the files. Loading is all-or-nothing: the config
is compared with the file's tensor names and every tensor name and shape is
checked before any data is read or any model built; the whole state dict is
converted, and only then is a model, built on the meta device (no memory),
handed those tensors. Each tensor is read straight into the memory the model
keeps, so a checkpoint costs its own size in RAM (plus one tensor in flight),
not twice it. Any problem raises ``CheckpointError`` naming the file and the
tensor; a missing path raises ``FileNotFoundError``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

from ..config import GPT_CONFIG_124M, validate_config
from ..model import GPTModel, LayerNorm
from .files import CheckpointError, check_weights_hash, open_regular_file, read_json
from .hf_config import DROPOUTS_DIFFER, DEFAULT_LAYER_NORM_EPS, dropout_rates, hf_gpt2_settings
from .names import resolve_checkpoint
from .layouts import StoredTensor, fastgpt_layout, gpt2_n_heads, hf_gpt2_ignorable, hf_gpt2_layout, openai_tf_layout
from .safetensors_format import SafetensorsFile, SafetensorsShards
from .tensorflow_format import TFCheckpoint
from .torch_format import TorchFile

# Files that record no dropout rate get GPT-2's (and GPT_CONFIG_124M's); it
# matters only for training: from_pretrained returns the model in eval mode.
DEFAULT_DROP_RATE = GPT_CONFIG_124M["drop_rate"]


def from_pretrained(path, *, dtype: Optional[torch.dtype] = None, device=None, model_class=None,
                    models_dir=None, download: bool = False, **cfg_overrides):
    """A ``GPTModel`` holding the GPT-2 weights at ``path`` (a folder or a file), in eval mode.

    ``cfg_overrides`` replace config entries the files give or lack, e.g.
    ``drop_rate=0.0``, or ``n_heads`` for a state dict (a state dict records no
    head count: a released GPT-2 width implies its own, with a warning saying
    so; another width needs it). ``model_class``: a ``GPTModel`` subclass to build.
    ``dtype`` defaults to torch's default dtype (float32), ``device`` to the CPU;
    each tensor is converted as it is read.

    ``path`` may also name a released GPT-2: ``"gpt2"``, ``"gpt2-medium"``,
    ``"gpt2-large"``, ``"gpt2-xl"`` or the seed's ``"124M"`` ... ``"1558M"``,
    looked for offline in the seed's ``models_dir`` (default ``./gpt2``) and the
    Hugging Face cache, and downloaded through huggingface_hub only with
    ``download=True`` (``checkpoints/names.py``).

    ``nn.Linear`` weights keep the seed's (out, in) shape and values but are
    laid out in memory for fast one-token matmuls (see ``_gemv_friendly``).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    unknown = sorted(set(cfg_overrides) - set(GPT_CONFIG_124M))
    if unknown:
        raise TypeError(f"from_pretrained got unknown keyword(s) {unknown}; config keys are {list(GPT_CONFIG_124M)}, "
                        "plus dtype and device")
    # A path, or a released GPT-2's name ("gpt2", "124M", ...): see names.py for where it is looked for.
    path = resolve_checkpoint(path, models_dir=models_dir, download=download)
    checkpoint = _open_checkpoint(path)
    cfg = {**checkpoint.cfg, **cfg_overrides}
    where = checkpoint.config_path or checkpoint.source.path
    if cfg.get("n_heads") is None:
        raise CheckpointError(checkpoint.source.path, f"the file does not record the number of heads and emb_dim "
                                                      f"{cfg['emb_dim']} is no released GPT-2 width; pass n_heads=...")
    if cfg.get("drop_rate") is None:
        raise CheckpointError(where, DROPOUTS_DIFFER.format(**checkpoint.dropouts))
    # Before building anything: a config that claims more blocks than the file holds
    # would otherwise cost a model's worth of time and memory before its error.
    layers_in_file = checkpoint.layers_in_file()
    if cfg["n_layers"] != layers_in_file:
        said = "you passed" if "n_layers" in cfg_overrides else f"{where.name} says"
        raise CheckpointError(checkpoint.source.path, f"holds {layers_in_file} transformer blocks but {said} "
                                                      f"n_layers={cfg['n_layers']!r}")
    try:
        validate_config(cfg)
    except (TypeError, ValueError) as err:
        raise CheckpointError(where, str(err)) from None
    layout = checkpoint.layout(cfg)
    _check_names_and_shapes(checkpoint, layout, _describe(cfg))

    with torch.device("meta"), _SkipInitialisers():
        model = (model_class or GPTModel)(cfg)  # shapes only: no memory, no initialisation
    if checkpoint.layer_norm_eps != DEFAULT_LAYER_NORM_EPS:
        for module in model.modules():
            if isinstance(module, LayerNorm):
                module.eps = checkpoint.layer_norm_eps
    state_dict = _read_state_dict(checkpoint.source, layout, dtype or torch.get_default_dtype(), device,
                                  _linear_weights(model))
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:  # e.g. an att.mask that is not causal
        # torch's message starts "Error(s) in loading state_dict for ...:", one problem per line after it.
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        raise CheckpointError(checkpoint.source.path, "; ".join(problems) or str(err)) from None
    if checkpoint.n_heads_assumed and "n_heads" not in cfg_overrides:
        warnings.warn(f"{checkpoint.source.path}: a state dict does not record its number of heads; assuming "
                      f"n_heads={cfg['n_heads']}, GPT-2's for emb_dim {cfg['emb_dim']}. A model trained with another "
                      "head count computes wrong outputs this way: pass n_heads=... (fastgpt generate --n-heads)",
                      stacklevel=2)
    return model.eval()


class _SkipInitialisers(TorchFunctionMode):
    """Make torch.nn.init's in-place initialisers no-ops while a model is built on the meta device.

    They would compute nothing there, yet on meta tensors they run through
    torch's Python reference kernels, whose first use imports torch._dynamo:
    seconds and ~150 MB for a model whose weights are about to be replaced.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


# ---------------------------------------------------------------- what a checkpoint is

@dataclass
class _Checkpoint:
    source: object  # SafetensorsFile, SafetensorsShards, TorchFile or TFCheckpoint
    cfg: dict  # what the files say (n_heads may be None: a state dict does not record it)
    layout: Callable[[dict], list[StoredTensor]]  # cfg -> the tensors to read
    block_names: str  # a regex whose group 1 is a block number, for counting the file's blocks
    ignorable: Callable[[str], bool] = field(default=lambda name: False)
    config_path: Optional[Path] = None
    n_heads_assumed: bool = False  # n_heads is GPT-2's for the width, not the file's
    layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS
    dropouts: dict = field(default_factory=dict)  # the config's three rates, when they differ

    def layers_in_file(self) -> int:
        """One more than the highest block number among the file's tensor names (0 without blocks)."""
        pattern = re.compile(self.block_names)
        numbers = [int(m.group(1)) for m in map(pattern.match, self.source.shapes()) if m]
        return max(numbers, default=-1) + 1


def _open_checkpoint(path: Path) -> _Checkpoint:
    if path.is_dir():
        # exists(), not is_file(): a config.json that is a pipe is refused when read, not skipped.
        if (path / "config.json").exists():
            return _open_hf_folder(path)
        if (path / "hparams.json").exists():
            return _open_tf_folder(path, _tf_prefix(path))
        raise CheckpointError(path, "not a checkpoint folder: expected config.json (Hugging Face) or "
                                    "hparams.json with model.ckpt.* (OpenAI's TensorFlow release)")
    if path.name.endswith(".index"):
        return _open_tf_folder(path.parent, str(path)[:-len(".index")])
    source = SafetensorsFile(path) if path.suffix == ".safetensors" else TorchFile(path)
    return _open_state_dict(source)


def _open_hf_folder(folder: Path) -> _Checkpoint:
    config_path = folder / "config.json"
    hf_config = read_json(config_path)
    model_type = hf_config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise CheckpointError(config_path, f"model_type {model_type!r} is not GPT-2; fastgpt loads GPT-2 checkpoints")
    try:
        cfg, eps = hf_gpt2_settings(hf_config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(config_path, str(err)) from None
    for key in ("qkv_bias", "tie_word_embeddings"):
        if not isinstance(hf_config.get(key, True), bool):
            raise CheckpointError(config_path, f"{key} must be true or false, got {hf_config[key]!r}")
    cfg["qkv_bias"] = hf_config.get("qkv_bias", True)  # false only in files fastgpt saved
    if (folder / "model.safetensors").exists():
        source = SafetensorsFile(folder / "model.safetensors")
    elif (folder / "model.safetensors.index.json").exists():
        source = SafetensorsShards(folder / "model.safetensors.index.json")
    elif (folder / "pytorch_model.bin").exists():
        source = TorchFile(folder / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"{folder}: config.json but no weights (model.safetensors, "
                                "model.safetensors.index.json or pytorch_model.bin)")
    # After the weights' own structure is checked (a truncated file is named as such): the weights
    # saved with this config, or refused.
    check_weights_hash(config_path, hf_config)
    names = source.shapes()
    prefix = "transformer." if "transformer.wte.weight" in names else ""
    tied = hf_config.get("tie_word_embeddings", True) and "lm_head.weight" not in names
    return _Checkpoint(source, cfg, lambda cfg: hf_gpt2_layout(cfg, prefix=prefix, tied_head=tied),
                       rf"{re.escape(prefix)}h\.(\d+)\.", hf_gpt2_ignorable, config_path, layer_norm_eps=eps,
                       dropouts=dropout_rates(hf_config))


def _tf_prefix(folder: Path) -> str:
    # The `checkpoint` file names the latest prefix: OpenAI's says "model.ckpt";
    # TensorFlow may write an absolute path, which goes stale when the folder
    # moves, so the same name inside this folder wins.
    pointer = folder / "checkpoint"
    if pointer.exists():
        with open_regular_file(pointer) as f:
            text = f.read(1_000_000).decode("utf-8", errors="replace")
        for line in text.splitlines():
            if line.startswith("model_checkpoint_path:"):
                name = line.split(":", 1)[1].strip().strip('"')
                here = folder / Path(name).name
                return str(here) if Path(f"{here}.index").exists() or not os.path.isabs(name) else name
    indexes = sorted(folder.glob("*.index"))
    if len(indexes) != 1:
        raise CheckpointError(folder, f"expected one TensorFlow checkpoint (*.index) beside hparams.json, "
                                      f"found {len(indexes)}")
    return str(indexes[0])[:-len(".index")]


def _open_tf_folder(folder: Path, prefix: str) -> _Checkpoint:
    hparams_path = folder / "hparams.json"
    if not hparams_path.exists():
        raise FileNotFoundError(f"{folder}: a TensorFlow GPT-2 checkpoint needs hparams.json beside it")
    if not Path(prefix + ".index").exists():
        raise FileNotFoundError(f"{prefix}.index does not exist (named by {folder / 'checkpoint'})")
    hparams = read_json(hparams_path)
    keys = {"vocab_size": "n_vocab", "context_length": "n_ctx", "emb_dim": "n_embd", "n_heads": "n_head",
            "n_layers": "n_layer"}
    missing = [theirs for theirs in keys.values() if theirs not in hparams]
    if missing:
        raise CheckpointError(hparams_path, f"missing {missing}; OpenAI's hparams.json has {list(keys.values())}")
    cfg = {ours: hparams[theirs] for ours, theirs in keys.items()}
    cfg.update(drop_rate=DEFAULT_DROP_RATE, qkv_bias=True)
    # Variables outside model/ (a step counter) and optimizer slots are not weights.
    return _Checkpoint(TFCheckpoint(prefix), cfg, openai_tf_layout, r"model/h(\d+)/",
                       lambda name: not name.startswith("model/") or "/Adam" in name, hparams_path)


def _open_state_dict(source) -> _Checkpoint:
    shapes = source.shapes()
    if "tok_emb.weight" in shapes:
        checkpoint = _Checkpoint(source, {}, fastgpt_layout, r"trf_blocks\.(\d+)\.")
        vocab_size, emb_dim = _shape_of(source, "tok_emb.weight", 2)
        checkpoint.cfg = _cfg_from_shapes(source, checkpoint, "pos_emb.weight", vocab_size, emb_dim,
                                          qkv_bias="trf_blocks.0.att.W_query.bias" in shapes)
        return checkpoint
    prefix = "transformer." if "transformer.wte.weight" in shapes else ""
    if prefix + "wte.weight" in shapes:
        tied = "lm_head.weight" not in shapes
        checkpoint = _Checkpoint(source, {}, lambda cfg: hf_gpt2_layout(cfg, prefix=prefix, tied_head=tied),
                                 rf"{re.escape(prefix)}h\.(\d+)\.", hf_gpt2_ignorable)
        vocab_size, emb_dim = _shape_of(source, prefix + "wte.weight", 2)
        checkpoint.cfg = _cfg_from_shapes(source, checkpoint, prefix + "wpe.weight", vocab_size, emb_dim,
                                          qkv_bias=True)
        return checkpoint
    sample = ", ".join(repr(name) for name in list(shapes)[:3])
    raise CheckpointError(source.path, "not a GPT-2 state dict: no 'tok_emb.weight' (fastgpt's and the seed's "
                                       f"layout) nor 'wte.weight' (Hugging Face's); it holds {sample}, ...")


def _cfg_from_shapes(source, checkpoint: _Checkpoint, positions: str, vocab_size: int, emb_dim: int, *,
                     qkv_bias: bool) -> dict:
    n_heads = gpt2_n_heads(emb_dim)
    checkpoint.n_heads_assumed = n_heads is not None
    return {"vocab_size": vocab_size, "context_length": _shape_of(source, positions, 2)[0], "emb_dim": emb_dim,
            "n_heads": n_heads, "n_layers": checkpoint.layers_in_file(), "drop_rate": DEFAULT_DROP_RATE,
            "qkv_bias": qkv_bias}


def _shape_of(source, name: str, rank: int) -> tuple[int, ...]:
    shapes = source.shapes()
    if name not in shapes:
        raise CheckpointError(source.path, "is missing: every GPT-2 state dict has it", name)
    shape = shapes[name]
    if len(shape) != rank:
        raise CheckpointError(source.path, f"has shape {shape}, expected {rank} dimensions", name)
    return shape


# ---------------------------------------------------------------- checking and reading

def _check_names_and_shapes(checkpoint: _Checkpoint, layout: list[StoredTensor], gpt2: str) -> None:
    source = checkpoint.source
    shapes = source.shapes()
    missing = [stored.name for stored in layout if stored.required and stored.name not in shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(source.path_of(missing[0]), f"is missing{more}: this GPT-2 ({gpt2}) needs it",
                              missing[0])
    for stored in layout:
        if stored.name in shapes and tuple(shapes[stored.name]) != stored.shape:
            raise CheckpointError(source.path_of(stored.name), f"has shape {tuple(shapes[stored.name])}, expected "
                                                               f"{stored.shape} for {gpt2}",
                                  stored.name)
    known = {stored.name for stored in layout}
    unexpected = [name for name in shapes if name not in known and not checkpoint.ignorable(name)]
    if unexpected:
        listed = ", ".join(repr(name) for name in unexpected[:5]) + (", ..." if len(unexpected) > 5 else "")
        raise CheckpointError(source.path_of(unexpected[0]), f"unexpected tensor(s) {listed}: not GPT-2 as "
                                                             f"fastgpt builds it ({gpt2})")


def _describe(cfg: dict) -> str:
    return (f"vocab_size {cfg['vocab_size']}, context_length {cfg['context_length']}, emb_dim {cfg['emb_dim']}, "
            f"n_layers {cfg['n_layers']}")


def _linear_weights(model: torch.nn.Module) -> set[str]:
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def _gemv_friendly(weight: torch.Tensor) -> torch.Tensor:
    """An (out, in) linear weight stored with its longer dimension contiguous in memory.

    Generating with a KV cache is mostly one-token matmuls, x @ Wᵀ, which read
    each weight once from memory row by row; CPU BLAS kernels (MKL here) stream
    long rows fastest. So a weight with out >= in (query/key/value, attention
    output, MLP expansion, output head) is kept as the transpose of an (in, out)
    tensor with contiguous rows -- GPT-2 checkpoints' own layout, so no copy for
    Hugging Face and TensorFlow files -- and the MLP's projection (in = 4·out)
    stays (out, in). Measured on a 2-core AMD EPYC with MKL: the output head's
    one-token matmul takes 7.7 ms this way against 14 ms, the MLP expansion
    0.8 ms against 1.4-1.6 ms. Matmuls over many tokens run at the same speed
    either way, and state_dict() values are unchanged.
    """
    out_features, in_features = weight.shape
    if out_features >= in_features:
        rows_of_transpose_contiguous = weight.stride(0) == 1 and weight.stride(1) >= out_features
        return weight if rows_of_transpose_contiguous else weight.t().contiguous().t()
    return weight.contiguous()


def _read_state_dict(source, layout: list[StoredTensor], dtype: torch.dtype, device,
                     linear_weights: set[str]) -> dict[str, torch.Tensor]:
    names = source.shapes()
    state_dict: dict[str, torch.Tensor] = {}
    for stored in layout:
        if stored.name not in names:
            continue  # optional and absent (an att.mask)
        tensor = source.read(stored.name)
        if not tensor.dtype.is_floating_point:
            raise CheckpointError(source.path_of(stored.name), f"has dtype {tensor.dtype}, expected floating point",
                                  stored.name)
        # Cast and move before converting, so the converted tensors may stay views of this one.
        tensor = tensor.to(device=device, dtype=dtype)
        try:
            converted = stored.to_fastgpt(tensor)
        except ValueError as err:
            raise CheckpointError(source.path_of(stored.name), str(err), stored.name) from None
        del tensor  # the source's copy goes as soon as it is converted: one tensor in flight at most
        for key, value in converted.items():
            state_dict[key] = _gemv_friendly(value) if key in linear_weights else value
    return state_dict

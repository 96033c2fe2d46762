"""Load GPT-2 weights from disk into a fastgpt ``GPTModel``; save them for fastgpt and transformers.

``from_pretrained(path)`` reads

* a Hugging Face GPT-2 folder: ``config.json`` + ``model.safetensors`` (or its
  shards, listed in ``model.safetensors.index.json``) or ``pytorch_model.bin``;
* OpenAI's TensorFlow release folder: ``hparams.json`` + ``model.ckpt.index`` +
  ``model.ckpt.data-*`` (read by tf_checkpoint.py, no TensorFlow needed);
* one state-dict file, ``.safetensors`` or a ``torch.save`` file (``.pth``,
  ``.pt``, ``.bin``; a dict with ``model_state_dict`` as the seed's training
  code saves it is unwrapped), in fastgpt's (the seed's) layout or Hugging Face's.

The model's sizes come from the files. Loading is all-or-nothing: every tensor
name and shape is checked before any data is read, the whole state dict is
converted, and only then is a model, built on the meta device (no memory),
handed those tensors. Each tensor is read straight into the memory the model
keeps, so a checkpoint costs its own size in RAM (plus one tensor in flight),
not twice it. Any problem raises ``CheckpointError`` naming the file and the
tensor; a missing path raises ``FileNotFoundError``.

``save_pretrained(model, directory)`` writes ``config.json`` + ``model.safetensors``
in Hugging Face's GPT-2 layout, which ``transformers.GPT2LMHeadModel.from_pretrained``
and ``from_pretrained`` here both read.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

from .config import GPT_CONFIG_124M, validate_config
from .model import GPTModel, MultiHeadAttention, side_by_side_view
from .safetensors_file import SafetensorsFile
from .tf_checkpoint import TFCheckpoint
from .weights import (
    CheckpointError, StoredTensor, config_from_hf_gpt2, fastgpt_layout, gpt2_n_heads, hf_gpt2_ignorable,
    hf_gpt2_layout, hf_gpt2_tensors, openai_tf_layout,
)

# Files that record no dropout rate get GPT-2's (and GPT_CONFIG_124M's); it
# matters only for training: from_pretrained returns the model in eval mode.
DEFAULT_DROP_RATE = GPT_CONFIG_124M["drop_rate"]


def from_pretrained(path, *, dtype: Optional[torch.dtype] = None, device=None, model_class=GPTModel,
                    **cfg_overrides) -> GPTModel:
    """A ``GPTModel`` holding the GPT-2 weights at ``path`` (a folder or a file), in eval mode.

    ``cfg_overrides`` replace config entries the files give or lack, e.g.
    ``drop_rate=0.0``, or ``n_heads`` for a state dict of unusual width (a
    state dict records no head count; released GPT-2 widths imply theirs).
    ``dtype`` defaults to torch's default dtype (float32), ``device`` to the CPU;
    each tensor is converted as it is read.

    ``nn.Linear`` weights keep the seed's (out, in) shape and values but are
    laid out in memory for fast one-token matmuls (see ``_gemv_friendly``).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    unknown = sorted(set(cfg_overrides) - set(GPT_CONFIG_124M))
    if unknown:
        raise TypeError(f"from_pretrained got unknown keyword(s) {unknown}; config keys are {list(GPT_CONFIG_124M)}, "
                        "plus dtype and device")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = _open_checkpoint(path)
    cfg = {**checkpoint.cfg, **cfg_overrides}
    if cfg.get("n_heads") is None:
        raise CheckpointError(checkpoint.source.path, f"the file does not record the number of heads and emb_dim "
                                                      f"{cfg['emb_dim']} is no released GPT-2 width; pass n_heads=...")
    try:
        validate_config(cfg)
    except (TypeError, ValueError) as err:
        raise CheckpointError(checkpoint.config_path or checkpoint.source.path, str(err)) from None

    with torch.device("meta"), _SkipInitialisers():
        model = model_class(cfg)  # shapes only: no memory, no initialisation
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    layout = checkpoint.layout(cfg, expected)
    _check_names_and_shapes(checkpoint, layout, _describe(cfg))
    state_dict = _read_state_dict(checkpoint.source, layout, dtype or torch.get_default_dtype(), device,
                                  _linear_weights(model))
    _fuse_qkv(state_dict, model)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:  # e.g. an att.mask that is not causal
        # torch's message starts "Error(s) in loading state_dict for ...:", one problem per line after it.
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        raise CheckpointError(checkpoint.source.path, "; ".join(problems) or str(err)) from None
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


def save_pretrained(model: GPTModel, directory) -> None:
    """Write ``config.json`` and ``model.safetensors`` (Hugging Face's GPT-2 layout) into ``directory``.

    The output head is stored only when it differs from the token embedding
    (``tie_word_embeddings``); a model without query/key/value biases gets zero
    biases and ``"qkv_bias": false`` in the config, which fastgpt reads back.
    Each file is written under a temporary name and renamed into place.
    """
    from safetensors.torch import save_file

    if not isinstance(model, GPTModel):
        raise TypeError(f"save_pretrained takes a fastgpt GPTModel, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    state_dict = {name: t.detach().cpu() for name, t in model.state_dict().items() if not name.endswith(".att.mask")}
    tensors, tied = hf_gpt2_tensors(state_dict, cfg)
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg["vocab_size"],
        "n_positions": cfg["context_length"],
        "n_embd": cfg["emb_dim"],
        "n_layer": cfg["n_layers"],
        "n_head": cfg["n_heads"],
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg["drop_rate"],
        "embd_pdrop": cfg["drop_rate"],
        "attn_pdrop": cfg["drop_rate"],
        "tie_word_embeddings": tied,
        # GPT-2's <|endoftext|>, where the vocabulary has it (transformers' default otherwise).
        "bos_token_id": 50256 if cfg["vocab_size"] > 50256 else None,
        "eos_token_id": 50256 if cfg["vocab_size"] > 50256 else None,
        "qkv_bias": cfg["qkv_bias"],  # fastgpt's; transformers keeps it as an unused attribute
    }
    _write_atomically(directory / "model.safetensors",
                      lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _write_atomically(directory / "config.json",
                      lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"))


def _write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- what a checkpoint is

@dataclass
class _Checkpoint:
    source: object  # SafetensorsFile, _SafetensorsShards, _TorchFile or TFCheckpoint
    cfg: dict  # what the files say (n_heads may be None: a state dict does not record it)
    layout: Callable[[dict, dict], list[StoredTensor]]  # (cfg, fastgpt shapes) -> tensors to read
    ignorable: Callable[[str], bool] = field(default=lambda name: False)
    config_path: Optional[Path] = None


def _open_checkpoint(path: Path) -> _Checkpoint:
    if path.is_dir():
        if (path / "config.json").is_file():
            return _open_hf_folder(path)
        if (path / "hparams.json").is_file():
            return _open_tf_folder(path, _tf_prefix(path))
        raise CheckpointError(path, "not a checkpoint folder: expected config.json (Hugging Face) or "
                                    "hparams.json with model.ckpt.* (OpenAI's TensorFlow release)")
    if path.name.endswith(".index"):
        return _open_tf_folder(path.parent, str(path)[:-len(".index")])
    source = SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchFile(path)
    return _open_state_dict(source)


def _open_hf_folder(folder: Path) -> _Checkpoint:
    config_path = folder / "config.json"
    hf_config = _read_json(config_path)
    model_type = hf_config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise CheckpointError(config_path, f"model_type {model_type!r} is not GPT-2; fastgpt loads GPT-2 checkpoints")
    try:
        cfg = config_from_hf_gpt2(hf_config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(config_path, str(err)) from None
    cfg["qkv_bias"] = bool(hf_config.get("qkv_bias", True))  # false only in files fastgpt saved
    if (folder / "model.safetensors").is_file():
        source = SafetensorsFile(folder / "model.safetensors")
    elif (folder / "model.safetensors.index.json").is_file():
        source = _SafetensorsShards(folder / "model.safetensors.index.json")
    elif (folder / "pytorch_model.bin").is_file():
        source = _TorchFile(folder / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"{folder}: config.json but no weights (model.safetensors, "
                                "model.safetensors.index.json or pytorch_model.bin)")
    names = source.shapes()
    prefix = "transformer." if "transformer.wte.weight" in names else ""
    tied = bool(hf_config.get("tie_word_embeddings", True)) and "lm_head.weight" not in names
    return _Checkpoint(source, cfg, lambda cfg, _: hf_gpt2_layout(cfg, prefix=prefix, tied_head=tied),
                       hf_gpt2_ignorable, config_path)


def _tf_prefix(folder: Path) -> str:
    # The `checkpoint` file names the latest prefix: OpenAI's says "model.ckpt";
    # TensorFlow may write an absolute path, which goes stale when the folder
    # moves, so the same name inside this folder wins.
    pointer = folder / "checkpoint"
    if pointer.is_file():
        for line in pointer.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model_checkpoint_path:"):
                name = line.split(":", 1)[1].strip().strip('"')
                here = folder / Path(name).name
                return str(here) if Path(f"{here}.index").is_file() or not os.path.isabs(name) else name
    indexes = sorted(folder.glob("*.index"))
    if len(indexes) != 1:
        raise CheckpointError(folder, f"expected one TensorFlow checkpoint (*.index) beside hparams.json, "
                                      f"found {len(indexes)}")
    return str(indexes[0])[:-len(".index")]


def _open_tf_folder(folder: Path, prefix: str) -> _Checkpoint:
    hparams_path = folder / "hparams.json"
    if not hparams_path.is_file():
        raise FileNotFoundError(f"{folder}: a TensorFlow GPT-2 checkpoint needs hparams.json beside it")
    if not Path(prefix + ".index").is_file():
        raise FileNotFoundError(f"{prefix}.index does not exist (named by {folder / 'checkpoint'})")
    hparams = _read_json(hparams_path)
    keys = {"vocab_size": "n_vocab", "context_length": "n_ctx", "emb_dim": "n_embd", "n_heads": "n_head",
            "n_layers": "n_layer"}
    missing = [theirs for theirs in keys.values() if theirs not in hparams]
    if missing:
        raise CheckpointError(hparams_path, f"missing {missing}; OpenAI's hparams.json has {list(keys.values())}")
    cfg = {ours: hparams[theirs] for ours, theirs in keys.items()}
    cfg.update(drop_rate=DEFAULT_DROP_RATE, qkv_bias=True)
    # Variables outside model/ (a step counter) and optimizer slots are not weights.
    return _Checkpoint(TFCheckpoint(prefix), cfg, lambda cfg, _: openai_tf_layout(cfg),
                       lambda name: not name.startswith("model/") or "/Adam" in name, hparams_path)


def _open_state_dict(source) -> _Checkpoint:
    shapes = source.shapes()
    if "tok_emb.weight" in shapes:
        return _Checkpoint(source, _cfg_from_fastgpt_shapes(source), lambda cfg, expected: fastgpt_layout(expected))
    prefix = "transformer." if "transformer.wte.weight" in shapes else ""
    if prefix + "wte.weight" in shapes:
        tied = "lm_head.weight" not in shapes
        return _Checkpoint(source, _cfg_from_hf_shapes(source, prefix),
                           lambda cfg, _: hf_gpt2_layout(cfg, prefix=prefix, tied_head=tied), hf_gpt2_ignorable)
    sample = ", ".join(repr(name) for name in list(shapes)[:3])
    raise CheckpointError(source.path, "not a GPT-2 state dict: no 'tok_emb.weight' (fastgpt's and the seed's "
                                       f"layout) nor 'wte.weight' (Hugging Face's); it holds {sample}, ...")


def _cfg_from_fastgpt_shapes(source) -> dict:
    shapes = source.shapes()
    vocab_size, emb_dim = _shape_of(source, "tok_emb.weight", 2)
    context_length = _shape_of(source, "pos_emb.weight", 2)[0]
    n_layers = _count_layers(shapes, "trf_blocks.{}.norm1.scale")
    return {"vocab_size": vocab_size, "context_length": context_length, "emb_dim": emb_dim,
            "n_heads": gpt2_n_heads(emb_dim), "n_layers": n_layers, "drop_rate": DEFAULT_DROP_RATE,
            "qkv_bias": "trf_blocks.0.att.W_query.bias" in shapes}


def _cfg_from_hf_shapes(source, prefix: str) -> dict:
    vocab_size, emb_dim = _shape_of(source, prefix + "wte.weight", 2)
    context_length = _shape_of(source, prefix + "wpe.weight", 2)[0]
    n_layers = _count_layers(source.shapes(), prefix + "h.{}.ln_1.weight")
    return {"vocab_size": vocab_size, "context_length": context_length, "emb_dim": emb_dim,
            "n_heads": gpt2_n_heads(emb_dim), "n_layers": n_layers, "drop_rate": DEFAULT_DROP_RATE,
            "qkv_bias": True}


def _shape_of(source, name: str, rank: int) -> tuple[int, ...]:
    shape = source.shapes()[name]
    if len(shape) != rank:
        raise CheckpointError(source.path, f"has shape {shape}, expected {rank} dimensions", name)
    return shape


def _count_layers(names, pattern: str) -> int:
    count = 0
    while pattern.format(count) in names:
        count += 1
    return count


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


def _fuse_qkv(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Lay each block's query/key/value weights (and biases) side by side in one buffer.

    GPT-2's own c_attn layout, (in, 3·out): a Hugging Face or TensorFlow
    checkpoint already has it (the converted tensors are views of it), other
    files are copied into it. ``MultiHeadAttention.fused_qkv`` then runs the
    three projections as one matmul when generating.
    """
    for name, module in model.named_modules():
        if not isinstance(module, MultiHeadAttention):
            continue
        size = module.d_out
        for kind in ("weight", "bias"):
            keys = [f"{name}.{projection}.{kind}" for projection in ("W_query", "W_key", "W_value")]
            if keys[0] not in state_dict:
                continue  # no query/key/value biases
            parts = [state_dict[key] for key in keys]
            if side_by_side_view(parts, size, dim=0) is not None:
                continue
            if kind == "weight":  # (in, 3·out) with contiguous rows; each part a transposed view
                fused = torch.cat([part.t() for part in parts], dim=1)
                views = [fused[:, i * size:(i + 1) * size].t() for i in range(3)]
            else:
                fused = torch.cat(parts)
                views = [fused[i * size:(i + 1) * size] for i in range(3)]
            state_dict.update(zip(keys, views))


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


# ---------------------------------------------------------------- sources other than safetensors and TF

class _TorchFile:
    """A ``torch.save`` file of tensors, loaded once (weights only); ``read`` hands each tensor over."""

    def __init__(self, path: Path):
        self.path = path
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated zip, pickle of arbitrary objects, not a torch file at all
            raise CheckpointError(path, f"cannot be read as a torch.save file of tensors "
                                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") \
                from None
        if isinstance(loaded, dict) and isinstance(loaded.get("model_state_dict"), dict):
            loaded = loaded["model_state_dict"]  # the seed's model-and-optimizer checkpoint
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise CheckpointError(path, "expected a state dict (a dict of tensors), "
                                        f"got {type(loaded).__name__}")
        self._tensors = dict(loaded)
        self._shapes = {name: tuple(t.shape) for name, t in self._tensors.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def path_of(self, name: str) -> Path:
        return self.path

    def read(self, name: str) -> torch.Tensor:
        return self._tensors.pop(name)  # the caller owns it now; nothing else keeps it alive


class _SafetensorsShards:
    """A sharded safetensors checkpoint: ``model.safetensors.index.json`` and the files it lists."""

    def __init__(self, index_path: Path):
        self.path = index_path
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(index_path, "has no weight_map")
        files = {file: SafetensorsFile(index_path.parent / file) for file in sorted(set(weight_map.values()))}
        self._file_of = {}
        for file in files.values():
            for name in file.shapes():
                if name in self._file_of:
                    raise CheckpointError(file.path, "tensor stored in two shards", name)
                self._file_of[name] = file

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: file.shapes()[name] for name, file in self._file_of.items()}

    def path_of(self, name: str) -> Path:
        return self._file_of[name].path if name in self._file_of else self.path

    def read(self, name: str) -> torch.Tensor:
        return self._file_of[name].read(name)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(path, f"is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(path, "is not a JSON object")
    return value

"""``save_pretrained``: a fastgpt model as Hugging Face's GPT-2 folder (config.json + model.safetensors)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import secrets
import sys
from pathlib import Path

import torch

from ..model import GPTModel, LayerNorm
from ..seed_compat import masks_omitted
from .files import WEIGHTS_SHA256_KEY
from .layouts import hf_gpt2_tensors


def save_pretrained(model, directory) -> None:
    """Write ``config.json`` and ``model.safetensors`` (Hugging Face's GPT-2 layout) into ``directory``.

    The output head is stored only when it differs from the token embedding
    (``tie_word_embeddings``); a model without query/key/value biases gets zero
    biases and ``"qkv_bias": false`` in the config, which fastgpt reads back.

    The two files are one unit. Both are written in full under temporary names
    (and flushed to disk) before either replaces anything; the config records
    the sha256 of the weights (``WEIGHTS_SHA256_KEY``); then the config is
    renamed into place, and the weights after it. A save that stops between
    the two renames leaves a config whose hash the old weights do not match,
    which ``from_pretrained`` refuses, never a silent mix of two models; one
    that stops earlier (a full disk, Ctrl-C) leaves the old checkpoint as it
    was. Temporary files a killed save left behind are removed by the next save
    into the folder. Disk problems raise ``OSError`` (ENOSPC, EACCES, ...).
    """
    if not isinstance(model, GPTModel):
        raise TypeError(f"save_pretrained takes a fastgpt GPTModel, got {type(model).__name__}")
    on_meta = next((name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
                    if t.is_meta), None)
    if on_meta is not None:
        raise ValueError(f"save_pretrained: the model is on the meta device ({on_meta!r} holds a shape but no "
                         "values), so there are no weights to save; load or initialise them first (e.g. "
                         "fastgpt.from_pretrained, or model.to_empty(device='cpu') then load_state_dict)")
    cfg = model.cfg
    eps = _layer_norm_eps(model)
    state_dict = {name: t.detach().cpu() for name, t in _state_dict_without_masks(model).items()}
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
        "layer_norm_epsilon": eps,
        "resid_pdrop": cfg["drop_rate"],
        "embd_pdrop": cfg["drop_rate"],
        "attn_pdrop": cfg["drop_rate"],
        "tie_word_embeddings": tied,
        # GPT-2's <|endoftext|>, where the vocabulary has it (transformers' default otherwise).
        "bos_token_id": 50256 if cfg["vocab_size"] > 50256 else None,
        "eos_token_id": 50256 if cfg["vocab_size"] > 50256 else None,
        "qkv_bias": cfg["qkv_bias"],  # fastgpt's; transformers keeps it as an unused attribute
    }
    directory = Path(directory)
    created = _make_directory(directory)
    weights_tmp = config_tmp = None
    try:
        _remove_stale_temporaries(directory)
        weights_tmp = _temporary(directory / "model.safetensors")
        config[WEIGHTS_SHA256_KEY] = _write_safetensors(weights_tmp, tensors, {"format": "pt"})
        config_tmp = _temporary(directory / "config.json")
        _write_bytes(config_tmp, (json.dumps(config, indent=2) + "\n").encode("utf-8"))
        # Config first: between the two renames the folder holds the new config with the old
        # weights, whose hash differs (refused on load), never new weights with an old config.
        os.replace(config_tmp, directory / "config.json")
        config_tmp = None
        os.replace(weights_tmp, directory / "model.safetensors")
        weights_tmp = None
        _sync_directory(directory)
    except BaseException:
        for tmp in (weights_tmp, config_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        for folder in created:  # folders this call made, deepest first, if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _make_directory(directory: Path) -> list[Path]:
    """Create ``directory`` (and missing parents); return the folders created, deepest first."""
    missing = []
    folder = directory
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    directory.mkdir(parents=True, exist_ok=True)
    return missing


# Temporary files: ".<target name>.<pid>.<random>.tmp", so that a later save can tell one whose
# writer is gone (removed) from one another process is writing now (left alone).
_TEMPORARY = re.compile(r"\.(model\.safetensors|config\.json)\.(\d+)\.[0-9a-f]{12}\.tmp")


def _temporary(target: Path) -> Path:
    """A new empty file beside ``target``, with mode 0666 less the umask as open() would give the
    target itself; it keeps that mode whatever the writer does."""
    while True:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _remove_stale_temporaries(directory: Path) -> None:
    for entry in directory.iterdir():
        found = _TEMPORARY.fullmatch(entry.name)
        if found and not _process_alive(int(found.group(2))):
            entry.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be saving
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process: leave its file alone
    return True


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_directory(directory: Path) -> None:
    """Make the renames durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write ``tensors`` as a safetensors file (the format the library writes: an 8-byte header length,
    a JSON header padded with spaces to 8 bytes, the tensors' bytes back to back); return its sha256.

    Written here rather than by ``safetensors.torch.save_file`` so that a full disk raises OSError,
    not the library's own error type, and so that the hash is computed as the bytes go out.
    """
    if sys.byteorder != "little":
        raise OSError("save_pretrained writes safetensors (little-endian) on little-endian machines only")
    header, offset = {"__metadata__": metadata}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for piece in (len(text).to_bytes(8, "little"), text):
            f.write(piece)
            digest.update(piece)
        for tensor in tensors.values():
            data = memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())
            f.write(data)
            digest.update(data)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def _layer_norm_eps(model: torch.nn.Module) -> float:
    values = {module.eps for module in model.modules() if isinstance(module, LayerNorm)}
    if len(values) != 1:
        raise ValueError(f"the model's LayerNorms use different eps values {sorted(values)}; GPT-2's config.json "
                         "holds one layer_norm_epsilon")
    return values.pop()


def _state_dict_without_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without the ``att.mask`` entries, which are never built.

    The mask is the seed's context×context buffer, made for state_dict() on demand:
    at context 8192 each is 256 MiB, for a file that stores none of them.
    """
    with masks_omitted():
        return model.state_dict()

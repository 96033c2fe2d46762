"""``save_pretrained``: a fastgpt model as Hugging Face's GPT-2 folder (config.json + model.safetensors)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import torch

from ..model import GPTModel, LayerNorm
from ..seed_compat import masks_omitted
from .layouts import hf_gpt2_tensors


def save_pretrained(model, directory) -> None:
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
    _write_atomically(directory / "model.safetensors",
                      lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _write_atomically(directory / "config.json",
                      lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"))


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


def _write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    # The temporary file gets mode 0666 less the umask, as open() would give the target
    # itself, and keeps it whatever the writer does (tempfile's, or safetensors', 0600
    # would stay on the renamed file).
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    mode = tmp.stat().st_mode & 0o777  # 0666 less the umask: what the writer may not keep
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

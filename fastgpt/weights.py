"""Checkpoint conversion: Hugging Face GPT-2 tensors into fastgpt's (the seed's) layout.

Hugging Face's GPT-2 stores its linear layers as ``Conv1D`` with weights of
shape (in, out) -- the transpose of ``nn.Linear`` -- fuses query/key/value into
one ``c_attn`` of width 3·emb_dim, and ties ``lm_head`` to the token embedding.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import validate_config


def config_from_hf_gpt2(hf_config) -> dict:
    """A fastgpt config dict from a transformers ``GPT2Config`` (or its dict)."""
    get = hf_config.get if isinstance(hf_config, Mapping) else lambda key, default=None: getattr(hf_config, key, default)
    cfg = {
        "vocab_size": get("vocab_size"),
        "context_length": get("n_positions"),
        "emb_dim": get("n_embd"),
        "n_heads": get("n_head"),
        "n_layers": get("n_layer"),
        "drop_rate": float(get("resid_pdrop", 0.0)),
        "qkv_bias": True,  # GPT-2's c_attn always has a bias
    }
    validate_config(cfg)
    # The maths fastgpt implements; refuse variants it would silently compute wrongly.
    unsupported = {
        "activation_function": (get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "layer_norm_epsilon": (get("layer_norm_epsilon", 1e-5), (1e-5,)),
        "n_inner": (get("n_inner"), (None, 4 * cfg["emb_dim"])),
        "scale_attn_weights": (get("scale_attn_weights", True), (True,)),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ValueError(f"GPT-2 config {key}={value!r} is not supported by fastgpt (supported: {allowed})")
    return cfg


def state_dict_from_hf_gpt2(hf_state_dict: Mapping[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Map a Hugging Face GPT-2 state dict (GPT2Model or GPT2LMHeadModel) to fastgpt keys.

    Raises KeyError naming the first tensor that is missing. The ``att.mask``
    entries are not produced: fastgpt's load accepts state dicts without them.
    """
    prefix = "transformer." if "transformer.wte.weight" in hf_state_dict else ""

    def take(key: str) -> torch.Tensor:
        try:
            return hf_state_dict[prefix + key]
        except KeyError:
            raise KeyError(f"Hugging Face GPT-2 checkpoint has no tensor {prefix + key!r}") from None

    out = {
        "tok_emb.weight": take("wte.weight"),
        "pos_emb.weight": take("wpe.weight"),
        "final_norm.scale": take("ln_f.weight"),
        "final_norm.shift": take("ln_f.bias"),
        # Tied head: lm_head.weight, when present, is the token embedding.
        "out_head.weight": hf_state_dict.get("lm_head.weight", take("wte.weight")),
    }
    for i in range(n_layers):
        hf, ours = f"h.{i}.", f"trf_blocks.{i}."
        q_w, k_w, v_w = take(hf + "attn.c_attn.weight").chunk(3, dim=1)
        q_b, k_b, v_b = take(hf + "attn.c_attn.bias").chunk(3, dim=0)
        for name, w, b in (("W_query", q_w, q_b), ("W_key", k_w, k_b), ("W_value", v_w, v_b)):
            out[f"{ours}att.{name}.weight"] = w.t()
            out[f"{ours}att.{name}.bias"] = b
        out[ours + "att.out_proj.weight"] = take(hf + "attn.c_proj.weight").t()
        out[ours + "att.out_proj.bias"] = take(hf + "attn.c_proj.bias")
        out[ours + "ff.layers.0.weight"] = take(hf + "mlp.c_fc.weight").t()
        out[ours + "ff.layers.0.bias"] = take(hf + "mlp.c_fc.bias")
        out[ours + "ff.layers.2.weight"] = take(hf + "mlp.c_proj.weight").t()
        out[ours + "ff.layers.2.bias"] = take(hf + "mlp.c_proj.bias")
        out[ours + "norm1.scale"] = take(hf + "ln_1.weight")
        out[ours + "norm1.shift"] = take(hf + "ln_1.bias")
        out[ours + "norm2.scale"] = take(hf + "ln_2.weight")
        out[ours + "norm2.shift"] = take(hf + "ln_2.bias")
    return out

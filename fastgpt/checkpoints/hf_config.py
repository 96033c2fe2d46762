"""Hugging Face's GPT-2 ``config.json`` (a ``GPT2Config``): every field computed, or refused by name."""

from __future__ import annotations

from collections.abc import Mapping

from ..config import validate_config

DEFAULT_LAYER_NORM_EPS = 1e-5  # GPT-2's, and the seed's LayerNorm
DROPOUTS_DIFFER = ("GPT-2 config resid_pdrop={resid_pdrop}, embd_pdrop={embd_pdrop}, attn_pdrop={attn_pdrop} differ; "
                   "fastgpt has one drop_rate for all three: pass drop_rate=...")
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def config_from_hf_gpt2(hf_config) -> dict:
    """A fastgpt config dict from a transformers ``GPT2Config`` (or its dict).

    Raises ValueError for a setting that ``GPTModel(cfg)`` would not compute as
    the checkpoint does, naming the field (``from_pretrained`` computes
    ``layer_norm_epsilon`` itself; a bare config dict cannot carry it).
    """
    cfg, eps = hf_gpt2_settings(hf_config)
    validate_config({**cfg, "drop_rate": cfg["drop_rate"] or 0.0})
    if eps != DEFAULT_LAYER_NORM_EPS:
        raise ValueError(f"GPT-2 config layer_norm_epsilon={eps!r}: a GPTModel built from a config dict uses "
                         f"{DEFAULT_LAYER_NORM_EPS}; fastgpt.from_pretrained applies the checkpoint's")
    if cfg["drop_rate"] is None:
        raise ValueError(DROPOUTS_DIFFER.format(**dropout_rates(hf_config)))
    return cfg


def _getter(hf_config):
    if isinstance(hf_config, Mapping):
        return hf_config.get
    return lambda key, default=None: getattr(hf_config, key, default)


def dropout_rates(hf_config) -> dict:
    get = _getter(hf_config)
    return {key: get(key, 0.1) for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}


def hf_gpt2_settings(hf_config) -> tuple[dict, float]:
    """(fastgpt config, LayerNorm eps) from a transformers GPT-2 config, every field accounted for.

    GPT2Config's fields, each computed, refused with a ValueError naming it, or
    irrelevant to the maths:

    * sizes (vocab_size, n_positions, n_embd, n_layer, n_head): the config,
      not validated here (from_pretrained first compares them with the file);
    * layer_norm_epsilon: returned, for the model's LayerNorms;
    * resid_pdrop, embd_pdrop, attn_pdrop: one drop_rate (None when they differ:
      the caller must choose; dropout never changes inference);
    * n_inner (only 4·n_embd), activation_function (only the tanh GELU),
      scale_attn_weights (only True), scale_attn_by_inverse_layer_idx (only
      False), add_cross_attention (only False), pruned_heads (only none): refused otherwise;
    * reorder_and_upcast_attn: the same maths in another order, computed in
      float32 either way by fastgpt's attention (tests check the logits agree);
    * tie_word_embeddings, qkv_bias: read by the loader against the tensors;
    * initializer_range, summary_* (GPT2DoubleHeadsModel's head, whose tensors
      the loader refuses), token ids, use_cache, output and dtype settings:
      nothing fastgpt computes from.
    """
    get = _getter(hf_config)
    cfg = {
        "vocab_size": get("vocab_size"),
        "context_length": get("n_positions"),
        "emb_dim": get("n_embd"),
        "n_heads": get("n_head"),
        "n_layers": get("n_layer"),
        "drop_rate": 0.0,  # checked as a number below, then set
        "qkv_bias": True,  # GPT-2's c_attn always has a bias
    }
    # The sizes are validated by the caller, after from_pretrained has compared them with the file.
    dropouts = dropout_rates(hf_config)
    for key, value in dropouts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"GPT-2 config {key}={value!r} must be a number in [0, 1)")
    cfg["drop_rate"] = float(dropouts["resid_pdrop"]) if len(set(dropouts.values())) == 1 else None
    eps = get("layer_norm_epsilon", DEFAULT_LAYER_NORM_EPS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < float("inf"):
        raise ValueError(f"GPT-2 config layer_norm_epsilon={eps!r} must be a positive finite number")
    # The maths fastgpt implements; refuse variants it would silently compute wrongly.
    unsupported = {
        "activation_function": (get("activation_function", "gelu_new"), _TANH_GELU),
        "n_inner": (get("n_inner"), (None, 4 * cfg["emb_dim"] if isinstance(cfg["emb_dim"], int) else None)),
        "scale_attn_weights": (get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "add_cross_attention": (get("add_cross_attention", False), (False,)),
        "pruned_heads": (get("pruned_heads") or None, (None,)),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ValueError(f"GPT-2 config {key}={value!r} is not supported by fastgpt (supported: "
                             f"{', '.join(map(repr, allowed))}); loading it would compute another model")
    return cfg, float(eps)

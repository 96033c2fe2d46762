"""GPT-2 checkpoint layouts and their conversion into fastgpt's (the seed's) layout.

Three layouts hold the same GPT-2 tensors under different names and shapes:

* fastgpt's, which is the seed's: ``tok_emb.weight``, ``trf_blocks.0.att.W_query.weight``, ...
  with ``nn.Linear`` weights of shape (out, in);
* Hugging Face's: ``wte.weight``, ``h.0.attn.c_attn.weight``, ... (optionally
  under ``transformer.``). Its linear layers are ``Conv1D`` with weights of
  shape (in, out) -- the transpose of ``nn.Linear`` --, query/key/value are
  fused into one ``c_attn`` of width 3·emb_dim, and ``lm_head`` is tied to the
  token embedding unless the config says otherwise;
* OpenAI's original TensorFlow release: ``model/wte``, ``model/h0/attn/c_attn/w``,
  ... with Hugging Face's shapes, plus a leading dimension of 1 on each weight
  of a linear layer.

Each layout is a list of ``StoredTensor``: the name and shape a checkpoint must
hold for a given config, and the fastgpt tensors it becomes. ``loading.py``
checks every name and shape against the list before reading any data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import GPT2_CONFIGS


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


# ---------------------------------------------------------------- layouts

Converter = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class StoredTensor:
    """One tensor a checkpoint layout stores: its name, the shape it must have, and what it becomes."""

    name: str
    shape: tuple[int, ...]
    to_fastgpt: Converter
    required: bool = True


def _as(key: str) -> Converter:
    return lambda t: {key: t}


def _transposed(key: str) -> Converter:
    # Conv1D (in, out) -> nn.Linear (out, in): a transposed view, no copy.
    return lambda t: {key: t.t()}


def _split_qkv_weight(block: str) -> Converter:
    def convert(t: torch.Tensor) -> dict[str, torch.Tensor]:
        # The fused (in, 3·out) tensor as W_query/W_key/W_value's (out, in)
        # weights: transposed views of its three column blocks, no copy.
        return dict(zip(_qkv_keys(block, "weight"), t.t().chunk(3, dim=0)))
    return convert


def _split_qkv_bias(block: str, qkv_bias: bool) -> Converter:
    def convert(t: torch.Tensor) -> dict[str, torch.Tensor]:
        if not qkv_bias:
            # A model without query/key/value biases saved in GPT-2's layout,
            # which always has them: they must be zero, and are dropped.
            if torch.count_nonzero(t):
                raise ValueError("the config says qkv_bias false but this bias is not zero")
            return {}
        return dict(zip(_qkv_keys(block, "bias"), t.chunk(3)))  # views, as the weight above
    return convert


def _qkv_keys(block: str, kind: str) -> list[str]:
    return [f"{block}att.{name}.{kind}" for name in ("W_query", "W_key", "W_value")]


def _embedding(tied_head: bool) -> Converter:
    # A tied output head is the token embedding; fastgpt keeps its own copy, as the seed's model does.
    return lambda t: {"tok_emb.weight": t, **({"out_head.weight": t.clone()} if tied_head else {})}


def hf_gpt2_layout(cfg: Mapping, *, prefix: str = "", tied_head: bool = True) -> list[StoredTensor]:
    """The tensors of a Hugging Face GPT-2 checkpoint for ``cfg`` (names under ``prefix``).

    With ``tied_head`` the output head is the token embedding; otherwise the
    checkpoint must hold ``lm_head.weight``. ``cfg["qkv_bias"]`` False expects
    all-zero ``c_attn`` biases (how ``save_pretrained`` writes such a model).
    """
    V, C, E = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"]
    layout = [
        StoredTensor(prefix + "wte.weight", (V, E), _embedding(tied_head)),
        StoredTensor(prefix + "wpe.weight", (C, E), _as("pos_emb.weight")),
        StoredTensor(prefix + "ln_f.weight", (E,), _as("final_norm.scale")),
        StoredTensor(prefix + "ln_f.bias", (E,), _as("final_norm.shift")),
    ]
    if not tied_head:
        layout.append(StoredTensor("lm_head.weight", (V, E), _as("out_head.weight")))
    for i in range(cfg["n_layers"]):
        hf, ours = f"{prefix}h.{i}.", f"trf_blocks.{i}."
        layout += [
            StoredTensor(hf + "ln_1.weight", (E,), _as(ours + "norm1.scale")),
            StoredTensor(hf + "ln_1.bias", (E,), _as(ours + "norm1.shift")),
            StoredTensor(hf + "attn.c_attn.weight", (E, 3 * E), _split_qkv_weight(ours)),
            StoredTensor(hf + "attn.c_attn.bias", (3 * E,), _split_qkv_bias(ours, cfg["qkv_bias"])),
            StoredTensor(hf + "attn.c_proj.weight", (E, E), _transposed(ours + "att.out_proj.weight")),
            StoredTensor(hf + "attn.c_proj.bias", (E,), _as(ours + "att.out_proj.bias")),
            StoredTensor(hf + "ln_2.weight", (E,), _as(ours + "norm2.scale")),
            StoredTensor(hf + "ln_2.bias", (E,), _as(ours + "norm2.shift")),
            StoredTensor(hf + "mlp.c_fc.weight", (E, 4 * E), _transposed(ours + "ff.layers.0.weight")),
            StoredTensor(hf + "mlp.c_fc.bias", (4 * E,), _as(ours + "ff.layers.0.bias")),
            StoredTensor(hf + "mlp.c_proj.weight", (4 * E, E), _transposed(ours + "ff.layers.2.weight")),
            StoredTensor(hf + "mlp.c_proj.bias", (E,), _as(ours + "ff.layers.2.bias")),
        ]
    return layout


def hf_gpt2_ignorable(name: str) -> bool:
    """Tensors some Hugging Face GPT-2 checkpoints carry that hold no weights: old attention-mask buffers."""
    return name.endswith((".attn.bias", ".attn.masked_bias"))  # c_attn's bias ends "_attn.bias"


def openai_tf_name(hf_name: str) -> str:
    """``h.0.attn.c_attn.weight`` -> ``model/h0/attn/c_attn/w``: OpenAI's TensorFlow variable names."""
    parts = hf_name.split(".")
    if parts[0] == "h":
        parts = [f"h{parts[1]}", *parts[2:]]
    leaf = {"weight": "w", "bias": "b"}
    if parts[-2].startswith("ln_"):
        leaf = {"weight": "g", "bias": "b"}
    if parts[-2] in ("wte", "wpe"):
        return f"model/{parts[-2]}"
    return "model/" + "/".join([*parts[:-1], leaf[parts[-1]]])


def openai_tf_layout(cfg: Mapping) -> list[StoredTensor]:
    """The tensors of OpenAI's TensorFlow GPT-2 checkpoint for ``cfg``.

    The same tensors as Hugging Face's (tied head, QKV biases), with each linear
    layer's weight of shape (1, in, out).
    """
    layout = []
    for stored in hf_gpt2_layout({**cfg, "qkv_bias": True}, tied_head=True):
        if stored.name.endswith("weight") and len(stored.shape) == 2 and not stored.name.startswith(("wte", "wpe")):
            convert = stored.to_fastgpt
            layout.append(StoredTensor(openai_tf_name(stored.name), (1, *stored.shape),
                                       lambda t, convert=convert: convert(t[0])))
        else:
            layout.append(StoredTensor(openai_tf_name(stored.name), stored.shape, stored.to_fastgpt))
    return layout


def seed_state_dict_shapes(cfg: Mapping) -> dict[str, tuple[int, ...]]:
    """The seed's ``GPTModel(cfg).state_dict()`` names and shapes, from the config alone (nothing is built)."""
    V, C, E = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"]
    shapes = {"tok_emb.weight": (V, E), "pos_emb.weight": (C, E)}
    for i in range(cfg["n_layers"]):
        block = f"trf_blocks.{i}."
        shapes[block + "att.mask"] = (C, C)
        for name in ("W_query", "W_key", "W_value"):
            shapes[f"{block}att.{name}.weight"] = (E, E)
            if cfg["qkv_bias"]:
                shapes[f"{block}att.{name}.bias"] = (E,)
        shapes.update({block + "att.out_proj.weight": (E, E), block + "att.out_proj.bias": (E,),
                       block + "ff.layers.0.weight": (4 * E, E), block + "ff.layers.0.bias": (4 * E,),
                       block + "ff.layers.2.weight": (E, 4 * E), block + "ff.layers.2.bias": (E,),
                       block + "norm1.scale": (E,), block + "norm1.shift": (E,),
                       block + "norm2.scale": (E,), block + "norm2.shift": (E,)})
    shapes.update({"final_norm.scale": (E,), "final_norm.shift": (E,), "out_head.weight": (V, E)})
    return shapes


def fastgpt_layout(cfg: Mapping) -> list[StoredTensor]:
    """fastgpt's own (the seed's) layout for ``cfg``; ``att.mask`` is optional."""
    return [StoredTensor(name, shape, _as(name), required=not name.endswith(".att.mask"))
            for name, shape in seed_state_dict_shapes(cfg).items()]


def gpt2_n_heads(emb_dim: int):
    """GPT-2's head count for a released width (768 -> 12, ..., 1600 -> 25), else None."""
    return {preset["emb_dim"]: preset["n_heads"] for preset in GPT2_CONFIGS.values()}.get(emb_dim)


def hf_gpt2_tensors(state_dict: Mapping[str, torch.Tensor], cfg: Mapping) -> tuple[dict[str, torch.Tensor], bool]:
    """fastgpt tensors -> Hugging Face ``GPT2LMHeadModel`` tensors (the reverse of ``hf_gpt2_layout``).

    Returns (tensors, tied): ``lm_head.weight`` is included only when the output
    head differs from the token embedding. A model without query/key/value
    biases gets zero ``c_attn`` biases, which compute the same.
    """
    E = cfg["emb_dim"]
    out = {
        "transformer.wte.weight": state_dict["tok_emb.weight"],
        "transformer.wpe.weight": state_dict["pos_emb.weight"],
        "transformer.ln_f.weight": state_dict["final_norm.scale"],
        "transformer.ln_f.bias": state_dict["final_norm.shift"],
    }
    tied = torch.equal(state_dict["out_head.weight"], state_dict["tok_emb.weight"])
    if not tied:
        out["lm_head.weight"] = state_dict["out_head.weight"]
    for i in range(cfg["n_layers"]):
        hf, ours = f"transformer.h.{i}.", f"trf_blocks.{i}."
        qkv = [f"{ours}att.{name}" for name in ("W_query", "W_key", "W_value")]
        out[hf + "attn.c_attn.weight"] = torch.cat([state_dict[f"{name}.weight"].t() for name in qkv], dim=1)
        if cfg["qkv_bias"]:
            out[hf + "attn.c_attn.bias"] = torch.cat([state_dict[f"{name}.bias"] for name in qkv])
        else:
            out[hf + "attn.c_attn.bias"] = state_dict[f"{qkv[0]}.weight"].new_zeros(3 * E)
        out[hf + "attn.c_proj.weight"] = state_dict[ours + "att.out_proj.weight"].t()
        out[hf + "attn.c_proj.bias"] = state_dict[ours + "att.out_proj.bias"]
        out[hf + "mlp.c_fc.weight"] = state_dict[ours + "ff.layers.0.weight"].t()
        out[hf + "mlp.c_fc.bias"] = state_dict[ours + "ff.layers.0.bias"]
        out[hf + "mlp.c_proj.weight"] = state_dict[ours + "ff.layers.2.weight"].t()
        out[hf + "mlp.c_proj.bias"] = state_dict[ours + "ff.layers.2.bias"]
        out[hf + "ln_1.weight"] = state_dict[ours + "norm1.scale"]
        out[hf + "ln_1.bias"] = state_dict[ours + "norm1.shift"]
        out[hf + "ln_2.weight"] = state_dict[ours + "norm2.scale"]
        out[hf + "ln_2.bias"] = state_dict[ours + "norm2.shift"]
    return {name: tensor.contiguous() for name, tensor in out.items()}, tied

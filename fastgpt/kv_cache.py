"""The KV cache for generation: every layer's keys and values, preallocated once.

Generating a token with a cache costs one position's worth of compute instead
of re-running the whole sequence: each attention layer stores the keys and
values it computed and, on the next call, attends the new tokens' queries over
everything stored so far. GPT-2 adds absolute position embeddings at the input,
so cached keys belong to fixed positions: a full cache cannot slide by one
token (generation restarts it from a cropped window instead, see generation.py).

    cache = KVCache.for_model(model, batch_size=1)
    logits = model(prompt_ids, kv_cache=cache)        # prefill: positions 0 .. T-1
    logits = model(next_ids, kv_cache=cache)          # one more position, T
"""

from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Keys and values of all layers for ``batch_size`` sequences of up to ``max_len`` tokens.

    ``length`` counts the positions stored. ``GPTModel.forward(..., kv_cache=cache)``
    writes the new positions and advances ``length`` only after every layer has
    run, so a call that fails leaves the cache as it was.
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, head_dim: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device=None):
        for name, value in (("n_layers", n_layers), ("batch_size", batch_size), ("n_heads", n_heads),
                            ("head_dim", head_dim), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache {name} must be a positive int, got {value!r}")
        # (layer, batch, head, position, head_dim): one layer's slice up to
        # ``length`` is exactly the (batch, heads, seq, head_dim) attention wants.
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.layers = [LayerKVCache(self, i) for i in range(n_layers)]

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: Optional[int] = None) -> "KVCache":
        """A cache shaped for a fastgpt ``GPTModel``, on its device and in the dtype its attention
        computes in here: the parameters' dtype, or under ``torch.autocast`` autocast's (the
        projections' outputs are then in that dtype). Make it where the model will run.

        ``max_len`` defaults to the model's context length; generation asks for
        no more than it will use.
        """
        cfg = model.cfg
        context_length = cfg["context_length"]
        max_len = context_length if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= context_length:
            raise ValueError(f"max_len must be an int in [1, {context_length}] (the context length), got {max_len!r}")
        weight = model.tok_emb.weight
        return cls(cfg["n_layers"], batch_size, cfg["n_heads"], cfg["emb_dim"] // cfg["n_heads"], max_len,
                   dtype=compute_dtype(weight), device=weight.device)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def reset(self) -> None:
        """Forget every stored position (the memory is kept and reused)."""
        self.length = 0

    def check_fits(self, model_cfg: dict, batch_size: int, new_tokens: int) -> None:
        """Raise ValueError unless ``new_tokens`` more positions of a batch fit this cache and model."""
        n_layers, cache_batch, n_heads, _, head_dim = self.keys.shape
        expected = (model_cfg["n_layers"], model_cfg["n_heads"], model_cfg["emb_dim"] // model_cfg["n_heads"])
        if (n_layers, n_heads, head_dim) != expected:
            raise ValueError(f"the KV cache holds {n_layers} layers × {n_heads} heads × head_dim {head_dim} "
                             f"but the model has {expected[0]} × {expected[1]} × {expected[2]}")
        if batch_size != cache_batch:
            raise ValueError(f"the KV cache was made for batch size {cache_batch}, got a batch of {batch_size}")
        if self.length + new_tokens > self.max_len:
            raise ValueError(f"{new_tokens} new tokens do not fit the KV cache: it holds {self.length} of "
                             f"{self.max_len} positions; reset() it or make a larger one")


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype matmuls with ``weight`` produce here: autocast's, if it is on for the weight's device
    and casts that dtype (autocast leaves float64 alone), else the weight's own."""
    device_type = weight.device.type
    if weight.is_floating_point() and weight.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class LayerKVCache:
    """One layer's view of a ``KVCache``: what ``MultiHeadAttention`` receives as ``layer_cache``."""

    __slots__ = ("cache", "index")

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    @property
    def start(self) -> int:
        """Position of the first token of the current call."""
        return self.cache.length

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values; return all of them so far.

        keys, values: (batch, heads, new_tokens, head_dim). Returns views of the
        cache of shape (batch, heads, start + new_tokens, head_dim).
        """
        stored = self.cache.keys
        if keys.dtype != stored.dtype or keys.device != stored.device:
            # Storing would cast or copy silently, and attention would then fail on mixed inputs.
            raise ValueError(f"the KV cache holds {stored.dtype} on {stored.device} but the model computes "
                             f"{keys.dtype} on {keys.device}; make the cache with KVCache.for_model(model, "
                             "batch_size), after any model.to(...) and inside the torch.autocast the model "
                             "runs under, if any")
        end = self.cache.length + keys.shape[2]
        layer_keys, layer_values = self.cache.keys[self.index], self.cache.values[self.index]
        layer_keys[:, :, self.cache.length:end] = keys
        layer_values[:, :, self.cache.length:end] = values
        return layer_keys[:, :, :end], layer_values[:, :, :end]

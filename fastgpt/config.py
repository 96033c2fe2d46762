"""Model configuration: the seed's config dict, its validation, and size presets.

A config is the plain dict the "LLMs from scratch" GPT-2 takes:

    {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768,
     "n_heads": 12, "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False}

Extra keys are allowed (and ignored); missing or ill-typed keys are errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

# The configuration the seed's code names GPT_CONFIG_124M, unchanged.
GPT_CONFIG_124M = {
    "vocab_size": 50257,     # GPT-2 BPE vocabulary
    "context_length": 1024,  # maximum sequence length
    "emb_dim": 768,          # embedding width
    "n_heads": 12,           # attention heads
    "n_layers": 12,          # transformer blocks
    "drop_rate": 0.1,        # dropout on embeddings, attention weights, residual branches
    "qkv_bias": False,       # bias in the query/key/value projections
}

# (emb_dim, n_layers, n_heads) of the four released GPT-2 sizes.
_GPT2_SIZES = {
    "gpt2-small": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}
_SIZE_ALIASES = {"124M": "gpt2-small", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}


def _preset(name: str) -> Mapping:
    emb_dim, n_layers, n_heads = _GPT2_SIZES[name]
    return MappingProxyType({**GPT_CONFIG_124M, "emb_dim": emb_dim, "n_layers": n_layers, "n_heads": n_heads})


# Read-only presets under both naming schemes ("gpt2-small" and "124M", ...):
# GPT_CONFIG_124M with the size fields replaced, as the seed builds them.
# Use gpt2_config() for a dict you can change.
GPT2_CONFIGS: Mapping[str, Mapping] = MappingProxyType(
    {**{name: _preset(name) for name in _GPT2_SIZES},
     **{alias: _preset(name) for alias, name in _SIZE_ALIASES.items()}}
)


def gpt2_config(name: str = "gpt2-small", **overrides) -> dict:
    """A fresh, validated config dict for a GPT-2 size, with optional overrides.

    >>> gpt2_config("355M", drop_rate=0.0, qkv_bias=True)["emb_dim"]
    1024
    """
    if name not in GPT2_CONFIGS:
        raise ValueError(f"unknown GPT-2 size {name!r}; choose one of {', '.join(GPT2_CONFIGS)}")
    unknown = sorted(set(overrides) - set(GPT_CONFIG_124M))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; config keys are {sorted(GPT_CONFIG_124M)}")
    cfg = {**GPT2_CONFIGS[name], **overrides}
    validate_config(cfg)
    return cfg


_INT_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")


def validate_config(cfg) -> None:
    """Raise a ValueError/TypeError naming the first problem with a model config."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"config must be a dict like fastgpt.GPT_CONFIG_124M, got {type(cfg).__name__}")
    missing = [key for key in GPT_CONFIG_124M if key not in cfg]
    if missing:
        raise ValueError(f"config is missing key(s) {missing}; a GPT-2 config needs {list(GPT_CONFIG_124M)}")
    for key in _INT_KEYS:
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"config[{key!r}] must be an int, got {value!r}")
        if value <= 0:
            raise ValueError(f"config[{key!r}] must be positive, got {value}")
    drop_rate = cfg["drop_rate"]
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)):
        raise TypeError(f"config['drop_rate'] must be a float, got {drop_rate!r}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"config['drop_rate'] must be in [0, 1), got {drop_rate}")
    if not isinstance(cfg["qkv_bias"], bool):
        raise TypeError(f"config['qkv_bias'] must be True or False, got {cfg['qkv_bias']!r}")
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise ValueError(
            f"config['emb_dim'] ({cfg['emb_dim']}) must be divisible by config['n_heads'] ({cfg['n_heads']})"
        )

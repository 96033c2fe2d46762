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

# Sizes no GPT-2 comes near (GPT-2 XL: 48 blocks, 1.6e9 parameters). A config past
# them is almost surely a typo, and building it would stall or exhaust memory
# long before any error, so it is refused up front.
MAX_LAYERS = 1024
MAX_PARAMETERS = 2**34


def parameter_count_of(cfg) -> int:
    """Parameters of a ``GPTModel(cfg)``, counted from the config alone (nothing is built)."""
    return sum(_parameters_by_part(cfg).values())


def _parameters_by_part(cfg) -> dict[str, int]:
    d, vocab = cfg["emb_dim"], cfg["vocab_size"]
    qkv = 3 * d * d + (3 * d if cfg["qkv_bias"] else 0)
    out_proj = d * d + d
    feed_forward = (d * 4 * d + 4 * d) + (4 * d * d + d)
    norms = 2 * 2 * d
    return {
        "tok_emb and out_head (vocab_size × emb_dim each)": 2 * vocab * d,
        "pos_emb (context_length × emb_dim)": cfg["context_length"] * d,
        "the transformer blocks (n_layers of them)": cfg["n_layers"] * (qkv + out_proj + feed_forward + norms),
        "final_norm": 2 * d,
    }


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
    if cfg["n_layers"] > MAX_LAYERS:
        raise ValueError(f"config['n_layers'] is {cfg['n_layers']}, more than fastgpt builds ({MAX_LAYERS}; "
                         "GPT-2 has 12 to 48)")
    parts = _parameters_by_part(cfg)
    parameters = sum(parts.values())
    if parameters > MAX_PARAMETERS:
        largest = max(parts, key=parts.get)
        raise ValueError(f"this config makes a model of {parameters:.3g} parameters ({4 * parameters / 2**30:,.0f} GiB "
                         f"in float32), more than fastgpt builds ({MAX_PARAMETERS:.3g}; GPT-2 XL has 1.6e9), "
                         f"{parts[largest]:.3g} of them in {largest}: check the sizes")

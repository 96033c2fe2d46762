"""fastgpt: a drop-in GPT-2 for PyTorch whose hot paths run as Triton kernels on CUDA GPUs.

    from fastgpt import GPTModel, GPT_CONFIG_124M
    model = GPTModel(GPT_CONFIG_124M)
"""

# `import fastgpt` loads nothing heavy: each name is imported from its module on
# first use (PEP 562), so the `fastgpt` command parses its arguments, and answers
# --help, without loading torch. Add an export to _EXPORTS (name -> module), not
# as an import statement here.

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GPTModel": "model", "LayerNorm": "model", "GELU": "model", "FeedForward": "model",
    "MultiHeadAttention": "model", "TransformerBlock": "model",
    "DummyGPTModel": "dummy_model",
    "GPT_CONFIG_124M": "config", "GPT2_CONFIGS": "config", "gpt2_config": "config", "validate_config": "config",
    "set_backend": "ops", "get_backend": "ops", "use_backend": "ops", "BackendError": "ops",
    "parameter_count": "profiling.stats", "memory_size_mb": "profiling.stats",
    "KVCache": "kv_cache",
    "generate": "generation", "generate_stream": "generation", "generate_text_simple": "generation",
    "get_tokenizer": "tokenizer", "text_to_token_ids": "tokenizer", "token_ids_to_text": "tokenizer",
    "from_pretrained": "checkpoints", "save_pretrained": "checkpoints", "CheckpointError": "checkpoints",
    "tie_weights": "model", "fused_linear_cross_entropy": "loss",
    "calc_loss_batch": "training", "calc_loss_loader": "training",
    "check": "checking",
}

__all__ = [
    "GPTModel", "DummyGPTModel", "GPT_CONFIG_124M", "GPT2_CONFIGS", "gpt2_config", "validate_config",
    "LayerNorm", "GELU", "FeedForward", "MultiHeadAttention", "TransformerBlock",
    "set_backend", "get_backend", "use_backend", "BackendError", "ops",
    "parameter_count", "memory_size_mb",
    "KVCache", "generate", "generate_stream", "generate_text_simple",
    "get_tokenizer", "text_to_token_ids", "token_ids_to_text",
    "from_pretrained", "save_pretrained", "CheckpointError",
    "tie_weights", "fused_linear_cross_entropy", "calc_loss_batch", "calc_loss_loader", "check",
]


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    else:
        try:  # a submodule not imported yet: fastgpt.ops, fastgpt.generation, ...
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS, *__all__})

"""fastgpt: a drop-in GPT-2 for PyTorch whose hot paths run as Triton kernels on CUDA GPUs.

    from fastgpt import GPTModel, GPT_CONFIG_124M
    model = GPTModel(GPT_CONFIG_124M)
"""

from . import ops
from .config import GPT2_CONFIGS, GPT_CONFIG_124M, gpt2_config, validate_config
from .dummy_model import DummyGPTModel
from .model import GELU, FeedForward, GPTModel, LayerNorm, MultiHeadAttention, TransformerBlock
from .ops import BackendError, get_backend, set_backend, use_backend
from .stats import memory_size_mb, parameter_count
from .kv_cache import KVCache
from .generation import generate, generate_stream, generate_text_simple
from .tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text
from .checkpoints import from_pretrained, save_pretrained
from .weights import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "GPTModel", "DummyGPTModel", "GPT_CONFIG_124M", "GPT2_CONFIGS", "gpt2_config", "validate_config",
    "LayerNorm", "GELU", "FeedForward", "MultiHeadAttention", "TransformerBlock",
    "set_backend", "get_backend", "use_backend", "BackendError", "ops",
    "parameter_count", "memory_size_mb",
    "KVCache", "generate", "generate_stream", "generate_text_simple",
    "get_tokenizer", "text_to_token_ids", "token_ids_to_text",
    "from_pretrained", "save_pretrained", "CheckpointError",
]

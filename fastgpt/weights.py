"""The old home of the checkpoint name mappings, kept so that ``fastgpt.weights.X`` imports keep working.

They live in ``fastgpt/checkpoints/`` now: ``layouts.py`` (the layouts and
conversions), ``hf_config.py`` (``config_from_hf_gpt2``), ``files.py``
(``CheckpointError``).
"""

from .checkpoints.files import CheckpointError
from .checkpoints.hf_config import config_from_hf_gpt2
from .checkpoints.layouts import (
    StoredTensor, fastgpt_layout, gpt2_n_heads, hf_gpt2_ignorable, hf_gpt2_layout, hf_gpt2_tensors, openai_tf_layout,
    openai_tf_name, seed_state_dict_shapes, state_dict_from_hf_gpt2,
)

__all__ = [
    "CheckpointError", "config_from_hf_gpt2", "StoredTensor", "fastgpt_layout", "gpt2_n_heads", "hf_gpt2_ignorable",
    "hf_gpt2_layout", "hf_gpt2_tensors", "openai_tf_layout", "openai_tf_name", "seed_state_dict_shapes",
    "state_dict_from_hf_gpt2",
]

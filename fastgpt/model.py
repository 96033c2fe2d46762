"""GPT-2, as the "LLMs from scratch" GPTModel, with its hot ops routed through fastgpt.ops.

Drop-in contract (DESIGN.md): the same config dict, the same module names and
state-dict keys (``att.mask`` included), the same parameter creation order and
initialisers -- so ``torch.manual_seed(s); GPTModel(cfg)`` draws the seed's
weights bit for bit -- and the same maths: pre-LN blocks, LayerNorm (eps 1e-5,
biased variance), tanh GELU, causal softmax attention scaled by 1/sqrt(head_dim),
dropout on embeddings, attention weights and both residual branches.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import ops
from .config import validate_config


class LayerNorm(nn.Module):
    """LayerNorm with the seed's parameter names ``scale`` and ``shift``."""

    def __init__(self, emb_dim: int):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GELU, tanh approximation (GPT-2's activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu(x)


class FeedForward(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def causal_mask(context_length: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The seed's mask buffer: 1 above the diagonal (positions a query may not see)."""
    return torch.triu(torch.ones(context_length, context_length, dtype=dtype, device=device), diagonal=1)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with separate query/key/value projections.

    The seed keeps a (context_length × context_length) ``mask`` buffer; fastgpt
    never needs it (the attention op is causal by construction), so it is not
    stored. It still appears in ``state_dict()`` as ``att.mask`` and is accepted
    -- and checked -- by ``load_state_dict``, so checkpoints move both ways.
    """

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_load_state_dict_pre_hook(_accept_mask)

    @property
    def mask(self) -> torch.Tensor:
        """The seed's mask buffer, built on demand (fastgpt stores no copy of it)."""
        weight = self.out_proj.weight
        return causal_mask(self.context_length, dtype=weight.dtype, device=weight.device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Where the seed's persistent buffer would be saved: before the child
        # modules' keys, so state_dict() lists the keys in the seed's order.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "mask"] = self.mask

    def forward(self, x: torch.Tensor, layer_cache=None) -> torch.Tensor:
        if layer_cache is not None:
            raise NotImplementedError("KV-cache attention is not implemented yet")
        b, num_tokens, _ = x.shape
        # (b, T, d_out) -> (b, heads, T, head_dim): a strided view, no copy.
        def heads(t):
            return t.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        queries, keys, values = heads(self.W_query(x)), heads(self.W_key(x)), heads(self.W_value(x))
        dropout_p = self.dropout.p if self.training else 0.0
        context = ops.causal_attention(queries, keys, values, dropout_p=dropout_p)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)


def _accept_mask(module: MultiHeadAttention, state_dict, prefix, local_metadata, strict,
                 missing_keys, unexpected_keys, error_msgs) -> None:
    key = prefix + "mask"
    if key not in state_dict:
        return  # tolerated: the mask carries no learned information
    mask = state_dict.pop(key)
    expected = (module.context_length, module.context_length)
    if tuple(mask.shape) != expected:
        error_msgs.append(
            f"size mismatch for {key}: copying a param with shape {tuple(mask.shape)} from checkpoint, "
            f"the shape in current model is {expected} (context_length {module.context_length})"
        )
    elif mask.device.type != "meta" and not torch.equal(mask.bool().cpu(), causal_mask(expected[0]).bool()):
        error_msgs.append(f"{key} is not the causal mask (ones strictly above the diagonal); "
                          "fastgpt supports causal GPT-2 attention only")


class TransformerBlock(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor, layer_cache=None) -> torch.Tensor:
        # layer_cache: this block's slice of a generation KV cache, or None.
        x = x + self.drop_shortcut(self.att(self.norm1(x), layer_cache))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


def check_token_ids(in_idx, vocab_size: int, context_length: int, device: torch.device) -> None:
    """Reject token ids the model cannot embed, before any compute runs.

    Raises TypeError/ValueError naming the problem. The range check reads the ids'
    minimum and maximum (one device sync); it is skipped while torch.compile traces.
    """
    if not isinstance(in_idx, torch.Tensor):
        raise TypeError(f"token ids must be a torch.Tensor of shape (batch, seq_len), got {type(in_idx).__name__}")
    if in_idx.dtype.is_floating_point or in_idx.dtype.is_complex or in_idx.dtype == torch.bool:
        raise TypeError(f"token ids must be an integer tensor (torch.long), got dtype {in_idx.dtype}")
    if in_idx.dim() != 2:
        hint = "; add a batch dimension with in_idx.unsqueeze(0)" if in_idx.dim() == 1 else ""
        raise ValueError(f"token ids must have shape (batch, seq_len), got shape {tuple(in_idx.shape)}{hint}")
    batch, seq_len = in_idx.shape
    if batch == 0 or seq_len == 0:
        raise ValueError(f"token ids must be non-empty, got shape {tuple(in_idx.shape)}")
    if seq_len > context_length:
        raise ValueError(
            f"sequence length {seq_len} exceeds the model's context_length {context_length}; "
            f"crop the input, e.g. in_idx[:, -{context_length}:]"
        )
    if in_idx.device != device:
        raise ValueError(f"token ids are on {in_idx.device} but the model is on {device}; move one of them")
    if not torch.compiler.is_compiling():
        low, high = int(in_idx.min()), int(in_idx.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


class GPTModel(nn.Module):
    """GPT-2: ``GPTModel(cfg)(in_idx) -> logits`` of shape (batch, seq_len, vocab_size)."""

    def __init__(self, cfg: dict):
        super().__init__()
        validate_config(cfg)
        self.cfg = dict(cfg)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        check_token_ids(in_idx, self.cfg["vocab_size"], self.cfg["context_length"], self.tok_emb.weight.device)
        seq_len = in_idx.shape[1]
        tok_embeds = self.tok_emb(in_idx)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = self.drop_emb(tok_embeds + pos_embeds)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        return self.out_head(x)

"""GPT-2, as the "LLMs from scratch" GPTModel, with its hot ops routed through fastgpt.ops.

Drop-in contract (docs/design.md): the same config dict, the same module names and
state-dict keys (``att.mask`` included), the same parameter creation order and
initialisers -- so ``torch.manual_seed(s); GPTModel(cfg)`` draws the seed's
weights bit for bit -- and the same maths: pre-LN blocks, LayerNorm (eps 1e-5,
biased variance), tanh GELU, causal softmax attention scaled by 1/sqrt(head_dim),
dropout on embeddings, attention weights and both residual branches.

The modules come in the order of the book's chapter 4: LayerNorm, GELU,
FeedForward, MultiHeadAttention, TransformerBlock, GPTModel. What keeps them a
drop-in for the seed's code beyond the maths (the ``att.mask`` buffer, the
rule for when a fused op may skip a submodule's forward, the ``drop_resid``
alias, token-id checks, the tied head's load hook) is in ``seed_compat.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import validate_config
from .few_row_matmul import apply_linear, plain_linear
from .kv_cache import KVCache
from .loss import fused_linear_cross_entropy
from .seed_compat import (RESIDUAL_DROPOUT, RESIDUAL_DROPOUT_ALIASES, accept_mask, check_tied_head, check_token_ids,
                          runs_as_stock, save_mask, seed_mask)


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
        # layers[0] + layers[1] as one op, so the Triton path can fuse the bias
        # add into the activation; the parameters stay where the seed keeps them.
        # Only while the Sequential, the Linear and the GELU are stock and
        # unhooked: otherwise the seed's call, self.layers(x), runs them all.
        if not (runs_as_stock(self.layers, nn.Sequential) and len(self.layers) == 3):
            return self.layers(x)
        expand, activation, project = self.layers
        if not (plain_linear(expand) and expand.bias is not None and runs_as_stock(activation, GELU)):
            return self.layers(x)
        return project(ops.linear_gelu(x, expand.weight, expand.bias))


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with the seed's three projections, ``W_query``, ``W_key``, ``W_value``.

    They are ordinary ``nn.Linear`` layers owning their parameters, created in
    the seed's order; a wrapped or hooked one (LoRA, ...) is called as a module.

    The seed keeps a (context_length × context_length) ``mask`` buffer; fastgpt
    never needs it (the attention op is causal by construction), so it is not
    stored. It still appears in ``state_dict()`` as ``att.mask`` and is accepted
    -- and checked -- by ``load_state_dict``, so checkpoints move both ways.
    Attention-weight dropout runs inside the attention op while ``dropout`` is
    a stock, unhooked ``nn.Dropout``; otherwise the weights are computed as the
    seed does and handed to ``self.dropout``.
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
        self.register_load_state_dict_pre_hook(accept_mask)

    @property
    def mask(self) -> torch.Tensor:
        """The seed's mask buffer, built on demand (fastgpt stores no copy of it)."""
        return seed_mask(self)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        save_mask(self, destination, prefix)  # where the seed saves its buffer: the keys in the seed's order

    def forward(self, x: torch.Tensor, layer_cache=None) -> torch.Tensor:
        """x: (batch, tokens, d_in). With ``layer_cache`` (a ``LayerKVCache``), x holds
        the newest tokens only: their keys and values are stored, and their
        queries attend over every position cached so far."""
        b, num_tokens, _ = x.shape
        # (b, T, d_out) -> (b, heads, T, head_dim): a strided view, no copy.
        def heads(t):
            return t.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        queries, keys, values = (heads(t) for t in self._projections(x))
        if layer_cache is not None:
            keys, values = layer_cache.append(keys, values)
        if runs_as_stock(self.dropout, nn.Dropout):
            dropout_p = self.dropout.p if self.training else 0.0
            if layer_cache is None:
                context = ops.causal_attention(queries, keys, values, dropout_p=dropout_p)
            else:
                context = ops.cached_attention(queries, keys, values, dropout_p=dropout_p)
        else:  # a replaced or hooked dropout sees the attention weights, as in the seed
            context = self._attention_through_dropout(queries, keys, values)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return apply_linear(self.out_proj, context)

    def _projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W_query(x), W_key(x), W_value(x): three matmuls (one each), hooks and wrappers honoured."""
        return apply_linear(self.W_query, x), apply_linear(self.W_key, x), apply_linear(self.W_value, x)

    def _attention_through_dropout(self, queries, keys, values) -> torch.Tensor:
        """The seed's attention: masked, scaled softmax weights, ``self.dropout`` of them, times the values.

        The queries are the last of the keys' positions (all of them without a cache).
        """
        q_len, kv_len = queries.shape[-2], keys.shape[-2]
        scores = queries @ keys.transpose(2, 3)
        hidden = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).triu(kv_len - q_len + 1)
        weights = torch.softmax(scores.masked_fill(hidden, -torch.inf) / keys.shape[-1] ** 0.5, dim=-1)
        return self.dropout(weights) @ values


class TransformerBlock(nn.Module):
    """Pre-LN block. The residual dropout is ``drop_shortcut`` (the book's text) alias ``drop_resid``
    (the book's package): one module under two names, listed once, as ``drop_shortcut``."""

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

    @property
    def drop_resid(self) -> nn.Module:
        """``drop_shortcut`` under the name the book's package gives it."""
        return self.drop_shortcut

    def __setattr__(self, name, value):
        super().__setattr__(RESIDUAL_DROPOUT if name in RESIDUAL_DROPOUT_ALIASES else name, value)

    def __delattr__(self, name):
        super().__delattr__(RESIDUAL_DROPOUT if name in RESIDUAL_DROPOUT_ALIASES else name)

    def forward(self, x: torch.Tensor, layer_cache=None) -> torch.Tensor:
        # layer_cache: this block's slice of a generation KV cache, or None (the seed's call: att(x)).
        branch = self.att(self.norm1(x)) if layer_cache is None else self.att(self.norm1(x), layer_cache)
        if runs_as_stock(self.norm2, LayerNorm) and runs_as_stock(self.drop_shortcut, nn.Dropout):
            # x + dropout(attention) and norm2 of it, fused: one read of the residual
            # stream and the branch, one write of each result.
            dropout_p = self.drop_shortcut.p if self.training else 0.0
            x, normed = ops.dropout_add_layer_norm(x, branch, self.norm2.scale, self.norm2.shift, self.norm2.eps,
                                                   dropout_p)
        else:  # the seed's calls, one module at a time
            x = self.drop_shortcut(branch) + x
            normed = self.norm2(x)
        return x + self.drop_shortcut(self.ff(normed))


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
        self.register_load_state_dict_pre_hook(check_tied_head)

    def forward(self, in_idx: torch.Tensor, *, kv_cache=None, last_logits_only: bool = False,
                targets: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                chunk_size: Optional[int] = None) -> torch.Tensor:
        """Logits (batch, seq_len, vocab_size) for token ids (batch, seq_len); with ``targets``, the loss.

        Keyword-only extras; the defaults are the seed's forward:

        * ``kv_cache``: a ``fastgpt.KVCache``. ``in_idx`` then holds the tokens
          that follow the ``kv_cache.length`` positions already cached; they sit
          at positions ``length .. length + seq_len - 1`` and are cached in turn.
        * ``last_logits_only``: compute the final norm and output head for the
          last position only, returning (batch, 1, vocab_size).
        * ``targets`` (batch, seq_len): return ``F.cross_entropy(logits.flatten(0, 1),
          targets.flatten(), ignore_index=..., reduction=...)`` without building the
          logits (see ``loss``). Through ``forward``, so a DDP or FSDP wrapper, or
          ``torch.compile``, runs it as it runs the model.
        """
        check_token_ids(in_idx, self.cfg["vocab_size"], self.cfg["context_length"], self.tok_emb.weight.device)
        if targets is not None:
            if kv_cache is not None or last_logits_only:
                raise ValueError("targets (a training loss) cannot be combined with kv_cache or last_logits_only")
            return self._loss(in_idx, targets, ignore_index, reduction, chunk_size)
        if kv_cache is not None:
            if not isinstance(kv_cache, KVCache):
                raise TypeError(f"kv_cache must be a fastgpt.KVCache or None, got {type(kv_cache).__name__}")
            kv_cache.check_fits(self.cfg, in_idx.shape[0], in_idx.shape[1])
        return self._logits(in_idx, kv_cache, last_logits_only)

    def hidden_states(self, in_idx: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm's output (batch, seq_len, emb_dim): what ``out_head`` turns into logits.

        For a loss of your own over the output head (``loss`` is this plus
        ``fastgpt.fused_linear_cross_entropy``).
        """
        check_token_ids(in_idx, self.cfg["vocab_size"], self.cfg["context_length"], self.tok_emb.weight.device)
        return self._hidden(in_idx)

    def loss(self, in_idx: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
             reduction: str = "mean", chunk_size: Optional[int] = None) -> torch.Tensor:
        """``F.cross_entropy(model(in_idx).flatten(0, 1), targets.flatten())``, without building the logits.

        targets: (batch, seq_len) token ids, ``ignore_index`` where no loss is
        wanted. The output head and the loss run chunk by chunk
        (``fastgpt.fused_linear_cross_entropy``), so the (batch · seq_len ×
        vocab_size) logits, their softmax and their gradient never exist at once.
        An output head replaced by a wrapper (LoRA, ...) is called as a module,
        through its logits. Same as ``model(in_idx, targets=targets, ...)``.
        """
        return self(in_idx, targets=targets, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size)

    def _loss(self, in_idx, targets, ignore_index, reduction, chunk_size) -> torch.Tensor:
        if not isinstance(targets, torch.Tensor) or targets.shape != in_idx.shape:
            shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets must be a tensor of the inputs' shape {tuple(in_idx.shape)}, got {shape}")
        head = self.out_head
        if not (plain_linear(head) and head.bias is None):  # a wrapped head computes more than its weight
            logits = head(self._hidden(in_idx))
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                                   reduction=reduction)
        return fused_linear_cross_entropy(self._hidden(in_idx), head.weight, targets, ignore_index=ignore_index,
                                          reduction=reduction, chunk_size=chunk_size)

    def _hidden(self, in_idx: torch.Tensor, kv_cache=None, last_only: bool = False) -> torch.Tensor:
        seq_len = in_idx.shape[1]
        start = 0 if kv_cache is None else kv_cache.length
        tok_embeds = self.tok_emb(in_idx)
        pos_embeds = self.pos_emb(torch.arange(start, start + seq_len, device=in_idx.device))
        x = self.drop_emb(tok_embeds + pos_embeds)
        if kv_cache is None:
            x = self.trf_blocks(x)
        else:
            for block, layer_cache in zip(self.trf_blocks, kv_cache.layers):
                x = block(x, layer_cache)
            kv_cache.length = start + seq_len  # only once every layer has stored its part
        if last_only:
            x = x[:, -1:, :]
        return self.final_norm(x)

    def _logits(self, in_idx: torch.Tensor, kv_cache=None, last_logits_only: bool = False) -> torch.Tensor:
        # forward() without the argument checks: generation checks its inputs
        # once, then calls this for every token without a device sync per call.
        return apply_linear(self.out_head, self._hidden(in_idx, kv_cache, last_logits_only))

    # The checkpoint formats (fastgpt.checkpoints) build on this module, never the reverse:
    # these two methods reach them through the package's public API, at call time.

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "GPTModel":
        """Load GPT-2 weights from disk; see ``fastgpt.from_pretrained`` for the formats."""
        import fastgpt

        return fastgpt.from_pretrained(path, model_class=cls, **kwargs)

    def save_pretrained(self, directory) -> None:
        """Write config.json + model.safetensors, readable by fastgpt and by transformers' GPT-2."""
        import fastgpt

        fastgpt.save_pretrained(self, directory)


def tie_weights(model: GPTModel) -> GPTModel:
    """Make the output head and the token embedding one parameter, as GPT-2's release and transformers do.

    Off by default, as in the seed's model: there the head is a matrix of its
    own (163M parameters for GPT-2 small against 124M tied). The head takes the
    embedding's values. ``state_dict()`` still lists both keys (the same
    tensor), so the seed's model loads it; loading a checkpoint whose two
    tensors differ into a tied model is refused rather than half-applied.
    Returns the model.
    """
    if not isinstance(model, GPTModel):
        raise TypeError(f"tie_weights takes a fastgpt GPTModel, got {type(model).__name__}")
    head, embedding = model.out_head, model.tok_emb
    if not plain_linear(head) or head.bias is not None:
        raise ValueError("tie_weights: the output head has been replaced or given a bias; tie before wrapping it")
    if head.weight.shape != embedding.weight.shape:
        raise ValueError(f"tie_weights: the output head {tuple(head.weight.shape)} and the token embedding "
                         f"{tuple(embedding.weight.shape)} differ in shape")
    head.weight = embedding.weight
    return model

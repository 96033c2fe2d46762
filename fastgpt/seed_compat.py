"""What keeps fastgpt's GPTModel a drop-in for the seed's ("LLMs from scratch" chapter 4) GPTModel.

``model.py`` reads like the chapter: the modules and their maths. What lets a
program, a checkpoint or a hook written for the seed's model work unchanged on
it (docs/design.md, "The drop-in contract") is here:

* the attention ``mask`` buffer: the seed keeps a persistent
  context × context buffer; fastgpt stores none (its attention is causal by
  construction) but builds it on demand for ``att.mask``, lists it in
  ``state_dict()`` where the seed does, and accepts -- and checks -- it in
  ``load_state_dict``; ``masks_omitted()`` leaves it out for savers that drop it;
* when a fused op may stand in for a submodule's ``forward`` (``runs_as_stock``):
  only while that submodule is the stock class with no hook, so hooks fire and
  replaced modules (LoRA, a custom dropout) run as in the seed;
* the residual dropout's two names, ``drop_shortcut`` (the book's text) and
  ``drop_resid`` (the book's package);
* the token-id checks the seed's model leaves to ``nn.Embedding`` (``check_token_ids``);
* the tied output head's load hook (``weights_tied``, ``check_tied_head``;
  ``tie_weights`` itself is in model.py).

This module imports nothing of model.py: model.py and ``fastgpt.checkpoints`` both build on it.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from .few_row_matmul import unhooked

# ---------------------------------------------------------------- the attention mask buffer

# Set by masks_omitted(): state_dict() then leaves the att.mask entries out instead of building them.
_omit_masks = contextvars.ContextVar("fastgpt_omit_masks", default=False)


@contextlib.contextmanager
def masks_omitted():
    """``state_dict()`` without the seed's ``att.mask`` entries, never built (savers that drop them anyway)."""
    token = _omit_masks.set(True)
    try:
        yield
    finally:
        _omit_masks.reset(token)


def causal_mask(context_length: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The seed's mask buffer: 1 above the diagonal (positions a query may not see)."""
    return torch.triu(torch.ones(context_length, context_length, dtype=dtype, device=device), diagonal=1)


def seed_mask(att) -> torch.Tensor:
    """A MultiHeadAttention's ``mask``: the seed's buffer, built on demand (fastgpt stores no copy of it)."""
    # The first parameter: W_query's weight, or the wrapped layer's (LoRA lists it first).
    weight = next(att.parameters(), None)
    if weight is None:  # every parameter replaced by something that is not one
        weight = torch.empty(0)
    if weight.is_meta:  # shape only; triu on meta tensors would import torch._dynamo
        return torch.empty(att.context_length, att.context_length, dtype=weight.dtype, device="meta")
    return causal_mask(att.context_length, dtype=weight.dtype, device=weight.device)


def save_mask(att, destination, prefix) -> None:
    """Add ``att``'s ``mask`` to a state dict being saved, unless ``masks_omitted()`` is in force.

    Called from MultiHeadAttention._save_to_state_dict: where the seed's persistent
    buffer would be saved, before the child modules' keys, so state_dict() lists the
    keys in the seed's order.
    """
    if not _omit_masks.get():
        destination[prefix + "mask"] = att.mask


def accept_mask(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                error_msgs) -> None:
    """MultiHeadAttention's load_state_dict pre-hook: take ``mask`` out of the state dict, checked."""
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


# ---------------------------------------------------------------- fused ops and the submodules they stand in for

def runs_as_stock(module, cls) -> bool:
    """True while calling ``module`` would run ``cls.forward`` and nothing else, so a fused op may replace the call.

    ``module`` must be exactly ``cls`` (not a subclass, not a replacement) with no
    forward or backward hook of its own, none registered globally, and no
    ``forward`` patched onto the instance. Otherwise the caller calls the module.
    """
    return type(module) is cls and unhooked(module)


# The residual dropout: the book's text calls it drop_shortcut (registered under
# that name, as in tests/reference_model.py); the book's package drop_resid.
RESIDUAL_DROPOUT = "drop_shortcut"
RESIDUAL_DROPOUT_ALIASES = ("drop_resid",)


# ---------------------------------------------------------------- token ids

def check_token_ids(in_idx, vocab_size: int, context_length: int, device: torch.device) -> None:
    """Reject token ids the model cannot embed, before any compute runs.

    Raises TypeError/ValueError naming the problem. The range check reads the ids'
    minimum and maximum (one device sync); it is skipped while torch.compile traces.
    """
    if not isinstance(in_idx, torch.Tensor):
        raise TypeError(f"token ids must be a torch.Tensor of shape (batch, seq_len), got {type(in_idx).__name__}")
    if in_idx.dtype.is_floating_point or in_idx.dtype.is_complex or in_idx.dtype == torch.bool:
        raise TypeError(f"token ids must be an integer tensor (torch.long), got dtype {in_idx.dtype}")
    if in_idx.dtype not in (torch.int64, torch.int32):  # what nn.Embedding takes
        raise TypeError(f"token ids must be torch.long (or torch.int32), got dtype {in_idx.dtype}; "
                        "convert them with idx.long()")
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


# ---------------------------------------------------------------- the tied output head

def weights_tied(model) -> bool:
    """True when the output head and the token embedding are one parameter (``tie_weights``)."""
    return getattr(model.out_head, "weight", None) is model.tok_emb.weight


def check_tied_head(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                    error_msgs) -> None:
    """GPTModel's load_state_dict pre-hook: refuse two different tensors for a tied head and embedding."""
    head, embedding = state_dict.get(prefix + "out_head.weight"), state_dict.get(prefix + "tok_emb.weight")
    if not weights_tied(module) or head is None or embedding is None or head is embedding:
        return
    if head.shape == embedding.shape and not head.is_meta and not torch.equal(head, embedding.to(head.device)):
        error_msgs.append(f"{prefix}out_head.weight differs from {prefix}tok_emb.weight, but this model's output "
                          "head is tied to its token embedding (fastgpt.tie_weights): load the checkpoint into an "
                          "untied GPTModel")

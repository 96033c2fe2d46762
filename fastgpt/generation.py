"""Text generation: the seed's greedy and sampling loops, run with a KV cache.

``generate_text_simple`` and ``generate`` take the seed's arguments and give
the seed's results, but on a fastgpt ``GPTModel`` they run with a KV cache by
default: one preallocated cache, a prefill of the prompt, then one token per
step, with the output head applied to the last position only.

The seed feeds the model ``idx[:, -context_size:]`` at every step, so once the
sequence outgrows the window the positions restart at 0 for a window that
moved by one token. Cached keys carry their absolute position (GPT-2 adds
position embeddings at the input), so a full cache cannot slide: when it is
full, generation refills it from the cropped window, exactly the forward pass
the seed runs. Greedy output therefore equals the seed's loop token for token.

Other models (the seed's own ``GPTModel``, a compiled module, ...) and
``use_cache=False`` run the seed's loop itself: the whole window every step.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterator
from typing import Optional

import torch

from .kv_cache import KVCache
from .model import GPTModel
from .seed_compat import check_token_ids


def generate_text_simple(model, idx: torch.Tensor, max_new_tokens: int, context_size: int, *,
                         use_cache: bool = True) -> torch.Tensor:
    """The seed's greedy loop: append the most likely next token ``max_new_tokens`` times.

    idx: (batch, seq_len) token ids. Returns (batch, seq_len + max_new_tokens).
    """
    return generate(model, idx, max_new_tokens, context_size, use_cache=use_cache)


def generate(model, idx: torch.Tensor, max_new_tokens: int, context_size: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, *, use_cache: bool = True) -> torch.Tensor:
    """The seed's ``generate``, correct for batches, with nucleus sampling and a seedable generator.

    Each step keeps the ``top_k`` largest logits of each row (the rest become
    -inf); then, if ``temperature`` > 0, samples from softmax(logits /
    temperature) restricted to the smallest set of tokens whose probability
    reaches ``top_p``, drawing from ``generator`` (or torch's global generator,
    as the seed does); with ``temperature`` 0 it takes the argmax.

    ``eos_id``: a row that produces it has finished. As in the seed, the eos
    token is not appended and generation stops once every row has finished;
    until then a finished row is padded with ``eos_id``, so each row reads
    prompt, its own tokens, then eos_id to the end.

    Each step sees ``idx[:, -context_size:]``, as in the seed. On a fastgpt
    ``GPTModel`` it runs with a KV cache (same tokens, far less compute) unless
    ``use_cache=False``; other models run the seed's loop.

    Returns (batch, seq_len + n) with n <= max_new_tokens; ``max_new_tokens``
    0 returns ``idx`` itself, as the seed does.
    """
    idx = _numpy_ids_as_tensor(idx)
    columns = list(generate_stream(model, idx, max_new_tokens, context_size, temperature, top_k, top_p,
                                   eos_id, generator, use_cache=use_cache))
    if not columns:
        return idx
    return torch.cat([idx, *columns], dim=1)


def generate_stream(model, idx: torch.Tensor, max_new_tokens: int, context_size: int, temperature: float = 0.0,
                    top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = None,
                    generator: Optional[torch.Generator] = None, *,
                    use_cache: bool = True) -> Iterator[torch.Tensor]:
    """``generate``, yielding each new column of tokens, shape (batch, 1), as soon as it exists.

    Every argument is checked here, when this is called, before the first token.
    Integers may be numpy's (``np.int64(50)``), and ``idx`` a numpy integer array
    (converted to a torch.long tensor), as the seed's loop takes them.
    """
    sampler = _Sampler(temperature, top_k, top_p, generator)
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not _is_int(context_size) or context_size < 1:
        raise ValueError(f"context_size must be a positive int, got {context_size!r}")
    if eos_id is not None and not _is_int(eos_id):
        raise TypeError(f"eos_id must be an int token id or None, got {eos_id!r}")
    max_new_tokens, context_size = operator.index(max_new_tokens), operator.index(context_size)
    eos_id = None if eos_id is None else operator.index(eos_id)
    idx = _numpy_ids_as_tensor(idx)
    _check_idx(idx)
    if max_new_tokens == 0:
        return iter(())
    if not isinstance(model, GPTModel):
        return _stream(_SeedLoop(model, idx, context_size), max_new_tokens, sampler, eos_id)

    cfg = model.cfg
    vocab_size, context_length = cfg["vocab_size"], cfg["context_length"]
    device = model.tok_emb.weight.device
    longest = min(idx.shape[1] + max_new_tokens - 1, context_size)
    if longest > context_length:
        raise ValueError(f"context_size {context_size} exceeds the model's context_length {context_length} and "
                         f"the sequence would reach {longest} tokens; pass context_size <= {context_length}")
    # The seed's first forward pass sees idx[:, -context_size:]: check exactly that, once
    # (the tokens generated later come from the model's own vocabulary).
    check_token_ids(idx[:, -context_size:], vocab_size, context_length, device)
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab_size})")
    sampler.check_device(device)
    steps = _CachedSteps(model, idx, min(context_size, context_length), max_new_tokens) if use_cache \
        else _SeedLoop(model, idx, context_size)
    return _stream(steps, max_new_tokens, sampler, eos_id)


def _is_int(value) -> bool:
    """An integer, Python's or numpy's (numbers.Integral), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _is_real(value) -> bool:
    """A real number, Python's or numpy's, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _numpy_ids_as_tensor(idx):
    """A numpy integer array of token ids as a torch.long tensor; anything else as it is."""
    if type(idx).__module__ == "numpy" and type(idx).__name__ == "ndarray" and idx.dtype.kind in "iu":
        return torch.from_numpy(idx.astype("int64", copy=False))
    return idx


def _check_idx(idx) -> None:
    """The checks any model needs; a fastgpt model's vocabulary and context are checked after."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a torch.Tensor of token ids, shape (batch, seq_len), got {type(idx).__name__}")
    if idx.dtype not in (torch.long, torch.int32):  # the id types nn.Embedding takes
        other_ints = not (idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool)
        raise TypeError(f"idx must be an integer tensor (torch.long), got dtype {idx.dtype}"
                        + ("; convert it with idx.long()" if other_ints else ""))
    if idx.dim() != 2 or idx.numel() == 0:
        hint = "; add a batch dimension with idx.unsqueeze(0)" if idx.dim() == 1 else ""
        raise ValueError(f"idx must be a non-empty (batch, seq_len) tensor, got shape {tuple(idx.shape)}{hint}")


# ---------------------------------------------------------------- choosing tokens

class _Sampler:
    """Turns one step's logits (batch, vocab) into the next token of each row."""

    def __init__(self, temperature, top_k, top_p, generator):
        if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and (not _is_real(top_p) or not 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.temperature, self.generator = float(temperature), generator
        self.top_k = None if top_k is None else operator.index(top_k)
        self.top_p = None if top_p is None else float(top_p)

    def check_device(self, device: torch.device) -> None:
        if self.generator is not None and self.temperature > 0 and self.generator.device.type != device.type:
            raise ValueError(f"generator is on {self.generator.device} but the model is on {device}; "
                             f"make it with torch.Generator(device={device.type!r})")

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: (batch, vocab). Returns (batch,) token ids and (batch,) row states: 0 for a row
        whose logits give a token, ``_NAN`` for a row with a NaN logit, ``_ALL_NEG_INF`` for a row
        whose logits are all -inf (no token is possible). Nothing here synchronises with the device:
        the caller reads the states where it synchronises anyway."""
        top = logits.amax(dim=-1, keepdim=True)  # NaN if the row has a NaN, -inf if nothing is possible
        states = torch.where(torch.isnan(top), _NAN, torch.where(top == float("-inf"), _ALL_NEG_INF, 0)).squeeze(1)
        if self.temperature == 0.0:
            return logits.argmax(dim=-1), states  # a top-k filter never changes the argmax
        # Unusable rows draw from a harmless uniform distribution (torch.multinomial would raise its
        # own message, or on CUDA assert): the caller raises a clear error before that token is kept.
        logits = logits.float().masked_fill((states != 0)[:, None], 0.0)
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            # Each row's own k-th largest logit is its threshold.
            kth_largest = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth_largest, float("-inf"))
        scaled = logits / self.temperature
        # A row whose largest scaled logit is not finite (a +inf logit, or a temperature so
        # small that the division overflows) has softmax's limit: all the probability on
        # its largest logits, shared equally.
        top = logits.amax(dim=-1, keepdim=True)
        limit = torch.where(logits == top, 0.0, float("-inf"))
        scaled = torch.where(torch.isfinite(scaled.amax(dim=-1, keepdim=True)), scaled, limit)
        probs = torch.softmax(scaled, dim=-1)
        if self.top_p is not None and self.top_p < 1.0:
            probs = _nucleus(probs, self.top_p)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1), states


def _reading_is_free(device: torch.device) -> bool:
    """Whether reading a value from ``device`` costs no synchronisation (a CPU: nothing runs ahead)."""
    return device.type == "cpu"


_NAN, _ALL_NEG_INF = 1, 2  # row states: see _Sampler.__call__


def _unusable_logits_error(states: torch.Tensor, step: Optional[int]) -> RuntimeError:
    """The error for rows whose logits gave no token (states as _Sampler returns them, any non-zero)."""
    row = int(states.nonzero()[0, 0])
    when = f"for new token {step + 1}" if step is not None else "during this call"
    if int(states[row]) == _NAN:
        return RuntimeError(f"generate: the model returned NaN logits {when} (batch row {row}); NaN in the "
                            "weights or the activations (e.g. a float16 overflow) makes every token meaningless. "
                            "Check the model with torch.isnan(p).any() for p in model.parameters()")
    return RuntimeError(f"generate: every logit of batch row {row} is -inf {when}, so no token can be chosen "
                        "(a logits mask that excludes the whole vocabulary?)")


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest most-likely set whose mass reaches top_p (per row)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


# ---------------------------------------------------------------- the two ways to get logits

class _CachedSteps:
    """Next-token logits from a KV cache: prefill once, then one position per token."""

    def __init__(self, model: GPTModel, idx: torch.Tensor, window: int, max_new_tokens: int):
        self.model, self.window = model, window
        self.recent = idx[:, -window:]  # the seed's current window
        # Room for the whole run, never more than the window.
        self.capacity = min(window, self.recent.shape[1] + max_new_tokens - 1)
        self.cache = None

    @torch.inference_mode()
    def first(self) -> torch.Tensor:
        # Made here, where the first token is computed: under the caller's torch.autocast, if any,
        # attention computes (and the cache must hold) autocast's dtype.
        self.cache = KVCache.for_model(self.model, self.recent.shape[0], max_len=self.capacity)
        return self.model._logits(self.recent, self.cache, last_logits_only=True)[:, -1]

    @torch.inference_mode()
    def next(self, column: torch.Tensor) -> torch.Tensor:
        self.recent = torch.cat((self.recent, column), dim=1)[:, -self.window:]
        if self.cache.length < self.cache.max_len:
            return self.model._logits(column, self.cache, last_logits_only=True)[:, -1]
        # Full (only ever when it spans the whole window): the seed's next forward
        # pass is the cropped window at positions 0 .. window-1, so refill from it.
        self.cache.reset()
        return self.model._logits(self.recent, self.cache, last_logits_only=True)[:, -1]


class _SeedLoop:
    """Next-token logits the seed's way: the whole (cropped) sequence through the model every step."""

    def __init__(self, model, idx: torch.Tensor, context_size: int):
        self.model, self.context_size, self.sequence = model, context_size, idx

    @torch.inference_mode()
    def first(self) -> torch.Tensor:
        return self.model(self.sequence[:, -self.context_size:])[:, -1, :]

    @torch.inference_mode()
    def next(self, column: torch.Tensor) -> torch.Tensor:
        self.sequence = torch.cat((self.sequence, column), dim=1)
        return self.model(self.sequence[:, -self.context_size:])[:, -1, :]


def _stream(steps, max_new_tokens: int, sampler: _Sampler, eos_id: Optional[int]) -> Iterator[torch.Tensor]:
    # Inference mode is entered inside each step, never across a yield, so the
    # caller's code between tokens runs in whatever mode it chose.
    #
    # Unusable logits (NaN, or a row all -inf) raise an error. Reading that from the
    # device is a synchronisation, so it is read only where one happens anyway: on a
    # CPU at every token (nothing to wait for), elsewhere with the end-of-sequence
    # check and before the last token, the states of every step accumulated until then.
    logits = steps.first()
    check_each_step = _reading_is_free(logits.device)
    finished, states = None, None
    for step in range(max_new_tokens):
        last = step + 1 == max_new_tokens
        with torch.inference_mode():
            tokens, step_states = sampler(logits)
            states = step_states if states is None else torch.maximum(states, step_states)
            if eos_id is not None:
                finished = tokens == eos_id if finished is None else finished | (tokens == eos_id)
                tokens = tokens.masked_fill(finished, eos_id)
            broken = done = 0
            if finished is not None:  # one synchronisation for both
                broken, done = torch.stack((states.amax(), finished.all().to(states.dtype))).tolist()
            elif check_each_step or last:
                broken = int(states.amax())
        if broken:
            raise _unusable_logits_error(states, step if check_each_step else None)
        if done:
            return  # every row has produced eos: the seed stops without appending it
        column = tokens[:, None].clone()  # a normal tensor, usable outside inference mode
        yield column
        if not last:
            logits = steps.next(column)

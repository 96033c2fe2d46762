"""Generation: prefill latency, time to first token and decode tokens/s, greedy, with a KV cache.

fastgpt (Triton, eager), torch.compile and transformers on the same weights
and prompts. Three measurements per prompt length, one pytest-benchmark group
each:

* **prefill**: one forward pass of the prompt into an empty KV cache, logits
  of the last position only (fastgpt's ``KVCache``, transformers'
  ``DynamicCache``); tokens/s counts prompt tokens.
* **first token** (TTFT): from the prompt's token ids to the first new token,
  through each library's generation entry point: ``fastgpt.generate_stream``
  (its first column) and transformers' ``generate(max_new_tokens=1)``. The
  compiled model has no generation loop of its own (fastgpt's generate runs a
  compiled module without the cache), so torch.compile runs the same steps by
  hand: allocate the cache, compiled prefill, argmax.
* **decode**: ``NEW_TOKENS`` greedy steps of one token per sequence after a
  prefill done untimed; tokens/s counts generated tokens. fastgpt decodes
  through ``generate_stream`` (the library's own loop); torch.compile and
  transformers run one cached forward + argmax per step (transformers' loop
  without ``generate``'s logits processors: the peer at its leanest).
  torch.compile marks the cache length dynamic after its first recompile, so
  decoding runs one graph.

The implementations of one measurement and prompt are timed in interleaved
rounds (interleaved.py), so their ratios come from the same rounds.

benchmarks/test_model_kv_cache.py compares the KV cache with the seed's
no-cache loop; this suite compares implementations.

    pytest benchmarks/test_model_generation.py [--full] --benchmark-json out.json
"""

import pytest
import torch

import fastgpt
import interleaved
from fastgpt import ops
from models import (CPU_ROUNDS, DTYPE_NAME, MODEL_NAME, ON_GPU, SETTINGS, backend_of, cases, check_paths,
                    compile_model, hf_cache, hf_crop, hf_step, random_ids, record, shared_rounds,
                    start_counting)

if ON_GPU and SETTINGS.full:
    PROMPTS = [(b, p) for b in (1, 8) for p in (128, 512, 896)]
    NEW_TOKENS = 128
elif ON_GPU:
    PROMPTS, NEW_TOKENS = [(1, 512)], 128
else:
    PROMPTS, NEW_TOKENS = [(1, 32), (1, 96)], 16
CASES = cases(PROMPTS)
ROUNDS = 10 if ON_GPU else CPU_ROUNDS


def _group(what, batch, prompt):
    return f"{what} · {MODEL_NAME} {DTYPE_NAME} · batch {batch} × prompt {prompt}"


def _compiled(models):
    # dynamic=None: the prefill compiles static, the decode graph turns the cache length dynamic.
    return compile_model(models.fastgpt, dynamic=None)


def _inference(fn, *args):
    with torch.inference_mode():
        return fn(*args)


def _impls(batch, prompt_len):
    return [c.values[2] for c in CASES if c.values[:2] == (batch, prompt_len)]


def _contender(impl, run, setup, check):
    """A contender whose warm-up (compilation, autotuning) also records the paths of one call and checks it."""
    contender = interleaved.Contender({"call": run}, setup=setup)

    def warm_up():
        start_counting()
        result = run(*(setup() if setup else ()))
        contender.info["paths"] = check_paths(impl)
        check(result)

    contender.warm_up = warm_up
    return contender


def _each_impl(batch, prompt_len, make, check):
    """{impl: contender} of one prompt shape; ``make(impl)`` returns the call to time and its untimed setup."""
    return {impl: _contender(impl, *make(impl), check) for impl in _impls(batch, prompt_len)}


def _measured(benchmark, what, batch, prompt_len, impl, build, label=None):
    """Time (once per shape: shared_rounds) the contenders ``build`` makes; report ``impl``'s; its paths."""
    benchmark.group = _group(label or what, batch, prompt_len)
    contenders, measured = shared_rounds((what, batch, prompt_len), build, ROUNDS, benchmark.disabled)
    interleaved.report(benchmark, measured[impl], measured)
    return contenders[impl].info["paths"]


def _prefill_contenders(models, batch, prompt_len):
    prompt = random_ids(models.cfg, batch, prompt_len)

    def check(logits):
        assert logits.shape[0] == batch and logits.shape[-1] == models.cfg["vocab_size"]

    def make(impl):
        if impl == "transformers":
            def setup():
                return (hf_cache(models.hf),)

            def prefill(cache):
                return hf_step(models.hf, prompt, cache, last_only=True)
        else:
            def setup():
                return (fastgpt.KVCache.for_model(models.fastgpt, batch, max_len=prompt_len + NEW_TOKENS),)

            def prefill(cache, model=_compiled(models) if impl == "torch.compile" else models.fastgpt,
                        backend=backend_of(impl)):
                with ops.use_backend(backend):
                    return model(prompt, kv_cache=cache, last_logits_only=True)

        return (lambda cache: _inference(prefill, cache)), setup

    return _each_impl(batch, prompt_len, make, check)


@pytest.mark.parametrize("batch,prompt_len,impl", CASES)
def test_prefill(benchmark, models, batch, prompt_len, impl):
    paths = _measured(benchmark, "prefill", batch, prompt_len, impl,
                      lambda: _prefill_contenders(models, batch, prompt_len))
    record(benchmark, impl, "prefill", batch, prompt_len, tokens=batch * prompt_len, paths=paths)


def _first_token_contenders(models, batch, prompt_len):
    prompt = random_ids(models.cfg, batch, prompt_len)
    context = models.cfg["context_length"]

    def check(token):
        assert token.shape == (batch, 1)

    def make(impl):
        if impl == "transformers":
            def first_token():
                with torch.inference_mode():
                    out = models.hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1,
                                             min_new_tokens=1, do_sample=False, pad_token_id=0)
                return out[:, -1:]
        elif impl == "torch.compile":
            def first_token(compiled=_compiled(models)):
                with torch.inference_mode(), ops.use_backend("eager"):
                    cache = fastgpt.KVCache.for_model(models.fastgpt, batch, max_len=prompt_len + NEW_TOKENS)
                    return compiled(prompt, kv_cache=cache, last_logits_only=True)[:, -1].argmax(-1, keepdim=True)
        else:
            def first_token(backend=backend_of(impl)):
                with ops.use_backend(backend):
                    stream = fastgpt.generate_stream(models.fastgpt, prompt, NEW_TOKENS, context)
                    token = next(stream)
                    stream.close()
                return token

        return first_token, None

    return _each_impl(batch, prompt_len, make, check)


@pytest.mark.parametrize("batch,prompt_len,impl", CASES)
def test_first_token(benchmark, models, batch, prompt_len, impl):
    paths = _measured(benchmark, "first token", batch, prompt_len, impl,
                      lambda: _first_token_contenders(models, batch, prompt_len))
    record(benchmark, impl, "first token", batch, prompt_len, tokens=None, paths=paths, new_tokens=1)


def _decode_contenders(models, batch, prompt_len):
    prompt = random_ids(models.cfg, batch, prompt_len)
    context = models.cfg["context_length"]

    def check(tokens):
        assert tokens.shape == (batch, NEW_TOKENS)

    def make(impl):
        if impl in ("fastgpt-triton", "fastgpt-eager"):
            backend = backend_of(impl)

            def setup(backend=backend):
                # The stream's first next() is the prefill and the first token: done untimed.
                with ops.use_backend(backend):
                    stream = fastgpt.generate_stream(models.fastgpt, prompt, NEW_TOKENS + 1, context)
                    next(stream)
                return (stream,)

            def decode(stream, backend=backend):
                with ops.use_backend(backend):
                    return torch.cat(list(stream), dim=1)
        else:
            if impl == "transformers":
                cache = hf_cache(models.hf)

                def forward(tokens, cache=cache):
                    return hf_step(models.hf, tokens, cache, last_only=True)

                def rewind(cache=cache):
                    hf_crop(cache, prompt_len)
            else:
                compiled = _compiled(models)
                cache = fastgpt.KVCache.for_model(models.fastgpt, batch, max_len=prompt_len + NEW_TOKENS + 1)

                def forward(tokens, compiled=compiled, cache=cache):
                    with ops.use_backend("eager"):
                        return compiled(tokens, kv_cache=cache, last_logits_only=True)

                def rewind(cache=cache):
                    cache.length = prompt_len  # the positions after the prompt are written again

            with torch.inference_mode():
                first = forward(prompt)[:, -1].argmax(-1, keepdim=True)  # the prefill, once

            def setup(rewind=rewind, first=first):
                rewind()
                return (first,)

            def decode(token, forward=forward):
                with torch.inference_mode():
                    tokens = []
                    for _ in range(NEW_TOKENS):
                        token = forward(token)[:, -1].argmax(-1, keepdim=True)
                        tokens.append(token)
                    return torch.cat(tokens, dim=1)

        return decode, setup

    return _each_impl(batch, prompt_len, make, check)


@pytest.mark.parametrize("batch,prompt_len,impl", CASES)
def test_decode(benchmark, models, batch, prompt_len, impl):
    paths = _measured(benchmark, "decode", batch, prompt_len, impl,
                      lambda: _decode_contenders(models, batch, prompt_len), label=f"decode {NEW_TOKENS} tokens")
    record(benchmark, impl, "decode", batch, prompt_len, tokens=batch * NEW_TOKENS, paths=paths,
           new_tokens=NEW_TOKENS)

"""Generation: the KV cache gives the seed's loop token for token; sampling, top-k/top-p and eos per row."""

import math
import re

import pytest
import torch
import torch.nn as nn

import fastgpt
from fastgpt import GPTModel, KVCache, generate, generate_stream, generate_text_simple, ops
from helpers import TINY, rel_err
from reference_model import RefGPTModel

V, CTX = TINY["vocab_size"], TINY["context_length"]


pytestmark = pytest.mark.usefixtures("single_thread")


def seed_generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    """The seed's chapter-5 loop, for one sequence (its top-k threshold broadcasts correctly only for batch 1)."""
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1, :]
        if top_k is not None:
            min_val = torch.topk(logits, top_k).values[:, -1]
            logits = torch.where(logits < min_val, torch.tensor(float("-inf")), logits)
        if temperature > 0.0:
            idx_next = torch.multinomial(torch.softmax(logits / temperature, dim=-1), num_samples=1)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        if idx_next == eos_id:
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def tiny_pair(seed=0, **overrides):
    """fastgpt's model and the seed's, holding the same weights, in float64 so that the two
    implementations' rounding cannot flip an argmax (greedy equality is then exact, not lucky)."""
    cfg = {**TINY, **overrides}
    torch.manual_seed(seed)
    ours = GPTModel(cfg).double().eval()
    ref = RefGPTModel(cfg).double().eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


# ---------------------------------------------------------------- greedy equality

@pytest.mark.parametrize("prompt_len,new_tokens,context_size", [
    (1, 12, CTX),         # shortest prompt
    (7, 12, CTX),
    (CTX - 1, 6, CTX),    # the cache fills after one token, then refills from the cropped window
    (5, 60, CTX),         # overflow: 64 tokens through a 40-token context
    (CTX + 10, 8, CTX),   # a prompt longer than the context is cropped first
    (9, 30, 16),          # a window smaller than the model's context
])
def test_greedy_with_the_cache_equals_the_seeds_loop_token_for_token(prompt_len, new_tokens, context_size):
    ours, ref = tiny_pair(seed=prompt_len)
    idx = torch.randint(0, V, (3, prompt_len), generator=torch.Generator().manual_seed(1))
    cached = generate_text_simple(ours, idx, new_tokens, context_size)
    assert cached.shape == (3, prompt_len + new_tokens)
    assert torch.equal(cached[:, :prompt_len], idx)
    assert torch.equal(cached, generate_text_simple(ours, idx, new_tokens, context_size, use_cache=False))
    for row in range(3):
        assert torch.equal(cached[row:row + 1], seed_generate(ref, idx[row:row + 1], new_tokens, context_size))
    # A model that is not fastgpt's runs the seed's loop, with the same result.
    assert torch.equal(generate(ref, idx, new_tokens, context_size), cached)


def test_the_cache_feeds_one_position_per_token_and_refills_when_full():
    model = GPTModel(TINY).eval()
    seen_inputs, head_inputs = [], []
    model.tok_emb.register_forward_pre_hook(lambda _, args: seen_inputs.append(tuple(args[0].shape)))
    model.out_head.register_forward_pre_hook(lambda _, args: head_inputs.append(tuple(args[0].shape)))
    ops.reset_dispatch_counts()
    prompt, new = 5, 60
    generate_text_simple(model, torch.randint(0, V, (2, prompt)), new, CTX)
    decodes = CTX - prompt  # single tokens until the cache holds the whole window
    refills = new - 1 - decodes  # then every step re-runs the cropped window, as the seed does
    assert seen_inputs == [(2, prompt)] + [(2, 1)] * decodes + [(2, CTX)] * refills
    assert head_inputs == [(2, 1, TINY["emb_dim"])] * new  # logits for the last position only
    # A fresh prefill (the prompt, each re-run window) is plain causal attention.
    assert ops.dispatch_counts[("cached_attention", "eager")] == TINY["n_layers"] * decodes
    assert ops.dispatch_counts[("causal_attention", "eager")] == TINY["n_layers"] * (1 + refills)


def test_cache_allocation_is_no_larger_than_the_run_needs():
    model = GPTModel(TINY).eval()
    made = []
    original = KVCache.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self.max_len)

    KVCache.__init__ = record
    try:
        generate_text_simple(model, torch.zeros(1, 4, dtype=torch.long), 5, CTX)
        generate_text_simple(model, torch.zeros(1, 4, dtype=torch.long), 100, CTX)
    finally:
        KVCache.__init__ = original
    assert made == [4 + 5 - 1, CTX]


# ---------------------------------------------------------------- the model's cached forward

def test_chunked_prefill_through_the_cache_gives_the_full_forwards_logits():
    torch.manual_seed(3)
    model = GPTModel({**TINY, "qkv_bias": True}).eval()
    idx = torch.randint(0, V, (2, 14))
    cache = KVCache.for_model(model, batch_size=2)
    with torch.no_grad():
        full = model(idx)
        pieces, start = [], 0
        for size in (3, 1, 4, 1, 5):  # several new tokens attend over a longer history
            pieces.append(model(idx[:, start:start + size], kv_cache=cache))
            start += size
            assert cache.length == start
    assert rel_err(torch.cat(pieces, dim=1), full) <= 1e-5


def test_forward_keywords_default_to_the_seeds_forward():
    model = GPTModel(TINY).eval()
    idx = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        full = model(idx)
        last = model(idx, last_logits_only=True)
    assert full.shape == (2, 9, V) and last.shape == (2, 1, V)
    assert rel_err(last, full[:, -1:]) <= 1e-6


def test_a_cache_that_does_not_fit_is_refused_and_left_unchanged():
    model = GPTModel(TINY).eval()
    cache = KVCache.for_model(model, batch_size=1, max_len=6)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match=r"3 new tokens do not fit the KV cache: it holds 4 of 6 positions"):
            model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="made for batch size 1, got a batch of 2"):
            model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="token id 97 is outside the vocabulary"):
            model(torch.tensor([[97]]), kv_cache=cache)
        other = KVCache(3, 1, 4, 16, 6)
        with pytest.raises(ValueError, match="holds 3 layers × 4 heads × head_dim 16 but the model has 2 × 4 × 16"):
            model(torch.zeros(1, 1, dtype=torch.long), kv_cache=other)
    assert cache.length == 4
    with pytest.raises(ValueError, match=r"max_len must be an int in \[1, 40\]"):
        KVCache.for_model(model, batch_size=1, max_len=41)


@pytest.mark.parametrize("q_len,kv_len", [(1, 9), (4, 9), (9, 9)])
def test_cached_attention_aligns_the_causal_mask_bottom_right(q_len, kv_len):
    torch.manual_seed(q_len)
    q, k, v = torch.randn(2, 3, q_len, 8), torch.randn(2, 3, kv_len, 8), torch.randn(2, 3, kv_len, 8)
    ops.reset_dispatch_counts()
    out = ops.cached_attention(q, k, v)
    # Equal lengths (a fresh prefill) are causal attention, and counted as such.
    assert ops.dispatch_counts[("causal_attention" if q_len == kv_len else "cached_attention", "eager")] == 1
    # Query i is position kv_len - q_len + i: it sees keys 0 .. kv_len - q_len + i.
    positions = torch.arange(kv_len - q_len, kv_len)[:, None]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(torch.arange(kv_len)[None, :] > positions, float("-inf"))
    assert rel_err(out, torch.softmax(scores, dim=-1) @ v) <= 1e-6
    with pytest.raises(ValueError, match="10 queries but only 9 keys"):
        ops.cached_attention(torch.randn(1, 1, 10, 8), k[:1, :1], v[:1, :1])


# ---------------------------------------------------------------- sampling

class ScriptedModel(nn.Module):
    """Not a fastgpt model (so generation runs the seed's loop): fixed logits per row, or a
    script of tokens per row, one per step, with a margin no sampling setting can overturn."""

    def __init__(self, logits=None, scripts=None, prompt_len=1):
        super().__init__()
        self.logits, self.scripts, self.prompt_len = logits, scripts, prompt_len

    def forward(self, idx):
        if self.logits is not None:
            return self.logits[:, None, :].expand(idx.shape[0], idx.shape[1], -1)
        step = idx.shape[1] - self.prompt_len
        out = torch.zeros(idx.shape[0], idx.shape[1], 20)
        for row, script in enumerate(self.scripts):
            out[row, -1, script[min(step, len(script) - 1)]] = 100.0
        return out


def test_top_k_keeps_each_rows_own_k_largest():
    ramp = torch.arange(10, dtype=torch.float32)
    model = ScriptedModel(logits=torch.stack([ramp, -ramp]))  # row 0 favours 9, 8; row 1 favours 0, 1
    out = generate(model, torch.zeros(2, 1, dtype=torch.long), 300, 1000, temperature=5.0, top_k=2,
                   generator=torch.Generator().manual_seed(0))
    assert set(out[0, 1:].tolist()) == {8, 9}
    assert set(out[1, 1:].tolist()) == {0, 1}


@pytest.mark.parametrize("top_p,support", [(0.45, {0}), (0.7, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_samples_from_the_smallest_set_reaching_p(top_p, support):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    model = ScriptedModel(logits=probs.log())
    out = generate(model, torch.zeros(1, 1, dtype=torch.long), 400, 1000, temperature=1.0, top_p=top_p,
                   generator=torch.Generator().manual_seed(0))
    assert set(out[0, 1:].tolist()) == support


def test_sampling_is_reproducible_and_the_cache_does_not_change_it():
    ours, ref = tiny_pair(seed=5)
    idx = torch.randint(0, V, (1, 6))

    def run(seed, **kwargs):
        return generate(ours, idx, 25, CTX, temperature=1.3, top_k=20, top_p=0.95,
                        generator=torch.Generator().manual_seed(seed), **kwargs)

    first = run(11)
    assert torch.equal(first, run(11))
    assert torch.equal(first, run(11, use_cache=False))
    assert not all(torch.equal(first, run(seed)) for seed in (12, 13, 14))
    # Without a generator the global one is used, as the seed does: same seed, same draws.
    torch.manual_seed(7)
    ours_tokens = generate(ours, idx, 20, CTX, temperature=1.0, top_k=30)
    torch.manual_seed(7)
    assert torch.equal(ours_tokens, seed_generate(ref, idx, 20, CTX, temperature=1.0, top_k=30))


# ---------------------------------------------------------------- eos

EOS = 3


def test_rows_stop_at_eos_one_by_one_and_are_padded_with_it():
    model = ScriptedModel(scripts=[[5, 6, EOS, 7], [8, 9, 10, 11, EOS, 12]])
    out = generate(model, torch.zeros(2, 1, dtype=torch.long), 10, 100, eos_id=EOS)
    # The column in which the last row produces eos is not appended, as the seed's batch-1 loop does.
    assert out.tolist() == [[0, 5, 6, EOS, EOS], [0, 8, 9, 10, 11]]
    single = generate(ScriptedModel(scripts=[[5, 6, EOS, 7]]), torch.zeros(1, 1, dtype=torch.long), 10, 100,
                      eos_id=EOS)
    assert single.tolist() == [[0, 5, 6]]
    never = generate(model, torch.zeros(2, 1, dtype=torch.long), 3, 100, eos_id=19)
    assert never.shape == (2, 4)


def test_a_batch_with_eos_equals_each_row_run_alone_then_padded():
    ours, ref = tiny_pair(seed=8)
    idx = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(2))
    free_run = generate(ours, idx, 15, CTX)
    eos_id = int(free_run[0, 5 + 2])  # row 0 meets it by its third new token
    batch = generate(ours, idx, 15, CTX, eos_id=eos_id)
    alone = [generate(ours, idx[row:row + 1], 15, CTX, eos_id=eos_id) for row in range(3)]
    assert alone[0].shape[1] <= 5 + 2  # row 0 stops early
    assert batch.shape[1] == max(a.shape[1] for a in alone)
    for row, a in enumerate(alone):
        assert torch.equal(a[0], seed_generate(ref, idx[row:row + 1], 15, CTX, eos_id=eos_id)[0])
        padded = torch.full((batch.shape[1],), eos_id)
        padded[:a.shape[1]] = a[0]
        assert torch.equal(batch[row], padded)


# ---------------------------------------------------------------- the API around the loop

def test_stream_yields_columns_as_they_come_and_results_are_ordinary_tensors():
    model = GPTModel(TINY).eval()
    idx = torch.randint(0, V, (2, 4))
    stream = generate_stream(model, idx, 5, CTX)
    first = next(stream)
    assert first.shape == (2, 1) and not torch.is_inference_mode_enabled()
    rest = list(stream)
    assert len(rest) == 4
    out = generate(model, idx, 5, CTX)
    assert torch.equal(out, torch.cat([idx, first, *rest], dim=1))
    assert not out.is_inference() and not first.is_inference()
    assert generate(model, idx, 0, CTX) is idx  # as the seed's loop returns its input


BAD_ARGUMENTS = [
    ("negative max_new_tokens", dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an int >= 0, got -1"),
    ("float max_new_tokens", dict(max_new_tokens=2.0), ValueError, "max_new_tokens must be an int >= 0"),
    ("zero context_size", dict(context_size=0), ValueError, "context_size must be a positive int, got 0"),
    ("negative temperature", dict(temperature=-0.5), ValueError, "temperature must be a finite number >= 0"),
    ("nan temperature", dict(temperature=float("nan")), ValueError, "temperature must be a finite number >= 0"),
    ("top_k 0", dict(top_k=0), ValueError, "top_k must be a positive int or None, got 0"),
    ("top_p 0", dict(top_p=0.0), ValueError, "top_p must be a number in (0, 1] or None, got 0.0"),
    ("top_p above 1", dict(top_p=1.5), ValueError, "top_p must be a number in (0, 1]"),
    ("eos outside the vocabulary", dict(eos_id=V), ValueError, f"eos_id {V} is outside the vocabulary"),
    ("eos not an int", dict(eos_id="3"), TypeError, "eos_id must be an int token id or None"),
    ("generator of another type", dict(generator=123), TypeError, "generator must be a torch.Generator"),
    ("1-D idx", dict(idx=torch.zeros(4, dtype=torch.long)), ValueError, "add a batch dimension"),
    ("float idx", dict(idx=torch.zeros(1, 4)), TypeError, "idx must be an integer tensor (torch.long)"),
    ("list idx", dict(idx=[[1, 2]]), TypeError, "idx must be a torch.Tensor of token ids"),
    ("empty idx", dict(idx=torch.zeros(1, 0, dtype=torch.long)), ValueError,
     "idx must be a non-empty (batch, seq_len) tensor, got shape (1, 0)"),
    ("id outside the vocabulary", dict(idx=torch.tensor([[1, V]])), ValueError, f"token id {V} is outside"),
    ("window larger than the model's context", dict(context_size=CTX + 5, max_new_tokens=CTX),
     ValueError, f"context_size {CTX + 5} exceeds the model's context_length {CTX}"),
]


@pytest.mark.parametrize("description,change,error,fragment", BAD_ARGUMENTS, ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_arguments_fail_before_any_token(description, change, error, fragment):
    model = GPTModel(TINY).eval()
    args = {"idx": torch.zeros(1, 4, dtype=torch.long), "max_new_tokens": 3, "context_size": CTX, **change}
    with pytest.raises(error, match=re.escape(fragment)):
        generate_stream(model, **args)  # raised at the call, not at the first token


def test_a_window_larger_than_the_context_is_fine_while_the_sequence_fits():
    model = GPTModel(TINY).eval()
    out = generate(model, torch.zeros(1, 4, dtype=torch.long), 6, 1024)  # the seed's usual context_size=1024
    assert out.shape == (1, 10)
    assert fastgpt.generate is generate


# ---------------------------------------------------------------- fast paths compute the same

@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_few_row_linear_spreads_the_inner_dimension_and_equals_linear(two_threads, rows, with_bias):
    from fastgpt.few_row_matmul import MAX_ROWS, few_row_linear, split_count
    torch.manual_seed(rows)
    weight = torch.randn(300, 64).t().contiguous().t()  # input-major, as from_pretrained lays it out
    bias = torch.randn(300) if with_bias else None
    x = torch.randn(rows, 1, 64)
    with torch.no_grad():
        assert split_count(x, weight) == 2
        assert rel_err(few_row_linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias)) <= 1e-6
        # Where it would not pay, or could not be right, it is F.linear itself.
        assert split_count(x, weight.contiguous()) == 1  # (out, in) rows: no free slicing
        assert split_count(torch.randn(MAX_ROWS + 1, 64), weight) == 1
    assert split_count(x, weight) == 1  # autograd on


class LoRALinear(nn.Module):
    """The seed's LinearWithLoRA, in short: a wrapped linear layer plus a low-rank update."""

    def __init__(self, linear, rank=2):
        super().__init__()
        self.linear = linear
        self.A = nn.Parameter(torch.randn(linear.in_features, rank))
        self.B = nn.Parameter(torch.randn(rank, linear.out_features))

    def forward(self, x):
        return self.linear(x) + x @ self.A @ self.B


def test_wrapped_linear_layers_are_called_not_bypassed(tmp_path, two_threads):
    torch.manual_seed(0)
    GPTModel({**TINY, "qkv_bias": True}).save_pretrained(tmp_path)
    model = fastgpt.from_pretrained(tmp_path)
    idx = torch.randint(0, V, (1, 6))
    with torch.no_grad():
        before = model(idx)
        att = model.trf_blocks[0].att
        att.W_key, att.out_proj, model.out_head = LoRALinear(att.W_key), LoRALinear(att.out_proj), \
            LoRALinear(model.out_head)
        after = model(idx)
    with torch.enable_grad():
        reference = model(idx)  # autograd on: every module runs as a module
    assert rel_err(after, before) > 1e-3
    assert rel_err(after, reference) <= 1e-5


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_runs_under_autocast_with_the_cache_in_autocasts_dtype(use_cache, monkeypatch):
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    idx = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    made = []
    real_for_model = KVCache.for_model.__func__
    monkeypatch.setattr(KVCache, "for_model", classmethod(lambda cls, *a, **k: made.append(
        real_for_model(cls, *a, **k)) or made[-1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, idx, 8, CTX, use_cache=use_cache)
        sampled = generate(model, idx, 8, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, generate(model, idx, 8, CTX, use_cache=not use_cache))
    assert out.shape == (2, 13) and sampled.shape == (2, 13)
    assert made and {cache.keys.dtype for cache in made} == {torch.bfloat16}
    assert KVCache.for_model(model, 1).keys.dtype == torch.float32  # outside autocast, the model's own


def test_numpy_integers_work_where_python_ints_do():
    """The seed's loop takes numpy integers for its counts (range(), slicing, topk); fastgpt's too,
    and a numpy array of ids is converted to a torch.long tensor."""
    np = pytest.importorskip("numpy")
    ours, ref = tiny_pair(seed=4)
    idx = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = seed_generate(ref, idx, np.int64(5), np.int32(CTX))
    assert torch.equal(generate_text_simple(ours, idx.numpy(), np.int64(5), np.int32(CTX)), expected)
    assert torch.equal(generate(ours, idx.numpy().astype(np.int32), np.int16(5), np.uint16(CTX)), expected)
    sampled = generate(ours, idx, 4, CTX, temperature=np.float32(0.8), top_k=np.int64(5), top_p=np.float64(0.9),
                       eos_id=np.int64(V - 1), generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, generate(ours, idx, 4, CTX, temperature=0.8, top_k=5, top_p=0.9, eos_id=V - 1,
                                         generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got np.True_"):
        generate(ours, idx, np.bool_(True), CTX)
    with pytest.raises(TypeError, match="idx must be a torch.Tensor of token ids"):
        generate(ours, idx.numpy().astype(np.float32), 2, CTX)

"""NaN flows as in the seed: PyTorch's CPU flash attention drops NaN (pytorch/pytorch#141128), fastgpt's
eager attention does not; generation refuses logits that cannot give a token."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fastgpt import GPTModel, KVCache, generate, generate_stream, ops
from helpers import TINY
from reference_model import RefGPTModel

V, CTX = TINY["vocab_size"], TINY["context_length"]
pytestmark = pytest.mark.usefixtures("single_thread")


def seed_attention(q, k, v):
    """The seed's attention maths for queries that are the last q_len of the kv_len positions."""
    q_len, kv_len = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-2, -1)
    hidden = torch.ones(q_len, kv_len, dtype=torch.bool).triu(kv_len - q_len + 1)
    return torch.softmax(scores.masked_fill(hidden, -torch.inf) / k.shape[-1] ** 0.5, dim=-1) @ v


def test_cpu_flash_attention_drops_nan_which_is_why_fastgpt_checks():
    """The upstream behaviour this guards against: if it is ever fixed, the check can go."""
    q, k, v = (torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    q[0, 1, 3, 2] = float("nan")
    assert not torch.isnan(F.scaled_dot_product_attention(q, k, v, is_causal=True)).any()


@pytest.mark.parametrize("which, position", list(itertools.product("qkv", (0, 3, 5))))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_causal_attention_puts_nan_where_the_seeds_attention_does(which, position, value):
    q, k, v = (torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    dict(q=q, k=k, v=v)[which][1, 2, position, 4] = value
    with ops.use_backend("eager"):
        out = ops.causal_attention(q, k, v)
    expected = seed_attention(q, k, v)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    torch.testing.assert_close(out, expected, equal_nan=True)


@pytest.mark.parametrize("q_len, kv_len", [(1, 1 + 1), (1, 9), (3, 9)])
@pytest.mark.parametrize("which", "qkv")
def test_cached_attention_puts_nan_where_the_seeds_attention_does(q_len, kv_len, which):
    q = torch.randn(1, 2, q_len, 8, generator=torch.Generator().manual_seed(0))
    k, v = (torch.randn(1, 2, kv_len, 8, generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    for position in range(kv_len if which != "q" else q_len):
        qq, kk, vv = q.clone(), k.clone(), v.clone()
        dict(q=qq, k=kk, v=vv)[which][0, 1, position, 4] = float("nan")
        with ops.use_backend("eager"):
            out = ops.cached_attention(qq, kk, vv)
        assert torch.equal(torch.isnan(out), torch.isnan(seed_attention(qq, kk, vv))), (which, position)


def nan_pair(parameter: str):
    """fastgpt's model and the seed's with the same weights, one NaN in ``parameter`` (its first element)."""
    torch.manual_seed(0)
    ours = GPTModel(TINY).eval()
    ref = RefGPTModel(TINY).eval()
    ref.load_state_dict(ours.state_dict())
    for model in (ours, ref):
        with torch.no_grad():
            model.get_parameter(parameter).view(-1)[0] = float("nan")
    return ours, ref


@pytest.mark.parametrize("parameter", ["trf_blocks.0.att.W_query.weight", "trf_blocks.1.att.W_key.weight",
                                       "trf_blocks.0.att.W_value.weight", "trf_blocks.1.norm1.scale"])
def test_a_nan_weight_gives_the_seeds_nan_logits_on_the_eager_cpu_path(parameter):
    ours, ref = nan_pair(parameter)
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), ops.use_backend("eager"):
        expected = torch.isnan(ref(ids))
        assert expected.any()
        assert torch.equal(torch.isnan(ours(ids)), expected)
        cache = KVCache.for_model(ours, 2)  # prefill then one token at a time: the same NaN
        last = [ours(ids[:, :4], kv_cache=cache)[:, -1]] + [ours(ids[:, t:t + 1], kv_cache=cache)[:, -1]
                                                            for t in range(4, 7)]
        assert torch.equal(torch.isnan(torch.stack(last, 1)), expected[:, 3:])


def nan_model():
    return nan_pair("trf_blocks.0.att.W_query.weight")[0]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, None, None), (1.0, None, None), (0.7, 5, 0.9)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generating_from_nan_logits_is_a_clear_error(temperature, top_k, top_p, use_cache):
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"the model returned NaN logits for new token 1 \(batch row 0\)"):
        generate(nan_model(), ids, 3, CTX, temperature=temperature, top_k=top_k, top_p=top_p,
                 generator=torch.Generator(), use_cache=use_cache)


def all_masked_model():
    """Every logit of every row is -inf: the final norm outputs ones, the output head's weights are all -inf."""
    torch.manual_seed(0)
    m = GPTModel(TINY).eval()
    with torch.no_grad():
        m.final_norm.scale.zero_()
        m.final_norm.shift.fill_(1.0)
        m.out_head.weight.fill_(-float("inf"))
    return m


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_whose_logits_are_all_minus_inf_is_an_error_not_a_uniform_draw(temperature):
    assert torch.isneginf(all_masked_model()(torch.ones(1, 2, dtype=torch.long))).all()
    with pytest.raises(RuntimeError, match="every logit of batch row 0 is -inf for new token 1"):
        generate(all_masked_model(), torch.ones(1, 2, dtype=torch.long), 2, CTX, temperature=temperature)


def test_nan_in_one_row_of_a_batch_names_that_row_and_its_step():
    """A NaN that appears only at the third new token (a stand-in model), in batch row 1."""
    calls = []

    def model(idx):
        calls.append(idx.shape[1])
        logits = torch.zeros(idx.shape[0], idx.shape[1], V)
        logits[:, :, 5] = 1.0
        if len(calls) == 3:
            logits[1, -1, 7] = float("nan")
        return logits

    with pytest.raises(RuntimeError, match=r"for new token 3 \(batch row 1\)"):
        generate(model, torch.ones(2, 2, dtype=torch.long), 5, CTX)


@pytest.mark.parametrize("eos", [None, 9])
def test_off_the_cpu_the_check_waits_for_a_synchronisation(monkeypatch, eos):
    """Off the CPU the states are read only with the end-of-sequence check (which synchronises
    anyway) or before the last token: simulated by declaring reads from the CPU costly."""
    import fastgpt.generation as generation

    monkeypatch.setattr(generation, "_reading_is_free", lambda device: False)
    reads = []
    original_tolist, original_int = torch.Tensor.tolist, torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append("tolist") or original_tolist(self))
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: reads.append("int") or original_int(self))

    def model(idx):
        logits = torch.zeros(idx.shape[0], idx.shape[1], V)
        logits[..., 5] = 1.0
        logits[..., 6] = float("nan") if idx.shape[1] == 3 else 0.0  # the second step's logits
        return logits

    tokens = []
    with pytest.raises(RuntimeError, match="NaN logits during this call" if eos is None else "NaN logits"):
        for column in generate_stream(model, torch.ones(1, 2, dtype=torch.long), 4, CTX, eos_id=eos):
            tokens.append(original_int(column))
    if eos is None:
        assert tokens == [5, 6, 5]  # argmax took the NaN: nothing synchronised before the last token
        assert reads[0] == "int"  # the final check (then the error message's own reads)
    else:
        assert tokens == [5]  # the end-of-sequence check of the second token found it
        assert reads[:2] == ["tolist", "tolist"]

"""Numerical parity: fastgpt against the seed-style reference and against transformers' GPT-2."""

import pytest
import torch
import torch.nn.functional as F

from fastgpt import GPTModel, ops
from fastgpt.checkpoints.hf_config import config_from_hf_gpt2
from fastgpt.checkpoints.layouts import state_dict_from_hf_gpt2
from helpers import TINY, rel_err
from reference_model import RefGPTModel


def _pair(cfg, seed=0):
    """fastgpt in float32 and the reference in float64, with the same weights."""
    torch.manual_seed(seed)
    ours = GPTModel(cfg)
    ref = RefGPTModel(cfg)
    ref.load_state_dict(ours.state_dict())
    return ours, ref.double()


@pytest.mark.parametrize("seq_len", [1, 17, TINY["context_length"]])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_eval_logits_match_the_reference(seq_len, qkv_bias):
    ours, ref = _pair({**TINY, "qkv_bias": qkv_bias})
    ours.eval(), ref.eval()
    idx = torch.randint(0, TINY["vocab_size"], (3, seq_len))
    with torch.no_grad():
        assert rel_err(ours(idx), ref(idx)) <= 1e-5


@pytest.mark.parametrize("seq_len", [1, 23])
def test_train_mode_logits_and_every_gradient_match_the_reference(seq_len):
    # drop_rate 0: train mode exercises the training code path deterministically.
    ours, ref = _pair({**TINY, "qkv_bias": True}, seed=3)
    ours.train(), ref.train()
    idx = torch.randint(0, TINY["vocab_size"], (2, seq_len))
    targets = torch.randint(0, TINY["vocab_size"], (2, seq_len))
    logits, ref_logits = ours(idx), ref(idx)
    assert rel_err(logits, ref_logits) <= 1e-5
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten()).backward()
    ref_params = dict(ref.named_parameters())
    total_norm = torch.cat([p.grad.flatten() for p in ref_params.values()]).norm()
    checked = 0
    assert [name for name, _ in ours.named_parameters()] == list(ref_params)
    for name, param in ours.named_parameters():
        grad = param.grad
        assert grad is not None, name
        ref_grad = ref_params[name].grad
        if ref_grad.norm() > 1e-8 * total_norm:
            assert rel_err(grad, ref_grad) <= 1e-4, name
        else:
            # The key bias's gradient is exactly zero in exact arithmetic (adding
            # q·b to every score of a row leaves its softmax unchanged): measure
            # its rounding noise against the whole gradient instead.
            assert (grad.double() - ref_grad).norm() <= 1e-6 * total_norm, name
        checked += 1
    assert checked == len(ref_params)


def test_float64_maths_is_the_seeds_to_rounding():
    # In float64 any formula difference (eps placement, variance bias, GELU
    # constant, attention scale) would stand far above rounding noise.
    ours, ref = _pair({**TINY, "qkv_bias": True}, seed=5)
    ours.double().eval(), ref.eval()
    idx = torch.randint(0, TINY["vocab_size"], (2, 31))
    with torch.no_grad():
        assert rel_err(ours(idx), ref(idx)) <= 1e-12


def test_dropout_is_active_in_training_on_every_site(monkeypatch):
    cfg = {**TINY, "drop_rate": 0.25}
    model = GPTModel(cfg)
    seen_p = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        seen_p.append(kwargs["dropout_p"])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(ops.F, "scaled_dot_product_attention", recording_sdpa)
    idx = torch.randint(0, cfg["vocab_size"], (2, 12))
    model.train()
    torch.manual_seed(7)
    a = model(idx)
    torch.manual_seed(7)
    b = model(idx)
    torch.manual_seed(8)
    c = model(idx)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert seen_p == [0.25] * (3 * cfg["n_layers"])
    model.eval()
    seen_p.clear()
    with torch.no_grad():
        assert torch.equal(model(idx), model(idx))
    assert seen_p == [0.0] * (2 * cfg["n_layers"])


def _hf_model(seed=0, **overrides):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=TINY["vocab_size"], n_positions=TINY["context_length"], n_embd=TINY["emb_dim"],
        n_layer=TINY["n_layers"], n_head=TINY["n_heads"],
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def test_transformers_gpt2_weights_give_the_same_logits():
    hf = _hf_model()
    cfg = config_from_hf_gpt2(hf.config)
    assert cfg == {**TINY, "qkv_bias": True}
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(state_dict_from_hf_gpt2(hf.state_dict(), cfg["n_layers"]), strict=True)
    idx = torch.randint(0, cfg["vocab_size"], (2, cfg["context_length"]))
    with torch.no_grad():
        assert rel_err(ours(idx), hf(idx).logits) <= 1e-5
        # In float64 the two implementations agree to rounding.
        assert rel_err(ours.double()(idx), hf.double()(idx).logits) <= 1e-12


def test_transformers_variants_fastgpt_does_not_compute_are_refused():
    with pytest.raises(ValueError, match="activation_function='relu'"):
        config_from_hf_gpt2(_hf_model(activation_function="relu").config)
    with pytest.raises(ValueError, match="layer_norm_epsilon"):
        config_from_hf_gpt2(_hf_model(layer_norm_epsilon=1e-6).config)


def test_a_truncated_transformers_state_dict_names_the_missing_tensor():
    sd = dict(_hf_model().state_dict())
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(KeyError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias"):
        state_dict_from_hf_gpt2(sd, TINY["n_layers"])

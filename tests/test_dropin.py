"""The drop-in contract: same config, state-dict layout, seeded weights and sizes as the seed's model."""

import io

import pytest
import torch

import fastgpt
from fastgpt import GPT_CONFIG_124M, DummyGPTModel, GPTModel, gpt2_config
from helpers import TINY
from reference_model import RefGPTModel


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_state_dict_keys_shapes_and_order_match_the_seed(qkv_bias):
    cfg = {**TINY, "qkv_bias": qkv_bias}
    ours, ref = GPTModel(cfg).state_dict(), RefGPTModel(cfg).state_dict()
    assert list(ours) == list(ref)
    for key in ref:
        assert ours[key].shape == ref[key].shape, key
        assert ours[key].dtype == ref[key].dtype, key
    assert ("trf_blocks.0.att.W_query.bias" in ours) == qkv_bias


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_seeded_construction_draws_the_seeds_weights(qkv_bias):
    cfg = {**TINY, "qkv_bias": qkv_bias}
    torch.manual_seed(123)
    ref = RefGPTModel(cfg)
    ref_next_draw = torch.rand(4)
    torch.manual_seed(123)
    ours = GPTModel(cfg)
    ours_next_draw = torch.rand(4)
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    for key in ref_sd:
        assert torch.equal(ours_sd[key], ref_sd[key]), key
    # parameters() too: the same tensors, names and order (optimizer state is matched by position).
    ours_params, ref_params = list(ours.named_parameters()), list(ref.named_parameters())
    assert [name for name, _ in ours_params] == [name for name, _ in ref_params]
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(ours_params, ref_params))
    # The generator is left in the same state, so code after construction
    # (dropout masks, sampled ids) sees the same random numbers too.
    assert torch.equal(ours_next_draw, ref_next_draw)


def test_seed_checkpoint_loads_strictly_and_computes_the_same_logits():
    torch.manual_seed(0)
    ref = RefGPTModel(TINY).eval()
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)  # a checkpoint file as the seed's code writes it
    buffer.seek(0)
    ours = GPTModel(TINY).eval()
    result = ours.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    idx = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx), rtol=1e-5, atol=1e-5)


def test_our_state_dict_loads_strictly_into_the_seeds_model():
    torch.manual_seed(1)
    ours = GPTModel({**TINY, "qkv_bias": True}).eval()
    ref = RefGPTModel({**TINY, "qkv_bias": True}).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(ref.trf_blocks[1].att.mask, ours.trf_blocks[1].att.mask)
    idx = torch.randint(0, TINY["vocab_size"], (1, TINY["context_length"]))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx), rtol=1e-5, atol=1e-5)


def test_mask_follows_the_models_dtype_and_is_not_stored():
    model = GPTModel(TINY).to(torch.bfloat16)
    assert model.state_dict()["trf_blocks.0.att.mask"].dtype == torch.bfloat16
    assert not any(name.endswith("mask") for name, _ in model.named_buffers())


def test_a_wrong_mask_in_a_checkpoint_is_rejected_with_its_key():
    sd = RefGPTModel(TINY).state_dict()
    bad_values = dict(sd, **{"trf_blocks.1.att.mask": torch.zeros_like(sd["trf_blocks.1.att.mask"])})
    with pytest.raises(RuntimeError, match=r"trf_blocks\.1\.att\.mask is not the causal mask"):
        GPTModel(TINY).load_state_dict(bad_values)
    other_context = RefGPTModel({**TINY, "context_length": 16}).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for trf_blocks\.0\.att\.mask"):
        GPTModel(TINY).load_state_dict(other_context)


def test_a_missing_parameter_still_fails_strict_loading():
    sd = RefGPTModel(TINY).state_dict()
    del sd["trf_blocks.0.norm2.shift"]
    with pytest.raises(RuntimeError, match=r"trf_blocks\.0\.norm2\.shift"):
        GPTModel(TINY).load_state_dict(sd, strict=True)


def test_dummy_model_has_the_seeds_constructor_and_logits_shape():
    torch.manual_seed(123)
    model = DummyGPTModel(GPT_CONFIG_124M)
    batch = torch.tensor([[6109, 3626, 6100, 345], [6109, 1110, 6622, 257]])
    logits = model(batch)
    assert logits.shape == (2, 4, 50257)
    assert torch.isfinite(logits).all()


def test_gpt2_small_parameter_counts_and_size_match_the_seeds_figures():
    model = GPTModel(GPT_CONFIG_124M)
    assert fastgpt.parameter_count(model) == 163_009_536
    assert fastgpt.parameter_count(model, exclude_output_head=True) == 124_412_160
    assert round(fastgpt.memory_size_mb(model), 2) == 621.83
    assert round(fastgpt.memory_size_mb(model.to(torch.bfloat16)), 2) == pytest.approx(621.83 / 2, abs=0.01)
    assert round(fastgpt.memory_size_mb(model, dtype=torch.float32), 2) == 621.83


@pytest.mark.parametrize("name,alias,dims", [
    ("gpt2-small", "124M", (768, 12, 12)),
    ("gpt2-medium", "355M", (1024, 24, 16)),
    ("gpt2-large", "774M", (1280, 36, 20)),
    ("gpt2-xl", "1558M", (1600, 48, 25)),
])
def test_presets_under_both_names_match_gpt2_and_transformers_sizes(name, alias, dims):
    transformers = pytest.importorskip("transformers")
    cfg = gpt2_config(name)
    assert fastgpt.GPT2_CONFIGS[alias] == fastgpt.GPT2_CONFIGS[name] == cfg
    assert (cfg["emb_dim"], cfg["n_layers"], cfg["n_heads"]) == dims
    assert (cfg["vocab_size"], cfg["context_length"]) == (50257, 1024)
    # Tied parameter count equals the released GPT-2's (which has QKV biases),
    # counted on the meta device so nothing is allocated.
    with torch.device("meta"):
        ours = GPTModel(gpt2_config(alias, qkv_bias=True))
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=dims[0], n_layer=dims[1], n_head=dims[2], n_positions=1024, vocab_size=50257))
    assert fastgpt.parameter_count(ours, exclude_output_head=True) == hf.num_parameters()


def test_presets_are_read_only_and_gpt2_config_returns_a_fresh_dict():
    with pytest.raises(TypeError):
        fastgpt.GPT2_CONFIGS["gpt2-small"]["emb_dim"] = 1
    cfg = gpt2_config("gpt2-small", drop_rate=0.0)
    cfg["n_layers"] = 1
    assert fastgpt.GPT2_CONFIGS["gpt2-small"]["n_layers"] == 12
    assert gpt2_config()["drop_rate"] == GPT_CONFIG_124M["drop_rate"]


def test_seed_module_attributes_are_where_user_code_expects_them():
    model = GPTModel(TINY)
    block = model.trf_blocks[0]
    assert isinstance(block, fastgpt.TransformerBlock)
    assert block.att.num_heads == 4 and block.att.head_dim == 16 and block.att.d_out == 64
    assert block.norm1.eps == 1e-5 and isinstance(block.ff.layers[1], fastgpt.GELU)
    assert block.att.mask.shape == (TINY["context_length"],) * 2
    assert model.out_head.bias is None

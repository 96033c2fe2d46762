"""Bad input gets a clear exception naming the problem, before any compute runs."""

import pytest
import torch

from fastgpt import DummyGPTModel, GPTModel, gpt2_config, validate_config
from helpers import TINY

V, CTX = TINY["vocab_size"], TINY["context_length"]

FORWARD_CASES = [
    # (description, input, exception, message fragment)
    ("python list", [[1, 2, 3]], TypeError, "must be a torch.Tensor"),
    ("float ids", torch.ones(1, 3), TypeError, "integer tensor (torch.long), got dtype torch.float32"),
    ("bool ids", torch.ones(1, 3, dtype=torch.bool), TypeError, "got dtype torch.bool"),
    ("1-D ids", torch.ones(3, dtype=torch.long), ValueError, "add a batch dimension"),
    ("3-D ids", torch.ones(1, 2, 3, dtype=torch.long), ValueError, "got shape (1, 2, 3)"),
    ("empty sequence", torch.ones(1, 0, dtype=torch.long), ValueError, "must be non-empty"),
    ("empty batch", torch.ones(0, 4, dtype=torch.long), ValueError, "must be non-empty"),
    ("too long", torch.ones(1, CTX + 1, dtype=torch.long), ValueError,
     f"sequence length {CTX + 1} exceeds the model's context_length {CTX}"),
    ("id = vocab size", torch.tensor([[0, V]]), ValueError, f"token id {V} is outside the vocabulary [0, {V})"),
    ("negative id", torch.tensor([[-1, 2]]), ValueError, "token id -1 is outside the vocabulary"),
    ("meta device", torch.ones(1, 2, dtype=torch.long, device="meta"), ValueError,
     "token ids are on meta but the model is on cpu"),
]


@pytest.mark.parametrize("model_class", [GPTModel, DummyGPTModel])
@pytest.mark.parametrize("description,in_idx,error,fragment", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_rejects_bad_token_ids(model_class, description, in_idx, error, fragment, monkeypatch):
    model = model_class(TINY)
    # "before any compute": the embedding must never be reached.
    monkeypatch.setattr(model.tok_emb, "forward", lambda *_: pytest.fail("embedding ran on bad input"))
    with pytest.raises(error) as info:
        model(in_idx)
    assert fragment in str(info.value)


def test_int32_ids_and_full_context_are_accepted():
    model = GPTModel(TINY).eval()
    with torch.no_grad():
        assert model(torch.full((2, CTX), V - 1, dtype=torch.int32)).shape == (2, CTX, V)


CONFIG_CASES = [
    ("not a dict", [768], TypeError, "config must be a dict"),
    ("missing keys", {k: v for k, v in TINY.items() if k not in ("n_heads", "qkv_bias")}, ValueError,
     "config is missing key(s) ['n_heads', 'qkv_bias']"),
    ("emb_dim not divisible", {**TINY, "emb_dim": 66}, ValueError,
     "config['emb_dim'] (66) must be divisible by config['n_heads'] (4)"),
    ("zero layers", {**TINY, "n_layers": 0}, ValueError, "config['n_layers'] must be positive"),
    ("float width", {**TINY, "emb_dim": 64.0}, TypeError, "config['emb_dim'] must be an int"),
    ("bool as int", {**TINY, "vocab_size": True}, TypeError, "config['vocab_size'] must be an int"),
    ("drop_rate 1", {**TINY, "drop_rate": 1.0}, ValueError, "config['drop_rate'] must be in [0, 1)"),
    ("drop_rate string", {**TINY, "drop_rate": "0.1"}, TypeError, "config['drop_rate'] must be a float"),
    ("qkv_bias string", {**TINY, "qkv_bias": "no"}, TypeError, "config['qkv_bias'] must be True or False"),
]


@pytest.mark.parametrize("model_class", [GPTModel, DummyGPTModel])
@pytest.mark.parametrize("description,cfg,error,fragment", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_configs_are_rejected_before_construction(model_class, description, cfg, error, fragment):
    with pytest.raises(error) as info:
        model_class(cfg)
    assert fragment in str(info.value)


def test_config_helpers_reject_unknown_names_and_keys():
    with pytest.raises(ValueError, match="unknown GPT-2 size 'gpt2-huge'; choose one of gpt2-small"):
        gpt2_config("gpt2-huge")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['n_head'\]"):
        gpt2_config("124M", n_head=4)
    validate_config({**TINY, "extra_key_from_a_notebook": 1})  # extra keys are allowed

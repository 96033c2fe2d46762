"""fastgpt.tie_weights: the output head as the token embedding (GPT-2's release, transformers), off by default."""

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import GPT_CONFIG_124M, GPTModel
from fastgpt.seed_compat import weights_tied
from helpers import TINY
from reference_model import RefGPTModel


def test_untied_by_default_and_tied_on_request_with_the_embeddings_values():
    torch.manual_seed(0)
    model = GPTModel(TINY)
    assert not weights_tied(model)
    embedding = model.tok_emb.weight.detach().clone()
    assert fastgpt.tie_weights(model) is model
    assert weights_tied(model) and model.out_head.weight is model.tok_emb.weight
    assert torch.equal(model.out_head.weight, embedding)
    with torch.device("meta"):
        small = fastgpt.tie_weights(GPTModel(GPT_CONFIG_124M))
    assert fastgpt.parameter_count(small) == 124_412_160  # transformers' GPT-2 small (no QKV bias here)


def test_a_tied_model_trains_one_matrix_and_its_state_dict_loads_into_the_seeds_model():
    torch.manual_seed(0)
    model = fastgpt.tie_weights(GPTModel(TINY)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 97, (2, 9))
    model.loss(idx, idx.roll(-1, 1)).backward()
    optimizer.step()
    assert model.out_head.weight is model.tok_emb.weight  # still one tensor after a step
    state = model.state_dict()
    assert list(state) == list(RefGPTModel(TINY).state_dict())  # both keys, as the seed saves them
    ref = RefGPTModel(TINY)
    ref.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.allclose(ref.eval()(idx), model.eval()(idx), atol=1e-5)
    model.load_state_dict(state, strict=True)  # its own, tied, checkpoint loads back


def test_an_untied_checkpoint_is_refused_by_a_tied_model():
    tied = fastgpt.tie_weights(GPTModel(TINY))
    with pytest.raises(RuntimeError, match="out_head.weight differs from tok_emb.weight, but this model's output "
                                           "head is tied"):
        tied.load_state_dict(RefGPTModel(TINY).state_dict())


def test_tie_weights_refuses_what_it_cannot_tie():
    with pytest.raises(TypeError, match="takes a fastgpt GPTModel"):
        fastgpt.tie_weights(RefGPTModel(TINY))
    model = GPTModel(TINY)
    model.out_head = torch.nn.Sequential(model.out_head)
    with pytest.raises(ValueError, match="replaced or given a bias"):
        fastgpt.tie_weights(model)


def test_the_fused_loss_gives_a_tied_head_both_gradients():
    torch.manual_seed(0)
    model = fastgpt.tie_weights(GPTModel(TINY))
    idx = torch.randint(0, 97, (2, 9))
    model.loss(idx, idx.roll(-1, 1)).backward()
    fused = model.tok_emb.weight.grad.clone()
    model.zero_grad()
    F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    assert torch.allclose(fused, model.tok_emb.weight.grad, rtol=1e-5, atol=1e-7)

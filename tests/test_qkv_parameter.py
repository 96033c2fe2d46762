"""One query/key/value parameter behind the seed's three nn.Linear layers (fastgpt/fused_qkv.py).

What the seed's code does with W_query/W_key/W_value must keep working: its
state dicts, its seeded weights (test_dropin.py), its weight loader (which
assigns new nn.Parameters), its LoRA replacement (which finds layers by
isinstance nn.Linear); and the model must move, copy, compile and load like
any module. DDP and FSDP2: test_distributed.py.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgpt import GPTModel
from fastgpt.fused_qkv import FusedQKV, QKVPart, seed_named_grads
from helpers import TINY, rel_err
from reference_model import RefGPTModel

CFG = {**TINY, "qkv_bias": True}
IDX = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))


def _pair(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    ours = GPTModel(cfg)
    torch.manual_seed(seed)
    return ours, RefGPTModel(cfg)


def test_one_parameter_holds_query_key_and_value():
    ours, ref = _pair()
    att = ours.trf_blocks[0].att
    d = CFG["emb_dim"]
    assert isinstance(att.qkv, FusedQKV) and att.qkv.weight.shape == (3 * d, d) and att.qkv.bias.shape == (3 * d,)
    names = [name for name, _ in ours.named_parameters()]
    assert "trf_blocks.0.att.qkv.weight" in names and not any("W_query" in name for name in names)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    for i, name in enumerate(("W_query", "W_key", "W_value")):
        part = getattr(att, name)
        assert isinstance(part, nn.Linear) and not list(part.parameters())
        assert torch.equal(part.weight, att.qkv.weight[i * d:(i + 1) * d])
        assert part.weight.data_ptr() == att.qkv.weight[i * d].data_ptr()  # a view: writes reach the model
    state = ours.state_dict()
    assert state["trf_blocks.0.att.W_key.bias"].data_ptr() == att.qkv.bias[d:].data_ptr()
    assert not state["trf_blocks.0.att.W_key.bias"].requires_grad
    assert ours.state_dict(keep_vars=True)["trf_blocks.0.att.W_key.weight"].requires_grad


def test_the_forward_is_one_matmul_for_the_three_projections_with_and_without_autograd(monkeypatch):
    ours, ref = _pair()
    widths = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: (widths.append(w.shape[0]), real_linear(x, w, b))[1])
    # Per block: query/key/value (3·64), out_proj, the MLP's two; then the output head.
    per_pass = [3 * 64, 64, 4 * 64, 64] * CFG["n_layers"] + [CFG["vocab_size"]]
    logits = ours.train()(IDX)
    assert widths == per_pass
    widths.clear()
    with torch.no_grad():
        ours.eval()(IDX)
    assert widths == per_pass
    monkeypatch.undo()
    assert rel_err(logits, ref(IDX)) <= 1e-5
    F.cross_entropy(logits.flatten(0, 1), IDX.flatten()).backward()
    F.cross_entropy(ref(IDX).flatten(0, 1), IDX.flatten()).backward()
    ref_grads = dict(ref.named_parameters())
    for name, grad in seed_named_grads(ours):
        if "W_key.bias" not in name:  # zero in exact arithmetic (test_parity.py compares its noise)
            assert rel_err(grad, ref_grads[name].grad) <= 1e-4, name


def _openai_params(ref: RefGPTModel) -> dict:
    """The seed's ``params`` dict (OpenAI's GPT-2 layout, numpy) holding ref's weights."""
    def np_(t):
        return t.detach().numpy().copy()

    blocks = []
    for block in ref.trf_blocks:
        att, ff = block.att, block.ff
        blocks.append({
            "attn": {"c_attn": {"w": np.concatenate([np_(att.W_query.weight.T), np_(att.W_key.weight.T),
                                                     np_(att.W_value.weight.T)], axis=-1),
                                "b": np.concatenate([np_(att.W_query.bias), np_(att.W_key.bias),
                                                     np_(att.W_value.bias)])},
                     "c_proj": {"w": np_(att.out_proj.weight.T), "b": np_(att.out_proj.bias)}},
            "mlp": {"c_fc": {"w": np_(ff.layers[0].weight.T), "b": np_(ff.layers[0].bias)},
                    "c_proj": {"w": np_(ff.layers[2].weight.T), "b": np_(ff.layers[2].bias)}},
            "ln_1": {"g": np_(block.norm1.scale), "b": np_(block.norm1.shift)},
            "ln_2": {"g": np_(block.norm2.scale), "b": np_(block.norm2.shift)},
        })
    return {"wte": np_(ref.tok_emb.weight), "wpe": np_(ref.pos_emb.weight), "blocks": blocks,
            "g": np_(ref.final_norm.scale), "b": np_(ref.final_norm.shift)}


def assign(left, right):
    """The seed's helper (chapter 5), verbatim."""
    if left.shape != right.shape:
        raise ValueError(f"Shape mismatch. Left: {left.shape}, Right: {right.shape}")
    return torch.nn.Parameter(torch.tensor(right))


def load_weights_into_gpt(gpt, params):
    """The seed's chapter-5 loader, verbatim: it assigns a new nn.Parameter to every weight."""
    gpt.pos_emb.weight = assign(gpt.pos_emb.weight, params["wpe"])
    gpt.tok_emb.weight = assign(gpt.tok_emb.weight, params["wte"])
    for b in range(len(params["blocks"])):
        q_w, k_w, v_w = np.split((params["blocks"][b]["attn"]["c_attn"])["w"], 3, axis=-1)
        gpt.trf_blocks[b].att.W_query.weight = assign(gpt.trf_blocks[b].att.W_query.weight, q_w.T)
        gpt.trf_blocks[b].att.W_key.weight = assign(gpt.trf_blocks[b].att.W_key.weight, k_w.T)
        gpt.trf_blocks[b].att.W_value.weight = assign(gpt.trf_blocks[b].att.W_value.weight, v_w.T)
        q_b, k_b, v_b = np.split((params["blocks"][b]["attn"]["c_attn"])["b"], 3, axis=-1)
        gpt.trf_blocks[b].att.W_query.bias = assign(gpt.trf_blocks[b].att.W_query.bias, q_b)
        gpt.trf_blocks[b].att.W_key.bias = assign(gpt.trf_blocks[b].att.W_key.bias, k_b)
        gpt.trf_blocks[b].att.W_value.bias = assign(gpt.trf_blocks[b].att.W_value.bias, v_b)
        gpt.trf_blocks[b].att.out_proj.weight = assign(gpt.trf_blocks[b].att.out_proj.weight,
                                                       params["blocks"][b]["attn"]["c_proj"]["w"].T)
        gpt.trf_blocks[b].att.out_proj.bias = assign(gpt.trf_blocks[b].att.out_proj.bias,
                                                     params["blocks"][b]["attn"]["c_proj"]["b"])
        gpt.trf_blocks[b].ff.layers[0].weight = assign(gpt.trf_blocks[b].ff.layers[0].weight,
                                                       params["blocks"][b]["mlp"]["c_fc"]["w"].T)
        gpt.trf_blocks[b].ff.layers[0].bias = assign(gpt.trf_blocks[b].ff.layers[0].bias,
                                                     params["blocks"][b]["mlp"]["c_fc"]["b"])
        gpt.trf_blocks[b].ff.layers[2].weight = assign(gpt.trf_blocks[b].ff.layers[2].weight,
                                                       params["blocks"][b]["mlp"]["c_proj"]["w"].T)
        gpt.trf_blocks[b].ff.layers[2].bias = assign(gpt.trf_blocks[b].ff.layers[2].bias,
                                                     params["blocks"][b]["mlp"]["c_proj"]["b"])
        gpt.trf_blocks[b].norm1.scale = assign(gpt.trf_blocks[b].norm1.scale, params["blocks"][b]["ln_1"]["g"])
        gpt.trf_blocks[b].norm1.shift = assign(gpt.trf_blocks[b].norm1.shift, params["blocks"][b]["ln_1"]["b"])
        gpt.trf_blocks[b].norm2.scale = assign(gpt.trf_blocks[b].norm2.scale, params["blocks"][b]["ln_2"]["g"])
        gpt.trf_blocks[b].norm2.shift = assign(gpt.trf_blocks[b].norm2.shift, params["blocks"][b]["ln_2"]["b"])
    gpt.final_norm.scale = assign(gpt.final_norm.scale, params["g"])
    gpt.final_norm.shift = assign(gpt.final_norm.shift, params["b"])
    gpt.out_head.weight = assign(gpt.out_head.weight, params["wte"])


def test_the_seeds_weight_loader_that_assigns_new_parameters_still_works():
    _, ref = _pair(seed=1)
    ours = GPTModel(CFG)  # other weights, then the seed's loader replaces every one
    load_weights_into_gpt(ours, _openai_params(ref))
    ref.out_head.weight = nn.Parameter(ref.tok_emb.weight.detach().clone())  # what the loader does to ours
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    with torch.no_grad():
        assert rel_err(ours.eval()(IDX), ref.eval()(IDX)) <= 1e-5
    # It trains afterwards: the new values live in the one fused parameter.
    ours.train()
    F.cross_entropy(ours(IDX).flatten(0, 1), IDX.flatten()).backward()
    assert ours.trf_blocks[0].att.qkv.weight.grad.abs().sum() > 0


def test_assigning_a_wrong_part_is_refused_with_a_clear_error():
    ours, _ = _pair()
    att = ours.trf_blocks[0].att
    with pytest.raises(ValueError, match=r"W_key.weight has shape \(64, 64\); got a tensor of shape \(64, 63\)"):
        att.W_key.weight = nn.Parameter(torch.zeros(64, 63))
    with pytest.raises(TypeError, match="W_value.bias must be a tensor"):
        att.W_value.bias = None
    plain = GPTModel(TINY)  # qkv_bias False
    with pytest.raises(ValueError, match="no query/key/value biases"):
        plain.trf_blocks[0].att.W_query.bias = nn.Parameter(torch.zeros(64))
    assert torch.equal(att.W_key.weight, _pair()[0].trf_blocks[0].att.W_key.weight)  # nothing was written


class LoRALayer(nn.Module):
    """The seed's appendix-E LoRA layer, verbatim but for the initialisation's seeding."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=5**0.5)
        self.B = nn.Parameter(torch.randn(rank, out_dim) * 0.1)  # the seed starts B at zero
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model, rank, alpha):
    """The seed's appendix-E function, verbatim: every nn.Linear, found by isinstance."""
    for name, module in model.named_children():
        if isinstance(module, torch.nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)


def test_the_seeds_lora_replacement_finds_and_wraps_the_three_projections():
    ours, ref = _pair()
    for model in (ours, ref):
        for p in model.parameters():
            p.requires_grad = False
        torch.manual_seed(5)
        replace_linear_with_lora(model, rank=2, alpha=2)
    assert isinstance(ours.trf_blocks[0].att.W_query, LinearWithLoRA)
    assert isinstance(ours.trf_blocks[0].att.qkv, FusedQKV)  # not a Linear: not wrapped a second time
    assert list(ours.state_dict()) == list(ref.state_dict())  # ...W_query.linear.weight, ...W_query.lora.A, ...
    ours.load_state_dict(ref.state_dict(), strict=True)
    logits, ref_logits = ours(IDX), ref(IDX)
    assert rel_err(logits, ref_logits) <= 1e-5
    F.cross_entropy(logits.flatten(0, 1), IDX.flatten()).backward()
    F.cross_entropy(ref_logits.flatten(0, 1), IDX.flatten()).backward()
    ref_grads = dict(ref.named_parameters())
    trained = [(name, p) for name, p in ours.named_parameters() if p.requires_grad]
    assert trained and all(".lora." in name for name, _ in trained)
    for name, p in trained:
        assert rel_err(p.grad, ref_grads[name].grad) <= 1e-4, name


def test_state_dicts_load_strictly_with_clear_errors():
    ours, ref = _pair()
    state = ref.state_dict()
    missing = {k: v for k, v in state.items() if k != "trf_blocks.1.att.W_key.weight"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "trf_blocks\.1\.att\.W_key\.weight"'):
        ours.load_state_dict(missing)
    wrong = dict(state, **{"trf_blocks.0.att.W_value.bias": torch.zeros(63)})
    with pytest.raises(RuntimeError, match=r"size mismatch for trf_blocks\.0\.att\.W_value\.bias: copying a param "
                                           r"with shape \(63,\)"):
        ours.load_state_dict(wrong)
    extra = dict(state, **{"trf_blocks.0.att.W_value.scale": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "trf_blocks\.0\.att\.W_value\.scale"'):
        ours.load_state_dict(extra)
    # The fused parameter's own name is accepted (torch.distributed's helpers add it); the parts win.
    fused_too = dict(state, **{"trf_blocks.0.att.qkv.weight": torch.zeros(192, 64)})
    ours.load_state_dict(fused_too)
    assert torch.equal(ours.trf_blocks[0].att.W_query.weight, ref.trf_blocks[0].att.W_query.weight)


def test_moving_casting_copying_and_meta_construction_keep_the_parts_on_the_fused_parameter():
    ours, ref = _pair()
    state = ref.state_dict()
    double = copy.deepcopy(ours).double()
    att = double.trf_blocks[0].att
    assert att.W_value.weight.dtype == torch.float64 and att.W_value.fused is att.qkv
    assert att.W_value.weight.data_ptr() == att.qkv.weight[128].data_ptr()
    with torch.no_grad():
        double.trf_blocks[0].att.W_key.weight.zero_()  # the copy's parameter, not the original's
    assert ours.trf_blocks[0].att.W_key.weight.abs().sum() > 0
    # Built on the meta device and loaded with assign=True, as large-model code does.
    with torch.device("meta"):
        lazy = GPTModel(CFG)
    lazy.load_state_dict(state, assign=True, strict=True)
    assert not lazy.trf_blocks[1].att.qkv.weight.is_meta
    # ... or materialised with to_empty and loaded as usual.
    with torch.device("meta"):
        empty = GPTModel(CFG)
    empty.to_empty(device="cpu").load_state_dict(state)
    with torch.no_grad():
        want = ref.eval()(IDX)
        for model in (double, lazy, empty):
            if model is not double:
                assert rel_err(model.eval()(IDX), want) <= 1e-5
    # assign=True with another dtype gives the model the checkpoint's dtype, the fused parameter too.
    halves = GPTModel(CFG)
    halves.load_state_dict({k: v.bfloat16() for k, v in state.items()}, assign=True)
    assert {p.dtype for p in halves.parameters()} == {torch.bfloat16}


def test_torch_compile_trains_the_fused_parameter_like_eager():
    ours, _ = _pair()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    grads = []
    for model in (ours, compiled):
        ours.zero_grad(set_to_none=True)
        F.cross_entropy(model(IDX).flatten(0, 1), IDX.flatten()).backward()
        grads.append(ours.trf_blocks[1].att.qkv.weight.grad.clone())
    assert rel_err(grads[1], grads[0]) <= 1e-5


def test_a_fresh_models_state_dict_saves_with_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    ours, ref = _pair()
    # The parts are row blocks of one tensor: safetensors sees no overlap.
    save_file({k: v for k, v in ours.state_dict().items() if not k.endswith("mask")}, tmp_path / "m.safetensors")
    ref.load_state_dict(load_file(tmp_path / "m.safetensors"), strict=False)
    assert torch.equal(ref.trf_blocks[0].att.W_value.weight, ours.trf_blocks[0].att.W_value.weight)


def test_parts_are_plain_linear_layers_to_code_that_calls_them():
    ours, ref = _pair()
    x = torch.randn(3, CFG["emb_dim"])
    for name in ("W_query", "W_key", "W_value"):
        part, ref_part = getattr(ours.trf_blocks[1].att, name), getattr(ref.trf_blocks[1].att, name)
        assert isinstance(part, QKVPart) and (part.in_features, part.out_features) == (64, 64)
        assert rel_err(part(x), ref_part(x)) <= 1e-6
        assert part.extra_repr() == ref_part.extra_repr()

"""W_query, W_key and W_value are the seed's: three nn.Linear layers owning their parameters (issue 20, item 1).

What the seed's code does with them must keep working: ``parameters()`` /
``named_parameters()`` in the seed's names and order (so the book's chapter-5
checkpoint, model and optimizer state together, resumes on fastgpt and back),
freezing a projection, selecting parameters by name, its weight loader (which
assigns new nn.Parameters), its LoRA replacement; and the model must move,
copy, compile and load like any module. DDP and FSDP2: test_distributed.py.
"""

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgpt import GPTModel
from helpers import TINY, rel_err
from reference_model import RefGPTModel

CFG = {**TINY, "qkv_bias": True}
IDX = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
PROJECTIONS = ("W_query", "W_key", "W_value")


def _pair(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    ours = GPTModel(cfg)
    torch.manual_seed(seed)
    return ours, RefGPTModel(cfg)


def _loss(model, idx=IDX):
    return F.cross_entropy(model(idx).flatten(0, 1), idx.roll(1, dims=1).flatten())


# ---------------------------------------------------------------- the seed's parameters

@pytest.mark.parametrize("qkv_bias", [False, True])
def test_parameters_are_the_seeds_tensors_names_and_order(qkv_bias):
    ours, ref = _pair({**CFG, "qkv_bias": qkv_bias}, seed=123)
    named, ref_named = list(ours.named_parameters()), list(ref.named_parameters())
    assert [name for name, _ in named] == [name for name, _ in ref_named]
    assert len(named) == (37 if qkv_bias else 31)  # 2 blocks: 16 (or 13) each, and 5 outside them
    for (name, p), (_, ref_p) in zip(named, ref_named):
        assert isinstance(p, nn.Parameter) and p.shape == ref_p.shape and torch.equal(p, ref_p), name
    att = ours.trf_blocks[0].att
    for name in PROJECTIONS:
        layer = getattr(att, name)
        assert type(layer) is nn.Linear
        assert list(layer.parameters()) == ([layer.weight, layer.bias] if qkv_bias else [layer.weight])
    # The same tensors as the state dict's: writing one writes the model.
    state = ours.state_dict(keep_vars=True)
    assert all(state[name] is p for name, p in named)


def test_freezing_one_projection_freezes_it_and_only_it():
    ours, ref = _pair()
    for model in (ours, ref):
        model.trf_blocks[0].att.W_query.requires_grad_(False)
        model.trf_blocks[1].att.W_key.weight.requires_grad = False
        _loss(model).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        ref_p = ref_params[name]
        assert p.requires_grad == ref_p.requires_grad, name
        assert (p.grad is None) == (ref_p.grad is None), name
    assert ours.trf_blocks[0].att.W_query.weight.grad is None and ours.trf_blocks[0].att.W_query.bias.grad is None
    assert ours.trf_blocks[1].att.W_key.weight.grad is None
    assert ours.trf_blocks[1].att.W_key.bias.grad is not None
    assert ours.trf_blocks[0].att.W_value.weight.grad.abs().sum() > 0
    # requires_grad_(False) on the whole attention (the book's chapter-6 freezing) reaches the projections too.
    ours.trf_blocks[1].att.requires_grad_(False)
    assert not any(p.requires_grad for p in ours.trf_blocks[1].att.parameters())
    assert sum(1 for p in ours.trf_blocks[1].att.parameters()) == 8


def test_parameters_selected_by_the_seeds_names_train_as_in_the_seed():
    ours, ref = _pair()
    ref.load_state_dict(ours.state_dict())

    def groups(model):  # weight decay off for biases and norms; the query projection slower
        named = list(model.named_parameters())
        query = [p for n, p in named if ".W_query." in n]
        decay = [p for n, p in named if n.endswith("weight") and ".W_query." not in n]
        rest = [p for n, p in named if not n.endswith("weight") and ".W_query." not in n]
        return [{"params": query, "lr": 1e-3}, {"params": decay, "weight_decay": 0.1},
                {"params": rest, "weight_decay": 0.0}]

    our_groups, ref_groups = groups(ours), groups(ref)
    assert [len(g["params"]) for g in our_groups] == [len(g["params"]) for g in ref_groups] == [4, 13, 20]
    optimizers = [torch.optim.AdamW(g, lr=1e-2) for g in (our_groups, ref_groups)]
    _loss(ref).backward()
    _copy_grads(ref, ours)  # the same gradients: only the optimizer's bookkeeping is compared
    for optimizer in optimizers:
        optimizer.step()
    for (name, p), ref_p in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, ref_p), name


def _copy_grads(source, target):
    grads = {name: p.grad for name, p in source.named_parameters()}
    for name, p in target.named_parameters():
        p.grad = None if grads[name] is None else grads[name].clone()


def _checkpoint(model, optimizer) -> io.BytesIO:
    """The book's chapter-5 checkpoint: model and optimizer state in one torch.save."""
    buffer = io.BytesIO()
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("direction", ["seed to fastgpt", "fastgpt to seed"])
def test_the_books_model_and_optimizer_checkpoint_resumes_across_the_two_models(direction):
    ours, ref = _pair()
    saver, resumer = (ref, ours) if direction == "seed to fastgpt" else (ours, ref)
    optimizer = torch.optim.AdamW(saver.parameters(), lr=1e-2, weight_decay=0.1)
    _loss(saver).backward()
    optimizer.step()
    optimizer.zero_grad()
    checkpoint = torch.load(_checkpoint(saver, optimizer), weights_only=True)

    resumer.load_state_dict(checkpoint["model_state_dict"])
    resumed = torch.optim.AdamW(resumer.parameters(), lr=5e-4, weight_decay=0.1)
    resumed.load_state_dict(checkpoint["optimizer_state_dict"])
    # Each parameter's Adam moments are the saver's, matched by name.
    saver_state = {name: optimizer.state[p] for name, p in saver.named_parameters()}
    for name, p in resumer.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(resumed.state[p][key], saver_state[name][key]), (name, key)
    # Both step on: the same gradients give the same parameters, bit for bit ...
    idx = IDX.flip(0)
    _loss(saver, idx).backward()
    _copy_grads(saver, resumer)
    optimizer.step(), resumed.step()
    for (name, p), saver_p in zip(resumer.named_parameters(), saver.parameters()):
        assert torch.equal(p, saver_p), name
    # ... and each model's own gradients, the same parameters to float32 rounding.
    for model, opt in ((saver, optimizer), (resumer, resumed)):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
    for (name, p), saver_p in zip(resumer.named_parameters(), saver.parameters()):
        if name.endswith("W_key.bias"):
            continue  # zero gradient in exact arithmetic: Adam normalises the rounding noise of each model
        assert rel_err(p, saver_p) <= 1e-5, name


def test_a_fastgpt_optimizer_state_has_one_entry_per_seed_parameter():
    ours, ref = _pair()
    optimizer = torch.optim.AdamW(ours.parameters())
    _loss(ours).backward()
    optimizer.step()
    state = optimizer.state_dict()
    assert state["param_groups"][0]["params"] == list(range(37))
    assert len(state["state"]) == len(list(ref.parameters())) == 37
    ref_shapes = [p.shape for p in ref.parameters()]
    assert [state["state"][i]["exp_avg"].shape for i in range(37)] == ref_shapes


# ---------------------------------------------------------------- the seed's code on them

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


def test_the_seeds_weight_loader_that_assigns_new_parameters_still_works():
    _, ref = _pair(seed=1)
    ours = GPTModel(CFG)  # other weights, then the seed's loader replaces every one
    load_weights_into_gpt(ours, _openai_params(ref))
    ref.out_head.weight = nn.Parameter(ref.tok_emb.weight.detach().clone())  # what the loader does to ours
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    with torch.no_grad():
        assert rel_err(ours.eval()(IDX), ref.eval()(IDX)) <= 1e-5
    # The assigned parameters are the model's: they train.
    ours.train()
    _loss(ours).backward()
    assert all(p.grad is not None for p in ours.parameters())
    assert ours.trf_blocks[0].att.W_key.weight.grad.abs().sum() > 0


def test_the_seeds_lora_replacement_finds_and_wraps_the_three_projections():
    ours, ref = _pair()
    for model in (ours, ref):
        for p in model.parameters():
            p.requires_grad = False
        torch.manual_seed(5)
        replace_linear_with_lora(model, rank=2, alpha=2)
    assert isinstance(ours.trf_blocks[0].att.W_query, LinearWithLoRA)
    assert list(ours.state_dict()) == list(ref.state_dict())  # ...W_query.linear.weight, ...W_query.lora.A, ...
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
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
    assert ours.trf_blocks[1].att.mask.shape == (CFG["context_length"],) * 2  # built from a wrapped layer


def test_state_dicts_load_strictly_with_clear_errors():
    ours, ref = _pair()
    state = ref.state_dict()
    missing = {k: v for k, v in state.items() if k != "trf_blocks.1.att.W_key.weight"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "trf_blocks\.1\.att\.W_key\.weight"'):
        ours.load_state_dict(missing)
    wrong = dict(state, **{"trf_blocks.0.att.W_value.bias": torch.zeros(63)})
    with pytest.raises(RuntimeError, match=r"size mismatch for trf_blocks\.0\.att\.W_value\.bias: copying a param "
                                           r"with shape torch\.Size\(\[63\]\)"):
        ours.load_state_dict(wrong)
    extra = dict(state, **{"trf_blocks.0.att.W_value.scale": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "trf_blocks\.0\.att\.W_value\.scale"'):
        ours.load_state_dict(extra)


def test_moving_casting_copying_and_meta_construction():
    ours, ref = _pair()
    state = ref.state_dict()
    double = copy.deepcopy(ours).double()
    assert {p.dtype for p in double.parameters()} == {torch.float64}
    with torch.no_grad():
        double.trf_blocks[0].att.W_key.weight.zero_()  # the copy's parameter, not the original's
    assert ours.trf_blocks[0].att.W_key.weight.abs().sum() > 0
    # Built on the meta device and loaded with assign=True, as large-model code does.
    with torch.device("meta"):
        lazy = GPTModel(CFG)
    lazy.load_state_dict(state, assign=True, strict=True)
    assert not any(p.is_meta for p in lazy.parameters())
    # ... or materialised with to_empty and loaded as usual.
    with torch.device("meta"):
        empty = GPTModel(CFG)
    empty.to_empty(device="cpu").load_state_dict(state)
    with torch.no_grad():
        want = ref.eval()(IDX)
        for model in (lazy, empty):
            assert rel_err(model.eval()(IDX), want) <= 1e-5
        assert rel_err(double.eval()(IDX).float(), ours.eval()(IDX)) > 0  # the zeroed key changed the copy only
    # assign=True with another dtype gives the model the checkpoint's tensors.
    halves = GPTModel(CFG)
    halves.load_state_dict({k: v.bfloat16() for k, v in state.items()}, assign=True)
    assert {p.dtype for p in halves.parameters()} == {torch.bfloat16}


def test_torch_compile_trains_the_projections_like_eager():
    ours, _ = _pair()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    grads = []
    for model in (ours, compiled):
        ours.zero_grad(set_to_none=True)
        _loss(model).backward()
        grads.append([getattr(ours.trf_blocks[1].att, name).weight.grad.clone() for name in PROJECTIONS])
    for compiled_grad, eager_grad in zip(*grads[::-1]):
        assert rel_err(compiled_grad, eager_grad) <= 1e-5


def test_a_fresh_models_state_dict_saves_with_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    ours, ref = _pair()
    save_file({k: v for k, v in ours.state_dict().items() if not k.endswith("mask")}, tmp_path / "m.safetensors")
    ref.load_state_dict(load_file(tmp_path / "m.safetensors"), strict=False)
    assert torch.equal(ref.trf_blocks[0].att.W_value.weight, ours.trf_blocks[0].att.W_value.weight)

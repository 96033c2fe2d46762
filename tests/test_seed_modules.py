"""Every submodule of a block behaves as the seed's: hooks fire as often, replaced modules run (issue 20, 2-3).

A fused op (dropout + add + LayerNorm, Linear + GELU, attention with its
dropout) may stand in for a submodule's ``forward`` only while that submodule
is the stock class with no hook of its own or registered globally: each named
submodule is hooked, replaced or wrapped in turn, and its calls counted against
the seed's model (tests/reference_model.py). Without hooks the fused path must
still run. The residual dropout answers to both of its names, ``drop_shortcut``
(the book's text) and ``drop_resid`` (the book's package).
"""

from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as torch_module

import fastgpt
from fastgpt import GPTModel, ops
from helpers import TINY, rel_err
from reference_model import RefGELU, RefGPTModel, RefLayerNorm

CFG = {**TINY, "qkv_bias": True}
IDX = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
BLOCK_NAMES = [name for name, _ in RefGPTModel(CFG).trf_blocks[0].named_modules() if name]


def _pair(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    ours = GPTModel(cfg)
    ref = RefGPTModel(cfg)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _run(model, train: bool, backward: bool = False):
    model.train(train)
    with torch.set_grad_enabled(backward):
        out = model(IDX)
    if backward:
        out.square().mean().backward()
    return out.detach()


def test_a_block_has_the_seeds_submodules_under_the_seeds_names():
    ours, ref = _pair()
    assert [name for name, _ in ours.trf_blocks[0].named_modules()] == ["", *BLOCK_NAMES]
    assert [type(m).__name__ for m in ours.modules()] == \
        [type(m).__name__.replace("Ref", "") for m in ref.modules()]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_a_forward_hook_on_any_submodule_fires_as_often_as_the_seeds(name, train):
    ours, ref = _pair()
    calls = {"ours": Counter(), "ref": Counter()}
    for key, model in (("ours", ours), ("ref", ref)):
        for b, block in enumerate(model.trf_blocks):
            block.get_submodule(name).register_forward_hook(
                lambda module, args, out, key=key, b=b: calls[key].update([b]))
    out, ref_out = _run(ours, train), _run(ref, train)
    assert calls["ours"] == calls["ref"] and sum(calls["ref"].values()) > 0, name
    assert rel_err(out, ref_out) <= 1e-5


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_hooks_on_every_submodule_at_once_see_the_seeds_calls_and_values(train):
    ours, ref = _pair()
    seen = {"ours": [], "ref": []}
    for key, model in (("ours", ours), ("ref", ref)):
        for name, module in model.named_modules():
            module.register_forward_pre_hook(lambda m, args, key=key, name=name: seen[key].append((name, "pre")))
            module.register_forward_hook(
                lambda m, args, out, key=key, name=name: seen[key].append((name, out.detach().clone())))
    out, ref_out = _run(ours, train), _run(ref, train)
    assert rel_err(out, ref_out) <= 1e-5
    assert Counter(n for n, _ in seen["ours"]) == Counter(n for n, _ in seen["ref"])
    # Every module's output equals the seed's module's output, call for call.
    outputs = {key: {} for key in seen}
    for key in seen:
        for name, value in seen[key]:
            if not isinstance(value, str):
                outputs[key].setdefault(name, []).append(value)
    for name, values in outputs["ref"].items():
        for mine, theirs in zip(outputs["ours"][name], values):
            assert rel_err(mine, theirs) <= 1e-5, name


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_global_module_hooks_fire_for_every_module_as_in_the_seed(train):
    ours, ref = _pair()
    names = {}
    for key, model in (("ours", ours), ("ref", ref)):
        names.update({id(module): (key, name) for name, module in model.named_modules()})
    calls, pre_calls = Counter(), Counter()
    hooks = [nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.update([names[id(m)]])),
             nn.modules.module.register_module_forward_pre_hook(lambda m, a: pre_calls.update([names[id(m)]]))]
    try:
        out, ref_out = _run(ours, train), _run(ref, train)
    finally:
        for handle in hooks:
            handle.remove()
    for counter in (calls, pre_calls):
        assert {n: c for (k, n), c in counter.items() if k == "ours"} == \
            {n: c for (k, n), c in counter.items() if k == "ref"}
    assert calls[("ours", "trf_blocks.1.drop_shortcut")] == 2 and calls[("ours", "trf_blocks.0.norm2")] == 1
    assert rel_err(out, ref_out) <= 1e-5


@pytest.mark.parametrize("name", ["norm2", "drop_shortcut", "ff.layers", "ff.layers.1", "att.dropout"])
def test_a_backward_hook_on_a_fused_submodule_fires_as_in_the_seed(name):
    ours, ref = _pair()
    calls = Counter()
    for key, model in (("ours", ours), ("ref", ref)):
        model.trf_blocks[0].get_submodule(name).register_full_backward_hook(
            lambda module, grad_in, grad_out, key=key: calls.update([key]))
    _run(ours, True, backward=True), _run(ref, True, backward=True)
    assert calls["ours"] == calls["ref"] > 0


class Recorder(nn.Module):
    """A replacement that runs the module it replaces and counts its calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _replace(model, block, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.trf_blocks[block].get_submodule(parent) if parent else model.trf_blocks[block], child, new)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_a_replaced_submodule_runs_as_often_as_in_the_seed(name, train):
    ours, ref = _pair()
    recorders = {}
    for key, model in (("ours", ours), ("ref", ref)):
        recorders[key] = Recorder(model.trf_blocks[1].get_submodule(name))
        _replace(model, 1, name, recorders[key])
    out, ref_out = _run(ours, train), _run(ref, train)
    assert recorders["ours"].calls == recorders["ref"].calls > 0
    assert rel_err(out, ref_out) <= 1e-5


def test_replacements_that_compute_something_else_are_what_runs():
    ours, ref = _pair({**CFG, "drop_rate": 0.5})
    for model in (ours, ref):
        for block in model.trf_blocks:
            block.norm2 = RefLayerNorm(CFG["emb_dim"])  # stock-looking maths, another class: called as a module
            block.ff.layers[1] = nn.ReLU()  # another activation
            block.att.dropout = nn.Identity()  # no attention dropout
            block.drop_shortcut = nn.Identity()  # no residual dropout: only drop_emb remains random
        model.drop_emb = nn.Identity()
    out, ref_out = _run(ours, True), _run(ref, True)
    assert rel_err(out, ref_out) <= 1e-5  # deterministic though drop_rate is 0.5: the replacements ran


def test_a_subclass_of_a_stock_module_is_called_not_fused():
    class Gelu2(fastgpt.GELU):
        def forward(self, x):
            return 2 * super().forward(x)

    class RefGelu2(RefGELU):
        def forward(self, x):
            return 2 * super().forward(x)

    ours, ref = _pair()
    ours.trf_blocks[0].ff.layers[1] = Gelu2()
    ref.trf_blocks[0].ff.layers[1] = RefGelu2()
    assert rel_err(_run(ours, False), _run(ref, False)) <= 1e-5


def test_a_forward_patched_onto_an_instance_runs():
    ours, ref = _pair()
    for model in (ours, ref):
        norm = model.trf_blocks[0].norm2
        norm.forward = lambda x, norm=norm: type(norm).forward(norm, x) * 0.5
    assert rel_err(_run(ours, False), _run(ref, False)) <= 1e-5


# ---------------------------------------------------------------- the fused path, when nothing is hooked

def test_without_hooks_the_fused_ops_run():
    ours, _ = _pair()
    for train in (False, True):
        ops.reset_dispatch_counts()
        _run(ours, train)
        assert ops.dispatch_counts[("dropout_add_layer_norm", "eager")] == CFG["n_layers"]
        assert ops.dispatch_counts[("linear_gelu", "eager")] == CFG["n_layers"]
        assert ops.dispatch_counts[("causal_attention", "eager")] == CFG["n_layers"]
        assert ops.dispatch_counts[("gelu", "eager")] == 0


@pytest.mark.parametrize("name,unfused", [
    ("norm2", "dropout_add_layer_norm"), ("drop_shortcut", "dropout_add_layer_norm"),
    ("ff.layers", "linear_gelu"), ("ff.layers.0", "linear_gelu"), ("ff.layers.1", "linear_gelu"),
    ("att.dropout", "causal_attention"),
])
def test_a_hook_turns_off_only_the_fusion_that_would_skip_its_module(name, unfused):
    ours, _ = _pair()
    handle = ours.trf_blocks[0].get_submodule(name).register_forward_hook(lambda *args: None)
    ops.reset_dispatch_counts()
    _run(ours, False)
    fused = {"dropout_add_layer_norm", "linear_gelu", "causal_attention"}
    assert ops.dispatch_counts[(unfused, "eager")] == CFG["n_layers"] - 1, name  # block 1 still fuses
    for op in fused - {unfused}:
        assert ops.dispatch_counts[(op, "eager")] == CFG["n_layers"], (name, op)
    handle.remove()
    ops.reset_dispatch_counts()
    _run(ours, False)
    assert ops.dispatch_counts[(unfused, "eager")] == CFG["n_layers"]


def test_a_global_hook_turns_every_fusion_off_and_removing_it_turns_them_back_on():
    ours, ref = _pair()
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        ops.reset_dispatch_counts()
        assert rel_err(_run(ours, True), _run(ref, True)) <= 1e-5
        for op in ("dropout_add_layer_norm", "linear_gelu", "causal_attention"):
            assert ops.dispatch_counts[(op, "eager")] == 0, op
    finally:
        handle.remove()
    assert not torch_module._global_forward_hooks
    ops.reset_dispatch_counts()
    _run(ours, True)
    assert ops.dispatch_counts[("dropout_add_layer_norm", "eager")] == CFG["n_layers"]


def test_a_hooked_attention_dropout_with_a_kv_cache_computes_the_cached_attention():
    ours, _ = _pair()
    ours.eval()
    calls = []
    for block in ours.trf_blocks:
        block.att.dropout.register_forward_hook(lambda m, args, out: calls.append(tuple(out.shape)))
    with torch.no_grad():
        full = ours(IDX)
        cache = fastgpt.KVCache.for_model(ours, IDX.shape[0])
        first = ours(IDX[:, :7], kv_cache=cache)
        rest = ours(IDX[:, 7:], kv_cache=cache)
    assert rel_err(torch.cat([first, rest], dim=1), full) <= 1e-5
    assert (2, 4, 4, 11) in calls  # the attention weights of 4 new queries over 11 keys


def test_dropout_in_a_hooked_attention_dropout_is_applied_to_the_weights():
    ours, ref = _pair({**CFG, "drop_rate": 0.5})
    for model in (ours, ref):
        for block in model.trf_blocks:
            block.att.dropout.register_forward_hook(lambda m, args, out: None)
            block.drop_shortcut = nn.Identity()
        model.drop_emb = nn.Identity()
    torch.manual_seed(3)
    out = _run(ours, True)
    torch.manual_seed(3)
    ref_out = _run(ref, True)
    assert rel_err(out, ref_out) <= 1e-5  # the same dropout masks drawn on the same weights


# ---------------------------------------------------------------- drop_shortcut alias drop_resid

def test_drop_resid_is_drop_shortcut():
    model = GPTModel(CFG)
    block = model.trf_blocks[0]
    assert block.drop_resid is block.drop_shortcut and isinstance(block.drop_resid, nn.Dropout)
    assert model.get_submodule("trf_blocks.0.drop_resid") is block.drop_shortcut
    names = [name for name, _ in block.named_modules(remove_duplicate=False)]
    assert names.count("drop_shortcut") == 1 and "drop_resid" not in names
    assert [name for name, _ in block.named_children()].count("drop_shortcut") == 1
    assert list(model.state_dict()) == list(RefGPTModel(CFG).state_dict())


@pytest.mark.parametrize("assigned,other", [("drop_resid", "drop_shortcut"), ("drop_shortcut", "drop_resid")])
def test_replacing_either_name_replaces_what_the_forward_uses(assigned, other):
    ours, ref = _pair()
    recorder = Recorder(nn.Dropout(0.0))
    setattr(ours.trf_blocks[0], assigned, recorder)
    assert getattr(ours.trf_blocks[0], other) is recorder
    assert [name for name, _ in ours.trf_blocks[0].named_children()].count("drop_shortcut") == 1
    ref.trf_blocks[0].drop_shortcut = Recorder(nn.Dropout(0.0))
    assert rel_err(_run(ours, True), _run(ref, True)) <= 1e-5
    assert recorder.calls == ref.trf_blocks[0].drop_shortcut.calls == 2


def test_a_hook_registered_through_drop_resid_fires_twice_per_block():
    ours, _ = _pair()
    calls = Counter()
    for b, block in enumerate(ours.trf_blocks):
        block.drop_resid.register_forward_hook(lambda m, a, o, b=b: calls.update([b]))
    _run(ours, True)
    assert calls == {0: 2, 1: 2}


def test_hooking_every_named_module_hooks_the_residual_dropout_once():
    ours, ref = _pair()
    counts = {"ours": Counter(), "ref": Counter()}
    for key, model in (("ours", ours), ("ref", ref)):
        for name, module in model.named_modules():
            module.register_forward_hook(lambda m, a, o, key=key, name=name: counts[key].update([name]))
    _run(ours, False), _run(ref, False)
    assert counts["ours"] == counts["ref"]


def test_deleting_and_copying_follow_the_alias():
    import copy
    import io

    model = GPTModel(CFG)
    clone = copy.deepcopy(model)
    assert clone.trf_blocks[0].drop_resid is clone.trf_blocks[0].drop_shortcut
    assert clone.trf_blocks[0].drop_resid is not model.trf_blocks[0].drop_shortcut
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.trf_blocks[1].drop_resid is loaded.trf_blocks[1].drop_shortcut
    del clone.trf_blocks[0].drop_resid
    assert not hasattr(clone.trf_blocks[0], "drop_shortcut")
    assert not hasattr(clone.trf_blocks[0], "drop_resid")


def test_the_fused_loss_and_forward_agree_when_hooks_force_the_module_path():
    ours, ref = _pair()
    for model in (ours, ref):
        model.trf_blocks[0].norm2.register_forward_hook(lambda *args: None)
    targets = IDX.roll(1, dims=1)
    ours.train(), ref.train()
    loss = ours.loss(IDX, targets)
    ref_loss = F.cross_entropy(ref(IDX).flatten(0, 1), targets.flatten())
    assert rel_err(loss, ref_loss) <= 1e-5

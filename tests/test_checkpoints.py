"""Checkpoints on disk: Hugging Face folders, seed state dicts, OpenAI's TensorFlow release; saving; bad files.

Every file here is written for real by the tool that writes it in the wild:
transformers' ``save_pretrained``, ``torch.save``, safetensors, and TensorFlow
itself (in a subprocess, when the ``tf`` extra is installed).
"""

import collections
import errno
import io
import pickle
import re
import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings
import weakref
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastgpt
from fastgpt import CheckpointError, GPTModel, from_pretrained
from fastgpt.checkpoints.hf_config import config_from_hf_gpt2
from fastgpt.checkpoints.safetensors_format import SafetensorsFile
from helpers import TINY, rel_err
from reference_model import RefGPTModel

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("single_thread")


def hf_gpt2(seed=0, vocab=97, ctx=40, emb=64, layers=2, heads=4, tie=True):
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=emb, n_layer=layers, n_head=heads,
                                     tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def assert_same_logits(ours, hf, vocab=97, length=11):
    idx = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ours(idx), hf(idx).logits) <= 1e-5


# ---------------------------------------------------------------- Hugging Face folders

@pytest.mark.parametrize("sizes", [
    dict(),                                                          # tied head, as GPT-2 ships
    dict(vocab=101, ctx=24, emb=32, layers=3, heads=2, tie=False),   # its own head, other sizes
], ids=["tied", "untied-other-sizes"])
def test_a_transformers_save_pretrained_folder_loads_with_its_sizes_and_logits(tmp_path, sizes):
    hf = hf_gpt2(**sizes)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = from_pretrained(tmp_path)
    cfg = hf.config
    assert ours.cfg == {"vocab_size": cfg.vocab_size, "context_length": cfg.n_positions, "emb_dim": cfg.n_embd,
                        "n_heads": cfg.n_head, "n_layers": cfg.n_layer, "drop_rate": cfg.resid_pdrop,
                        "qkv_bias": True}
    assert not ours.training
    assert_same_logits(ours, hf, vocab=cfg.vocab_size)
    tied = torch.equal(ours.out_head.weight, ours.tok_emb.weight)
    assert tied == cfg.tie_word_embeddings
    assert ours.out_head.weight.data_ptr() != ours.tok_emb.weight.data_ptr()  # own copy, as the seed keeps
    assert isinstance(GPTModel.from_pretrained(tmp_path), GPTModel)


def test_a_pytorch_model_bin_folder_loads(tmp_path):
    hf = hf_gpt2(seed=1)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert_same_logits(from_pretrained(tmp_path), hf)


def test_a_bare_transformers_state_dict_file_loads_given_the_head_count(tmp_path):
    hf = hf_gpt2(seed=2)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied: safetensors stores it once
    save_file(state, tmp_path / "gpt2.safetensors")
    with pytest.raises(CheckpointError, match="does not record the number of heads.*pass n_heads="):
        from_pretrained(tmp_path / "gpt2.safetensors")
    assert_same_logits(from_pretrained(tmp_path / "gpt2.safetensors", n_heads=4), hf)


# ---------------------------------------------------------------- the seed's state dicts

@pytest.mark.parametrize("form", ["pth", "model_and_optimizer", "safetensors"])
def test_a_seed_state_dict_file_loads_exactly(tmp_path, form):
    torch.manual_seed(4)
    ref = RefGPTModel({**TINY, "qkv_bias": True}).eval()
    state = ref.state_dict()
    if form == "pth":
        path = tmp_path / "model.pth"
        torch.save(state, path)
    elif form == "model_and_optimizer":  # what the seed's training chapter saves
        path = tmp_path / "model_and_optimizer.pth"
        optimizer = torch.optim.AdamW(ref.parameters())
        torch.save({"model_state_dict": state, "optimizer_state_dict": optimizer.state_dict()}, path)
    else:
        path = tmp_path / "model.safetensors"
        save_file({k: v for k, v in state.items() if not k.endswith("mask")}, path)
    ours = from_pretrained(path, n_heads=TINY["n_heads"], drop_rate=0.0)
    assert ours.cfg == {**TINY, "qkv_bias": True}
    # Linear weights are laid out with their longer dimension contiguous (fast one-token matmuls) ...
    for linear in (ours.trf_blocks[1].ff.layers[0], ours.out_head):
        assert linear.weight.stride() == (1, linear.weight.shape[0])  # out >= in: the (in, out) transpose
    assert ours.trf_blocks[1].ff.layers[2].weight.is_contiguous()  # in = 4·out: the usual (out, in)
    for name in ("W_query", "W_key", "W_value"):  # the seed's three parameters, each (in, out)-major
        assert getattr(ours.trf_blocks[0].att, name).weight.stride() == (1, TINY["emb_dim"])
    for key, value in ours.state_dict().items():
        assert torch.equal(value, state[key]), key
    idx = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        assert rel_err(ours(idx), ref(idx)) <= 1e-5


def test_a_released_width_implies_its_head_count_and_says_so(tmp_path):
    # 768 wide but 8 heads: loaded as GPT-2 small's 12 heads it computes other logits (off by ~50 here).
    cfg = {**TINY, "vocab_size": 11, "context_length": 8, "emb_dim": 768, "n_heads": 8, "n_layers": 1}
    torch.manual_seed(3)
    trained = GPTModel(cfg).eval()
    torch.save(trained.state_dict(), tmp_path / "small.pth")
    with pytest.warns(UserWarning, match=r"small\.pth: a state dict does not record its number of heads; assuming "
                                         r"n_heads=12, GPT-2's for emb_dim 768.*pass n_heads="):
        assumed = from_pretrained(tmp_path / "small.pth")
    assert (assumed.cfg["n_heads"], assumed.cfg["qkv_bias"], assumed.cfg["drop_rate"]) == (12, False, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the head count given: nothing to warn about
        loaded = from_pretrained(tmp_path / "small.pth", n_heads=8)
    idx = torch.randint(0, 11, (1, 8))
    with torch.no_grad():
        assert rel_err(loaded(idx), trained(idx)) <= 1e-5
        assert rel_err(assumed(idx), trained(idx)) > 1e-2


# ---------------------------------------------------------------- OpenAI's TensorFlow checkpoint

TF_WRITER = """
import sys
import time
import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1
arrays = dict(np.load(sys.argv[1]))
graph = tf.Graph()
with graph.as_default():
    for name, value in arrays.items():
        tf1.get_variable(name, initializer=value)
    saver = tf1.train.Saver()
    with tf1.Session(graph=graph) as session:
        session.run(tf1.global_variables_initializer())
        saver.save(session, sys.argv[2])
"""


def openai_variables(hf, n_layers):
    """OpenAI's names and shapes for a transformers GPT-2's tensors (written out here, independently of fastgpt)."""
    sd = {k.removeprefix("transformer."): v.numpy() for k, v in hf.state_dict().items()}
    out = {"model/wte": sd["wte.weight"], "model/wpe": sd["wpe.weight"],
           "model/ln_f/g": sd["ln_f.weight"], "model/ln_f/b": sd["ln_f.bias"]}
    for i in range(n_layers):
        for ours, theirs in [("ln_1/g", "ln_1.weight"), ("ln_1/b", "ln_1.bias"), ("ln_2/g", "ln_2.weight"),
                             ("ln_2/b", "ln_2.bias"), ("attn/c_attn/b", "attn.c_attn.bias"),
                             ("attn/c_proj/b", "attn.c_proj.bias"), ("mlp/c_fc/b", "mlp.c_fc.bias"),
                             ("mlp/c_proj/b", "mlp.c_proj.bias")]:
            out[f"model/h{i}/{ours}"] = sd[f"h.{i}.{theirs}"]
        for ours, theirs in [("attn/c_attn/w", "attn.c_attn.weight"), ("attn/c_proj/w", "attn.c_proj.weight"),
                             ("mlp/c_fc/w", "mlp.c_fc.weight"), ("mlp/c_proj/w", "mlp.c_proj.weight")]:
            out[f"model/h{i}/{ours}"] = sd[f"h.{i}.{theirs}"][None]  # OpenAI's conv1d weights: [1, in, out]
    return out


@pytest.fixture(scope="module")
def tf_checkpoint(tmp_path_factory):
    """A tiny GPT-2 saved by TensorFlow as OpenAI's release is laid out, and the transformers model it came from."""
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow is not installed (pip install -e '.[tf]'); it writes the checkpoint under test")
    folder = tmp_path_factory.mktemp("gpt2-tf")
    hf = hf_gpt2(seed=5, vocab=53, ctx=16, emb=32, layers=2, heads=4)
    np.savez(folder / "arrays.npz", **openai_variables(hf, 2))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    written = subprocess.run([sys.executable, "-c", TF_WRITER, str(folder / "arrays.npz"), str(folder / "model.ckpt")],
                             capture_output=True, text=True, timeout=600, env=env, cwd=folder)
    assert written.returncode == 0, written.stderr[-3000:]
    (folder / "arrays.npz").unlink()
    (folder / "hparams.json").write_text(json.dumps({"n_vocab": 53, "n_ctx": 16, "n_embd": 32, "n_head": 4,
                                                     "n_layer": 2}))
    return folder, hf


def test_a_tensorflow_checkpoint_loads_without_tensorflow(tf_checkpoint):
    folder, hf = tf_checkpoint
    assert {p.name for p in folder.iterdir()} >= {"checkpoint", "hparams.json", "model.ckpt.index",
                                                  "model.ckpt.data-00000-of-00001"}
    before = set(sys.modules)
    ours = from_pretrained(folder)
    assert not any(name.split(".")[0] == "tensorflow" for name in set(sys.modules) - before)
    assert ours.cfg == {"vocab_size": 53, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
                        "drop_rate": 0.1, "qkv_bias": True}
    assert_same_logits(ours, hf, vocab=53)
    # The index file itself names the same checkpoint.
    assert_same_logits(from_pretrained(folder / "model.ckpt.index"), hf, vocab=53)


def test_tensorflow_checkpoint_damage_is_reported_with_file_and_tensor(tf_checkpoint, tmp_path):
    folder, _ = tf_checkpoint
    for name in ("hparams.json", "checkpoint", "model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    data = tmp_path / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.data-00000-of-00001: tensor '.*': the file is truncated"):
        from_pretrained(tmp_path)

    index = tmp_path / "model.ckpt.index"
    original = (folder / "model.ckpt.index").read_bytes()
    flipped = bytearray(original)
    flipped[40] ^= 0xFF
    index.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: checksum mismatch"):
        from_pretrained(tmp_path)
    index.write_bytes(original[:-10])
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: not a TensorFlow checkpoint index"):
        from_pretrained(tmp_path)

    index.write_bytes(original)
    (tmp_path / "hparams.json").write_text(json.dumps({"n_vocab": 53, "n_ctx": 16, "n_embd": 32, "n_head": 4,
                                                       "n_layer": 3}))
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: holds 2 transformer blocks but hparams\.json "
                                              r"says n_layers=3"):
        from_pretrained(tmp_path)


def test_a_corrupt_tensor_fails_its_checksum(tf_checkpoint, tmp_path):
    folder, _ = tf_checkpoint
    for name in ("hparams.json", "checkpoint", "model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    data = tmp_path / "model.ckpt.data-00000-of-00001"
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01  # one bit, inside some tensor: same length, other values
    data.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.data-00000-of-00001: tensor '.*': checksum mismatch"):
        from_pretrained(tmp_path)


# ---------------------------------------------------------------- saving

def test_save_pretrained_is_read_by_transformers_and_by_fastgpt(tmp_path):
    torch.manual_seed(6)
    ours = GPTModel(TINY).eval()  # no QKV bias and its own output head, as the seed builds it
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["tie_word_embeddings"], config["qkv_bias"]) == (False, False)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert_same_logits(ours, hf)
    again = from_pretrained(tmp_path)
    assert again.cfg == ours.cfg
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert not list(tmp_path.glob(".*.tmp"))  # written under temporary names, then renamed


def test_a_tied_model_is_saved_with_one_embedding(tmp_path):
    hf = hf_gpt2(seed=7)
    hf.save_pretrained(tmp_path / "hf")
    from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "ours")
    assert "lm_head.weight" not in load_file(tmp_path / "ours" / "model.safetensors")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["tie_word_embeddings"] is True
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    assert_same_logits(from_pretrained(tmp_path / "ours"), reloaded)
    idx = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(idx).logits, hf(idx).logits)


def test_dtype_device_and_config_overrides(tmp_path):
    hf_gpt2().save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.float64, device="cpu", drop_rate=0.0)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.cfg["drop_rate"] == 0.0
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['n_head'\]"):
        from_pretrained(tmp_path, n_head=4)
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype, got torch.int64"):
        from_pretrained(tmp_path, dtype=torch.int64)


MEMORY_PROBE = """
import resource, sys
import fastgpt
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = fastgpt.from_pretrained(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = sum(p.numel() * p.element_size() for p in model.parameters())
print((after - before) * 1024, size)
"""


def test_loading_costs_the_models_size_in_memory_not_twice_it(tmp_path):
    cfg = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 256, "n_heads": 4, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True}
    GPTModel(cfg).save_pretrained(tmp_path)
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    peak_growth, model_bytes = (int(x) for x in probe.stdout.split())
    assert model_bytes > 100e6
    assert peak_growth < 1.3 * model_bytes, f"peak memory grew {peak_growth / 1e6:.0f} MB for a " \
                                            f"{model_bytes / 1e6:.0f} MB model"


# ---------------------------------------------------------------- bad checkpoints

@pytest.fixture
def hf_folder(tmp_path):
    hf_gpt2(seed=9).save_pretrained(tmp_path)
    return tmp_path


def rewrite_weights(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    # New weights for the same config, by hand: release the hash fastgpt's save recorded (if any).
    config = json.loads((folder / "config.json").read_text())
    config.pop("fastgpt_weights_sha256", None)
    (folder / "config.json").write_text(json.dumps(config))
    return path


def test_missing_paths_and_weights_are_named(tmp_path, hf_folder):
    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path / 'nope'} does not exist"):
        from_pretrained(tmp_path / "nope")
    (hf_folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="config.json but no weights"):
        from_pretrained(hf_folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        from_pretrained(empty)


def test_a_wrong_shape_names_file_and_tensor_before_any_data_is_read(hf_folder, monkeypatch):
    path = rewrite_weights(hf_folder, lambda t: t.update({"transformer.h.1.mlp.c_fc.weight": torch.zeros(64, 255)}))
    monkeypatch.setattr(SafetensorsFile, "read", lambda *_: pytest.fail("data was read before the shapes were checked"))
    with pytest.raises(CheckpointError) as info:
        from_pretrained(hf_folder)
    assert str(info.value) == (f"{path}: tensor 'transformer.h.1.mlp.c_fc.weight': has shape (64, 255), expected "
                               "(64, 256) for vocab_size 97, context_length 40, emb_dim 64, n_layers 2")
    assert info.value.tensor == "transformer.h.1.mlp.c_fc.weight"


def test_a_truncated_safetensors_file_names_the_cut_tensor(hf_folder):
    path = hf_folder / "model.safetensors"
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    last = max((name for name in header if name != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{last}': the file is truncated"):
        from_pretrained(hf_folder)
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        from_pretrained(hf_folder)


def test_another_architecture_is_refused(hf_folder, tmp_path):
    config = json.loads((hf_folder / "config.json").read_text())
    (hf_folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'llama' is not GPT-2"):
        from_pretrained(hf_folder)
    llama_like = tmp_path / "llama.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4), "lm_head.weight": torch.zeros(4, 4)}, llama_like)
    with pytest.raises(CheckpointError, match=r"llama\.safetensors: not a GPT-2 state dict.*'model.embed_tokens"):
        from_pretrained(llama_like)


def test_missing_unexpected_and_non_gpt2_tensors_are_named(hf_folder, tmp_path):
    rewrite_weights(hf_folder, lambda t: t.update({"score.weight": torch.zeros(2, 64)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor\(s\) 'score\.weight': "
                                              "not GPT-2 as fastgpt builds it"):
        from_pretrained(hf_folder)
    state = RefGPTModel(TINY).state_dict()
    del state["trf_blocks.1.norm2.shift"]
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'model.pth'}: tensor 'trf_blocks\.1\.norm2\.shift': "
                                              "is missing"):
        from_pretrained(tmp_path / "model.pth", n_heads=4)
    (tmp_path / "cut.pth").write_bytes((tmp_path / "model.pth").read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cut.pth: cannot be read as a torch.save file, truncated or damaged"):
        from_pretrained(tmp_path / "cut.pth")


def test_values_that_contradict_the_config_are_refused(tmp_path):
    GPTModel(TINY).save_pretrained(tmp_path)  # qkv_bias false: zero c_attn biases
    rewrite_weights(tmp_path, lambda t: t["transformer.h.0.attn.c_attn.bias"].add_(1.0))
    with pytest.raises(CheckpointError, match=r"tensor 'transformer\.h\.0\.attn\.c_attn\.bias': the config says "
                                              "qkv_bias false but this bias is not zero"):
        from_pretrained(tmp_path)
    state = RefGPTModel(TINY).state_dict()
    state["trf_blocks.0.att.mask"] = torch.zeros_like(state["trf_blocks.0.att.mask"])
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match=r"model\.pth: trf_blocks\.0\.att\.mask is not the causal mask"):
        from_pretrained(tmp_path / "model.pth", n_heads=4)
    assert fastgpt.CheckpointError is CheckpointError and issubclass(CheckpointError, ValueError)


# ---------------------------------------------------------------- the loaded layout

def test_query_key_and_value_are_views_of_gpt2s_c_attn_and_train_as_the_seeds_layout(tmp_path, monkeypatch):
    hf_gpt2(seed=10).save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, drop_rate=0.0)
    built = GPTModel(loaded.cfg).eval()
    built.load_state_dict(loaded.state_dict())  # same values, the constructor's (out, in) layout
    att = loaded.trf_blocks[0].att
    parts = [att.W_query, att.W_key, att.W_value]
    # The seed's three parameters, read straight into GPT-2's (in, 3·out) c_attn tensor: views, no copy.
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in built.named_parameters()]
    assert all(p.weight.stride() == (1, 3 * 64) for p in parts)
    assert len({p.weight.untyped_storage().data_ptr() for p in parts}) == 1
    assert [p.weight.storage_offset() for p in parts] == [0, 64, 128]
    assert built.trf_blocks[0].att.W_query.weight.is_contiguous()
    widths = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: (widths.append(w.shape[0]),
                                                                               real_linear(x, w, b))[1])
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert rel_err(loaded(idx), built(idx)) <= 1e-6
    # Three matmuls per block, as in the seed (out_proj and ff.layers[2] are the other 64-wide ones), per model.
    assert widths.count(64) == 2 * 2 * (3 + 2) and 3 * 64 not in widths
    # Training: the same gradients and steps in both layouts, each parameter its own.
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-2) for model in (loaded, built)]
    for model, optimizer in zip((loaded, built), optimizers):
        model.train()
        torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(1).flatten()).backward()
        optimizer.step()
    for (name, a), b in zip(loaded.named_parameters(), built.parameters()):
        assert rel_err(a.grad, b.grad) <= 1e-5, name
        assert rel_err(a, b) <= 1e-6, name
    with torch.no_grad():  # the step went into the shared buffer, in place: still views of it
        assert rel_err(loaded.eval()(idx), built.eval()(idx)) <= 1e-5
    assert att.W_key.weight.storage_offset() == 64


# ---------------------------------------------------------------- GPT2Config settings that change the maths

def test_layer_norm_epsilon_is_computed_and_saved_back(tmp_path):
    hf = hf_gpt2(seed=11)
    hf.config.layer_norm_epsilon = 1e-2  # far from 1e-5: ignoring it would show in the logits
    hf = transformers.GPT2LMHeadModel(hf.config).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    assert {m.eps for m in ours.modules() if isinstance(m, fastgpt.LayerNorm)} == {1e-2}
    assert_same_logits(ours, hf)
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["layer_norm_epsilon"] == 1e-2
    assert_same_logits(from_pretrained(tmp_path / "ours"), hf)
    with pytest.raises(ValueError, match=r"layer_norm_epsilon=0\.01: a GPTModel built from a config dict uses 1e-05"):
        config_from_hf_gpt2(hf.config)


def test_reorder_and_upcast_attn_computes_the_same_logits(tmp_path):
    config = hf_gpt2(seed=12).config
    config.reorder_and_upcast_attn = True
    torch.manual_seed(12)
    hf = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").eval()  # where it applies
    hf.save_pretrained(tmp_path)
    assert_same_logits(from_pretrained(tmp_path), hf)


def test_dropout_rates_that_differ_need_a_choice(hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    (hf_folder / "config.json").write_text(json.dumps({**config, "attn_pdrop": 0.0}))
    with pytest.raises(CheckpointError, match=r"config\.json: .*resid_pdrop=0\.1, embd_pdrop=0\.1, attn_pdrop=0\.0 "
                                              r"differ; fastgpt has one drop_rate.*pass drop_rate="):
        from_pretrained(hf_folder)
    assert from_pretrained(hf_folder, drop_rate=0.0).cfg["drop_rate"] == 0.0


# ---------------------------------------------------------------- shards

def test_a_sharded_checkpoint_loads(tmp_path):
    hf = hf_gpt2(seed=13)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert_same_logits(from_pretrained(tmp_path), hf)


# ---------------------------------------------------------------- what saving costs and writes

def test_save_pretrained_never_holds_two_attention_masks_at_once(tmp_path, monkeypatch):
    # The seed's att.mask is context × context per layer: 256 MiB each at context 8192.
    alive = []
    real_mask = fastgpt.seed_compat.causal_mask

    def recording_mask(*args, **kwargs):
        assert not [ref for ref in alive if ref() is not None], "an earlier layer's mask is still alive"
        mask = real_mask(*args, **kwargs)
        alive.append(weakref.ref(mask))
        return mask

    model = GPTModel({**TINY, "n_layers": 3})
    monkeypatch.setattr(fastgpt.seed_compat, "causal_mask", recording_mask)
    model.save_pretrained(tmp_path)
    assert len(alive) <= 3
    monkeypatch.undo()
    assert "trf_blocks.0.att.mask" in model.state_dict()  # state_dict() itself is unchanged


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_saved_files_respect_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        GPTModel(TINY).save_pretrained(tmp_path)
    finally:
        os.umask(previous)
    assert {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("config.json", "model.safetensors")} == \
        {"config.json": mode, "model.safetensors": mode}


def test_save_pretrained_never_builds_the_seeds_mask(tmp_path, monkeypatch):
    # The context × context att.mask is left out of the files: saving must not build it at all
    # (at context 8192 each layer's would be 256 MiB).
    import fastgpt.seed_compat as seed_compat

    def no_mask(*args, **kwargs):
        raise AssertionError("save_pretrained built an att.mask")
    model = fastgpt.GPTModel(dict(TINY))
    monkeypatch.setattr(seed_compat, "causal_mask", no_mask)
    model.save_pretrained(tmp_path / "saved")
    with pytest.raises(AssertionError, match="built an att.mask"):
        model.state_dict()  # the seed's state dict still carries it
    monkeypatch.undo()
    assert "trf_blocks.0.att.mask" in model.state_dict()


# ---------------------------------------------------------------- a checkpoint folder is one unit

def two_heads_model(seed=11):
    """TINY with 2 heads, not 4: loaded with the other config, it computes another model."""
    torch.manual_seed(seed)
    return GPTModel({**TINY, "n_heads": 2}).eval()


@pytest.fixture(params=["transformers", "fastgpt"])
def old_checkpoint(request, tmp_path):
    """A folder holding a 4-head checkpoint, saved by transformers (no weights hash) or by fastgpt."""
    folder = tmp_path / "checkpoint"
    if request.param == "transformers":
        hf_gpt2(seed=3, heads=4).save_pretrained(folder)
    else:
        torch.manual_seed(3)
        GPTModel(TINY).save_pretrained(folder)
    (folder / "notes.txt").write_text("the user's own file")
    return folder


def test_a_save_interrupted_between_the_two_renames_is_refused_never_a_mix(old_checkpoint, monkeypatch):
    real_replace, calls = os.replace, []

    def crash_on_the_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies here
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        two_heads_model().save_pretrained(old_checkpoint)
    monkeypatch.undo()
    assert len(calls) == 2
    with pytest.raises(CheckpointError, match="the two files come from different saves: a save into this folder "
                                              "was interrupted"):
        from_pretrained(old_checkpoint)
    two_heads_model().save_pretrained(old_checkpoint)  # saving again repairs it
    again = from_pretrained(old_checkpoint)
    assert again.cfg["n_heads"] == 2
    assert_same_logits_as(again, two_heads_model())
    assert sorted(p.name for p in old_checkpoint.iterdir()) == \
        sorted({"config.json", "model.safetensors", "notes.txt"} | {p.name for p in old_checkpoint.glob("*.json")})
    assert (old_checkpoint / "notes.txt").read_text() == "the user's own file"


def assert_same_logits_as(model, expected):
    idx = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), expected(idx))


class DiskFull:
    """An ``open`` for saving.py whose files' writes fail with ENOSPC once a file named ``prefix``... is written."""

    def __init__(self, prefix):
        self.prefix = prefix

    def __call__(self, path, *args, **kwargs):
        f = open(path, *args, **kwargs)
        if not os.path.basename(path).startswith(self.prefix):
            return f
        prefix = self.prefix

        class Full:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), prefix)

            def __getattr__(self, name):
                return getattr(f, name)
        return Full()


@pytest.mark.parametrize("full_at", [".config.json", ".model.safetensors"])
def test_a_full_disk_is_an_oserror_and_leaves_the_old_checkpoint_whole(old_checkpoint, monkeypatch, full_at):
    import fastgpt.checkpoints.saving as saving

    before = {p.name: p.read_bytes() for p in old_checkpoint.iterdir()}
    old_logits = from_pretrained(old_checkpoint)
    monkeypatch.setattr(saving, "open", DiskFull(full_at), raising=False)
    with pytest.raises(OSError) as info:
        two_heads_model().save_pretrained(old_checkpoint)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in old_checkpoint.iterdir()} == before  # no temporary file left either
    assert_same_logits_as(from_pretrained(old_checkpoint), old_logits)


def test_temporary_files_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    stale = [tmp_path / f".model.safetensors.{dead_pid}.0123456789ab.tmp",
             tmp_path / f".config.json.{dead_pid}.ba9876543210.tmp"]
    alive = tmp_path / f".model.safetensors.{os.getppid()}.00112233aabb.tmp"  # a save still running elsewhere
    unrelated = tmp_path / ".model.safetensors.backup"
    for path in (*stale, alive, unrelated):
        path.write_bytes(b"partial")
    GPTModel(TINY).save_pretrained(tmp_path)
    assert not any(p.exists() for p in stale)
    assert alive.exists() and unrelated.exists()


def test_weights_that_are_not_their_configs_are_refused(tmp_path):
    GPTModel(TINY).save_pretrained(tmp_path / "a")
    two_heads_model().save_pretrained(tmp_path / "b")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert len(config["fastgpt_weights_sha256"]) == 64
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"a/model\.safetensors: does not match config\.json \(sha256"):
        from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").unlink()  # older weights in another format remain beside the config
    torch.save(hf_gpt2(seed=1).state_dict(), tmp_path / "a" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="records the sha256 of the model.safetensors saved with it, but the "
                                              "folder has no model.safetensors"):
        from_pretrained(tmp_path / "a")


def test_a_folder_transformers_rewrote_from_ours_still_loads(tmp_path):
    """transformers copies unknown config keys (the hash, now stale) into what it saves, beside its own
    transformers_version: such a config binds no weights."""
    GPTModel(TINY).save_pretrained(tmp_path / "ours")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        hf.transformer.wte.weight[0, 0] += 1.0
    hf.save_pretrained(tmp_path / "theirs")
    config = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert "fastgpt_weights_sha256" in config and "transformers_version" in config
    assert_same_logits(from_pretrained(tmp_path / "theirs"), hf.eval())


def test_saving_a_meta_device_model_is_a_clear_error_and_makes_no_folder(tmp_path):
    with torch.device("meta"):
        model = GPTModel(TINY)
    with pytest.raises(ValueError, match=r"the model is on the meta device \('tok_emb.weight' holds a shape but "
                                         "no values\\), so there are no weights to save"):
        model.save_pretrained(tmp_path / "new" / "folder")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- torch.save files: nothing trusted

def torch_archive(path, pickled: bytes, storages: dict = (), compress=zipfile.ZIP_STORED):
    """A zip laid out as torch.save lays it out, holding ``pickled`` as data.pkl and ``storages``
    (key -> number of zero bytes, written in 1 MiB pieces) as data/<key>."""
    with zipfile.ZipFile(path, "w", compression=compress) as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        for key, size in dict(storages).items():
            with archive.open(f"archive/data/{key}", "w", force_zip64=True) as out:
                for start in range(0, size, 2**20):
                    out.write(bytes(min(2**20, size - start)))
        archive.writestr("archive/version", "3\n")
    return path


class _FakeStorage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class _FakeTensor:
    """Pickles as torch.save pickles a float32 tensor over storage ``key`` -- without one in memory."""

    def __init__(self, key, shape):
        self.storage, self.shape = _FakeStorage(key, int(np.prod(shape))), tuple(shape)

    def __reduce__(self):
        strides = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, strides, False,
                                                 collections.OrderedDict())


class _StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _FakeStorage):
            return "storage", torch.FloatStorage, obj.key, "cpu", obj.numel
        return None


def state_dict_pickle(shapes: dict) -> bytes:
    out = io.BytesIO()
    _StoragePickler(out, protocol=2).dump({name: _FakeTensor(str(i), shape) for i, (name, shape)
                                           in enumerate(shapes.items())})
    return out.getvalue()


INFLATION_PROBE = """
import resource, sys
import fastgpt
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    fastgpt.from_pretrained(sys.argv[1])
except fastgpt.CheckpointError as err:
    print(str(err).replace(chr(10), " "))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_a_small_compressed_pth_is_refused_before_its_tensors_are_inflated(tmp_path):
    """250 MB of zeros deflate to a quarter of a megabyte: the wrong shape is refused from the pickle and
    the zip's directory, before any tensor byte is inflated."""
    numel = 62_500_000  # 250 MB of float32
    shapes = {"tok_emb.weight": (numel // 50, 50), "pos_emb.weight": (8, 50)}
    path = torch_archive(tmp_path / "bomb.pth", state_dict_pickle(shapes),
                         {"0": numel * 4, "1": 8 * 50 * 4}, compress=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 600_000
    probe = subprocess.run([sys.executable, "-c", INFLATION_PROBE, str(path)], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    message, growth = probe.stdout.splitlines()
    assert "bomb.pth" in message and "emb_dim 50 is no released GPT-2 width" in message, message
    assert int(growth) < 60e6, f"peak memory grew {int(growth) / 1e6:.0f} MB while refusing a {numel * 4 / 1e6:.0f} MB tensor"


def test_tensor_bytes_are_read_only_after_every_name_and_shape_is_checked(tmp_path, monkeypatch):
    from fastgpt.checkpoints import torch_format

    torch.manual_seed(0)
    state = RefGPTModel(TINY).state_dict()
    state["trf_blocks.1.ff.layers.0.weight"] = torch.zeros(3, 3)  # the last thing a loader would reach
    torch.save(state, tmp_path / "wrong.pth")
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append(
        getattr(name, "filename", name)) or real_open(self, name, *a, **k))
    with pytest.raises(CheckpointError, match=r"wrong\.pth: tensor 'trf_blocks\.1\.ff\.layers\.0\.weight'"):
        from_pretrained(tmp_path / "wrong.pth", n_heads=4)
    assert opened and not [name for name in opened if "/data/" in name], opened  # the pickle, no storage


SYSTEM_CALL = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R."  # os.system("true")


@pytest.mark.parametrize("form", ["zip", "bare pickle"])
def test_a_pickle_that_names_a_blocked_global_is_refused_by_name(tmp_path, form, monkeypatch):
    import os as os_module

    monkeypatch.setattr(os_module, "system", lambda *a: pytest.fail("os.system ran"))
    path = tmp_path / "evil.pth"
    if form == "zip":
        torch_archive(path, SYSTEM_CALL)
    else:
        path.write_bytes(SYSTEM_CALL)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused: the file asks to run (os|posix)\.system, to "
                                              "build a Python object besides tensors"):
        from_pretrained(path)


@pytest.mark.parametrize("what, shapes, storages, message", [
    ("a storage smaller than its tensor", {"a": (4, 4)}, {"0": 15 * 4}, "storage '0' holds 60 bytes but the pickle "
                                                                        "says 16 elements"),
    ("a storage missing from the archive", {"a": (2,)}, {}, "storage '0' is not in the archive"),
])
def test_a_pth_whose_pickle_and_archive_disagree_is_refused(tmp_path, what, shapes, storages, message):
    path = torch_archive(tmp_path / "odd.pth", state_dict_pickle(shapes), storages)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        from_pretrained(path)


# ---------------------------------------------------------------- TensorFlow indexes: nothing trusted

def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def proto(*fields) -> bytes:
    """A protobuf message from (number, value) pairs: ints as varints, bytes length-delimited."""
    out = b""
    for number, value in fields:
        if isinstance(value, int):
            out += _varint_bytes(number << 3) + _varint_bytes(value)
        else:
            out += _varint_bytes(number << 3 | 2) + _varint_bytes(len(value)) + value
    return out


def sstable(entries: dict) -> bytes:
    """A LevelDB table as TensorFlow writes a checkpoint index: one data block, its index block, the footer."""
    from fastgpt.checkpoints.tensorflow_format import _TABLE_MAGIC, _masked_crc32c

    def block(items):
        body = b"".join(_varint_bytes(0) + _varint_bytes(len(k)) + _varint_bytes(len(v)) + k + v for k, v in items)
        return body + (0).to_bytes(4, "little") + (1).to_bytes(4, "little")  # one restart point, at 0

    def with_trailer(body):
        return body + b"\0" + _masked_crc32c(body + b"\0").to_bytes(4, "little")

    items = sorted(entries.items())
    data_block = block(items)
    index_block = block([(items[-1][0], _varint_bytes(0) + _varint_bytes(len(data_block)))])
    index_offset = len(data_block) + 5
    handles = _varint_bytes(0) + _varint_bytes(0) + _varint_bytes(index_offset) + _varint_bytes(len(index_block))
    footer = handles + bytes(40 - len(handles)) + _TABLE_MAGIC.to_bytes(8, "little")
    return with_trailer(data_block) + with_trailer(index_block) + footer


def tensor_entry(shape=(2, 3), dtype=1, shard=0, offset=0, size=None):
    shape_message = proto(*((2, proto((1, n))) for n in shape))
    return proto((1, dtype), (2, shape_message), (3, shard), (4, offset),
                 (5, int(np.prod(shape)) * 4 if size is None else size))


def tf_folder(tmp_path, header=proto((1, 1)), **entries):
    (tmp_path / "hparams.json").write_text(json.dumps({"n_vocab": 53, "n_ctx": 16, "n_embd": 32, "n_head": 4,
                                                       "n_layer": 1}))
    index = {b"": header, **{name.encode(): value for name, value in entries.items()}}
    (tmp_path / "model.ckpt.index").write_bytes(sstable(index))
    return tmp_path


def test_a_tiny_index_claiming_a_trillion_shards_is_refused_at_once(tmp_path):
    folder = tf_folder(tmp_path, header=proto((1, 10**12)), **{"model/wte": tensor_entry()})
    assert (folder / "model.ckpt.index").stat().st_size < 1500
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: malformed index: the header's shard count must "
                                              r"be an integer in \[0, 100000\], got 1000000000000"):
        from_pretrained(folder)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("what, entry, message", [
    ("a shape given as a number", proto((1, 1), (2, 7)), "the shape must be a message, got 7"),
    ("a dimension given as a number", proto((1, 1), (2, proto((2, 5)))), "a dimension must be a message, got 5"),
    ("a dtype given as bytes", proto((1, b"float"), (2, b"")), "the dtype must be an integer in [0, 2147483648], "
                                                               "got 5 bytes"),
    ("an offset given as bytes", proto((1, 1), (2, b""), (4, b"12")), "the byte offset must be an integer"),
    ("a shard past the header's count", tensor_entry(shard=3), "the shard number must be an integer in [0, 0], got 3"),
    ("a dimension of 2**62", tensor_entry(shape=(2**62,)), "a dimension's size must be an integer in [0, "
                                                           "1099511627776], got 4611686018427387904"),
    ("a dimension of -1 (an unknown size)", tensor_entry(shape=(2**64 - 1,)), "a dimension's size must be"),
    ("70 dimensions", tensor_entry(shape=(1,) * 70), "70 dimensions (at most 64)"),
    ("a truncated entry", tensor_entry()[:-1], "malformed index entry (truncated"),
    ("a varint of 11 bytes", b"\x08" + b"\xff" * 10 + b"\x01", "a varint longer than 10 bytes"),
])
def test_malformed_index_fields_name_the_file_and_the_tensor(tmp_path, what, entry, message):
    folder = tf_folder(tmp_path, **{"model/wte": entry})
    with pytest.raises(CheckpointError) as info:
        from_pretrained(folder)
    assert f"model.ckpt.index: tensor 'model/wte': " in str(info.value) and message in str(info.value), \
        str(info.value)


def test_a_malformed_index_header_names_the_file(tmp_path):
    for header, message in [(proto((1, b"x")), "the header's shard count must be an integer"),
                            (proto((2, 7)), "the header's endianness must be an integer in [0, 1], got 7"),
                            (proto((1, 0)), "the header's shard count is 0"),
                            (b"\x0a\x05ab", "corrupt checkpoint index header (truncated")]:
        with pytest.raises(CheckpointError) as info:
            from_pretrained(tf_folder(tmp_path, header=header, **{"model/wte": tensor_entry()}))
        assert "model.ckpt.index: " in str(info.value) and message in str(info.value), str(info.value)

"""Checkpoints on disk: Hugging Face folders, seed state dicts, OpenAI's TensorFlow release; saving; bad files.

Every file here is written for real by the tool that writes it in the wild:
transformers' ``save_pretrained``, ``torch.save``, safetensors, and TensorFlow
itself (in a subprocess, when the ``tf`` extra is installed).
"""

import importlib.util
import json
import os
import subprocess
import sys
import warnings
import weakref

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
    # ... and query/key/value side by side in one (in, 3·out) buffer, as GPT-2's c_attn.
    weight, bias = ours.trf_blocks[0].att.qkv.weight, ours.trf_blocks[0].att.qkv.bias
    assert weight.shape == (3 * TINY["emb_dim"], TINY["emb_dim"]) and weight.stride() == (1, 3 * TINY["emb_dim"])
    assert torch.equal(bias, torch.cat([state[f"trf_blocks.0.att.{n}.bias"] for n in ("W_query", "W_key", "W_value")]))
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

def test_the_fused_query_key_value_matmul_serves_inference_and_training_stays_exact(tmp_path, monkeypatch):
    hf_gpt2(seed=10).save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, drop_rate=0.0)
    built = GPTModel(loaded.cfg).eval()
    built.load_state_dict(loaded.state_dict())  # same values, the constructor's (3·out, in) layout
    assert loaded.trf_blocks[0].att.qkv.weight.stride() == (1, 3 * 64)  # GPT-2's c_attn layout, kept
    assert built.trf_blocks[0].att.qkv.weight.is_contiguous()
    widths = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: (widths.append(w.shape[0]),
                                                                               real_linear(x, w, b))[1])
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert rel_err(loaded(idx), built(idx)) <= 1e-6
    # One matmul for query, key and value in each of the two blocks, in both layouts ...
    assert widths.count(3 * 64) == 4 and 64 in widths
    widths.clear()
    # ... and in training too, with the same gradients and steps in both layouts.
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-2) for model in (loaded, built)]
    for model, optimizer in zip((loaded, built), optimizers):
        model.train()
        torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(1).flatten()).backward()
        optimizer.step()
    assert widths.count(3 * 64) == 4
    for (name, a), b in zip(loaded.named_parameters(), built.parameters()):
        assert rel_err(a.grad, b.grad) <= 1e-5, name
        assert rel_err(a, b) <= 1e-6, name


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

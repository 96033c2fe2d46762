"""Bad input everywhere: every public entry point, given the wrong type, shape, dtype or device,
NaN, an empty or absurd value, or an unknown name, raises a clear error naming the problem --
or returns its documented result -- and never hangs or crashes inside a kernel.

One table, one test. Each row calls one entry point and expects either
``error`` (an exception of that type whose message contains ``fragment``) or,
for a documented result, ``check(result)`` to hold. Rows with ``triton=True``
run with every op forced to Triton: the kernels themselves, under the
interpreter where there is no GPU. Every row runs under a deadline.
"""

import contextlib
import functools
import io
import itertools
import json
import os
import shutil
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

import fastgpt
from fastgpt import (
    CheckpointError, DummyGPTModel, GPTModel, KVCache, from_pretrained, generate, generate_stream, get_tokenizer,
    gpt2_config, ops, save_pretrained, text_to_token_ids, token_ids_to_text, validate_config,
)
from fastgpt.cli import main as cli_main
from fastgpt.checkpoints.safetensors_format import SafetensorsFile
from helpers import TINY, kernel_device

V, CTX = TINY["vocab_size"], TINY["context_length"]
EOT = 50256  # GPT-2's <|endoftext|>
DEADLINE_S = 60


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[], Any]
    error: Optional[type] = None  # the exception expected ...
    fragment: str = ""  # ... and a piece of its message
    check: Optional[Callable[[Any], None]] = None  # or: what the documented result satisfies
    absent: Optional[str] = None  # a piece the error message must not hold (misleading advice)
    triton: bool = False  # every op forced to Triton
    needs_cuda: bool = False

    def __post_init__(self):
        assert (self.error is None) != (self.check is None), f"{self.id}: expect an error or a result, not both"


def raises(id, call, error, fragment, **kwargs) -> Case:
    return Case(id, call, error=error, fragment=fragment, **kwargs)


def returns(id, call, check, **kwargs) -> Case:
    return Case(id, call, check=check, **kwargs)


# ---------------------------------------------------------------- what the rows call

def model(cfg=TINY, model_class=GPTModel, device="cpu"):
    torch.manual_seed(0)
    return model_class(cfg).to(device).eval()


def forward_without_compute(model_class, in_idx, device="cpu"):
    """model(in_idx), where reaching the embedding fails: bad ids must be refused before any compute."""
    m = model(model_class=model_class, device=device)
    m.tok_emb.forward = lambda *_: pytest.fail("the embedding ran on bad input")
    return m(in_idx)


def eos_model(cfg):
    """A model whose every next token is id ``cfg['vocab_size'] - 1``: the final norm outputs ones
    (scale 0, shift 1) and only that row of the output head is non-zero."""
    m = model(cfg)
    with torch.no_grad():
        m.final_norm.scale.zero_()
        m.final_norm.shift.fill_(1.0)
        m.out_head.weight.zero_()
        m.out_head.weight[-1] = 1.0
    return m


_scratch = {}


@functools.cache
def eos_checkpoint() -> str:
    """A tiny GPT-2-vocabulary checkpoint that always says <|endoftext|>."""
    folder = _scratch["dir"] / "eos-checkpoint"
    eos_model({"vocab_size": EOT + 1, "context_length": 16, "emb_dim": 32, "n_heads": 1, "n_layers": 1,
               "drop_rate": 0.0, "qkv_bias": False}).save_pretrained(folder)
    return str(folder)


class CLIError(Exception):
    """``fastgpt`` exited non-zero; the message is its exit status and what it printed on stderr."""


def cli(*args):
    """Run the ``fastgpt`` command in-process; return (stdout, stderr), or raise CLIError."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli_main(list(args))
        except SystemExit as stop:
            status = stop.code
    assert "Traceback" not in err.getvalue(), err.getvalue()
    if status:
        raise CLIError(f"exit status {status}: {err.getvalue()}")
    return out.getvalue(), err.getvalue()


# ---------------------------------------------------------------- checkpoint files the rows write

def scratch(name: str) -> Path:
    return _scratch["dir"] / name


@functools.cache
def saved_tiny() -> Path:
    """A tiny GPT-2 folder as fastgpt saves it (config.json + model.safetensors), to copy and damage."""
    folder = scratch("tiny-saved")
    model().save_pretrained(folder)
    return folder


def folder_with(name: str, config_text: Optional[str] = None, **changes) -> str:
    """A copy of ``saved_tiny()`` whose config.json gets ``changes`` (or is ``config_text``)."""
    folder = scratch(name)
    shutil.copytree(saved_tiny(), folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(config_text or json.dumps({**config, **changes}))
    return str(folder)


def seed_models_dir() -> Path:
    """A folder laid out as the seed's models_dir: size subfolders, no checkpoint of its own."""
    (scratch("models") / "124M").mkdir(parents=True, exist_ok=True)
    return scratch("models")


def fifo(path: Path) -> Path:
    """A named pipe at ``path``: opening it to read blocks until a writer comes, which never does."""
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def folder_with_fifo(name: str, file: str) -> str:
    folder = folder_with(name)
    fifo(Path(folder) / file)
    return folder


def file_with(name: str, content: bytes) -> str:
    scratch(name).write_bytes(content)
    return str(scratch(name))


def pickled_object_file() -> str:
    torch.save({"model": torch.nn.Linear(2, 2)}, scratch("module.pth"))  # a module, not its state dict
    return str(scratch("module.pth"))


def _tensor(begin, end, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


# Safetensors files the safetensors library refuses: (header, data bytes, what fastgpt says).
MALFORMED_SAFETENSORS = {
    "overlapping byte ranges": ({"a": _tensor(0, 8), "b": _tensor(4, 12)}, 12, "its bytes overlap those of tensor 'a'"),
    "two tensors on the same bytes": ({"a": _tensor(0, 8), "b": _tensor(0, 8)}, 8, "its bytes overlap those of"),
    "bytes between tensors": ({"a": _tensor(0, 8), "b": _tensor(12, 20)}, 20, "bytes 8..12 of the data before"),
    "trailing bytes": ({"a": _tensor(0, 8)}, 12, "4 trailing bytes after the last tensor"),
    "a float in a shape": ({"a": _tensor(0, 8, [2.0])}, 8, "malformed header entry"),
    "a string in a shape": ({"a": _tensor(0, 8, ["2"])}, 8, "malformed header entry"),
    "a bool in a shape": ({"a": _tensor(0, 4, [True])}, 4, "malformed header entry"),
    "a negative offset": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, 8,
                          "malformed header entry"),
    "metadata that is a list": ({"__metadata__": ["x"], "a": _tensor(0, 8)}, 8, "__metadata__ must map strings"),
    "metadata with a number": ({"__metadata__": {"x": 1}, "a": _tensor(0, 8)}, 8, "__metadata__ must map strings"),
    "a header nested 100,000 deep": (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 0,
                                     "JSON nested too deeply"),
}


def raw_safetensors(name: str, header, data_bytes: int) -> str:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return file_with(f"{name}.safetensors", len(text).to_bytes(8, "little") + text + bytes(data_bytes))


def sharded_folder(name: str, shard_name: Callable[[Path], object], link_outside: bool = False) -> str:
    """saved_tiny() as one shard plus an index whose weight_map names ``shard_name(folder)`` for every tensor."""
    folder = scratch(name)
    folder.mkdir(exist_ok=True)
    # The config without the weights hash fastgpt's save recorded: these are other files, by hand.
    config = json.loads((saved_tiny() / "config.json").read_text())
    config.pop("fastgpt_weights_sha256")
    (folder / "config.json").write_text(json.dumps(config))
    outside = scratch("outside.safetensors")
    shutil.copy(saved_tiny() / "model.safetensors", outside)
    if link_outside:
        (folder / "shard.safetensors").unlink(missing_ok=True)
        (folder / "shard.safetensors").symlink_to(outside)
    names = json.loads((outside.read_bytes()[8:8 + int.from_bytes(outside.read_bytes()[:8], "little")]))
    index = {"weight_map": {n: shard_name(folder) for n in names if n != "__metadata__"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(folder)


def caught_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught]


def inf_logit_model():
    """Every next-token logit is 0 but the last token's, which is +inf."""
    m = eos_model(TINY)
    with torch.no_grad():
        m.out_head.weight[-1] = float("inf")
    return m


def with_nan(t: torch.Tensor, index) -> torch.Tensor:
    t = t.clone()
    t[index] = float("nan")
    return t


def nan_in_final_norm(m):
    """``m`` with one NaN in a parameter every logit depends on."""
    with torch.no_grad():
        m.final_norm.shift[0] = float("nan")
    return m


def folder_left_by_failed_save(m, folder: Path) -> list:
    """The folders a save_pretrained that fails (with ValueError) leaves behind, of those it had to make."""
    with contextlib.suppress(ValueError):
        save_pretrained(m, folder)
    return [str(p) for p in (folder, folder.parent) if p.exists()]


def meta_model():
    with torch.device("meta"):
        return GPTModel(TINY)


def nan_in_query_weight(m):
    """``m`` with one NaN in the first block's query weight: only attention carries it onwards."""
    with torch.no_grad():
        m.trf_blocks[0].att.W_query.weight[0, 0] = float("nan")
    return m


def nan_exactly_where(mask_fn, op):
    """Check: the output is NaN exactly where ``mask_fn(out)`` says (the inputs the NaN reaches), the
    Triton kernel of ``op`` having produced it."""
    def check(out):
        assert ops.dispatch_counts[(op, "triton")] == 1, dict(ops.dispatch_counts)
        expected = mask_fn(out).to(out.device)
        assert torch.equal(torch.isnan(out), expected), torch.isnan(out).nonzero()
    return check


def only_row(out: torch.Tensor, head: int, row: int) -> torch.Tensor:
    """(batch, heads, seq, d) mask: True on one head's row."""
    mask = torch.zeros_like(out, dtype=torch.bool)
    mask[:, head, row] = True
    return mask


def equals(expected):
    def check(result):
        assert result == expected, result
    return check


# ---------------------------------------------------------------- the table

FORWARD_ROWS = [
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
    ("ids on meta, model on cpu", torch.ones(1, 2, dtype=torch.long, device="meta"), ValueError,
     "token ids are on meta but the model is on cpu"),
]

CONFIG_ROWS = [
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
    # Absurd sizes are refused before anything is allocated (256 GB here, or a 20,000-block build).
    ("context_length 10**9", {**TINY, "context_length": 10**9}, ValueError,
     "parameters (238 GiB in float32), more than fastgpt builds"),
    ("20,000 layers", {**TINY, "n_layers": 20_000}, ValueError,
     "config['n_layers'] is 20000, more than fastgpt builds"),
]

# The ops' inputs live where forced Triton runs: CUDA when present, else CPU tensors under the interpreter.
DEVICE = kernel_device()
x8 = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
w8, b8 = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
ids = torch.ones(1, 3, dtype=torch.long)
qkv = torch.randn(1, 2, 5, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)

CASES = [
    # The model: token ids, checked before any compute, for the model and its stand-in.
    *(raises(f"{cls.__name__}: {name}", functools.partial(forward_without_compute, cls, ids), error, fragment)
      for cls in (GPTModel, DummyGPTModel) for name, ids, error, fragment in FORWARD_ROWS),
    raises("cpu ids into a CUDA model", lambda: forward_without_compute(GPTModel, torch.ones(1, 2, dtype=torch.long),
                                                                        device="cuda"),
           ValueError, "token ids are on cpu but the model is on cuda:0", needs_cuda=True),
    raises("kv_cache of another type", lambda: model()(torch.ones(1, 2, dtype=torch.long), kv_cache="cache"),
           TypeError, "kv_cache must be a fastgpt.KVCache or None, got str"),
    returns("int32 ids at the full context", lambda: model()(torch.full((2, CTX), V - 1, dtype=torch.int32)),
            lambda logits: logits.shape == (2, CTX, V) or pytest.fail(str(logits.shape))),
    returns("a NaN parameter: NaN logits, no error",
            lambda: nan_in_final_norm(model())(torch.ones(1, 4, dtype=torch.long)),
            lambda logits: torch.isnan(logits).all() or pytest.fail("values are not checked: NaN flows through")),

    # Configs and presets.
    *(raises(f"{cls.__name__} config: {name}", functools.partial(cls, cfg), error, fragment)
      for cls in (GPTModel, DummyGPTModel) for name, cfg, error, fragment in CONFIG_ROWS),
    raises("unknown size", lambda: gpt2_config("gpt2-huge"), ValueError,
           "unknown GPT-2 size 'gpt2-huge'; choose one of gpt2-small"),
    raises("unknown config key", lambda: gpt2_config("124M", n_head=4), ValueError, "unknown config key(s) ['n_head']"),
    returns("extra config keys are allowed", lambda: validate_config({**TINY, "extra_key_from_a_notebook": 1}),
            equals(None)),

    # Backend names.
    raises("use_backend('fast')", lambda: fastgpt.use_backend("fast").__enter__(), ValueError,
           "unknown backend 'fast'; choose one of auto, triton, eager"),
    raises("set_backend(None)", lambda: fastgpt.set_backend(None), ValueError, "unknown backend None"),
    raises("backend spec with an unknown name", lambda: ops.parse_backend_spec("auto,gelu=fast"), ValueError,
           "unknown backend 'fast'"),
    raises("backend spec with two defaults", lambda: ops.parse_backend_spec("eager,triton"), ValueError,
           "conflicting default backends 'eager' and 'triton'"),
    raises("backend spec with two choices for one op", lambda: ops.parse_backend_spec("gelu=eager,gelu=triton"),
           ValueError, "conflicting backends for gelu: 'eager' and 'triton'"),

    # The ops, forced to Triton: the kernels refuse clearly, or compute the documented result.
    raises("layer_norm of a list", lambda: ops.layer_norm([[1.0] * 8], w8, b8), TypeError,
           "layer_norm: expected a torch.Tensor, got list", triton=True),
    raises("layer_norm of a 0-d tensor", lambda: ops.layer_norm(torch.tensor(1.0, device=DEVICE), w8, b8),
           fastgpt.BackendError,
           "a 0-dimensional input", triton=True),
    raises("layer_norm of integers", lambda: ops.layer_norm(x8.long(), w8, b8), fastgpt.BackendError,
           "input dtype torch.int64", triton=True),
    raises("layer_norm weight on another device", lambda: ops.layer_norm(x8, w8.to("meta"), b8), fastgpt.BackendError,
           f"inputs on different devices (input on {x8.device}, weight on meta", triton=True),
    returns("layer_norm of a row with NaN: that row is NaN", lambda: ops.layer_norm(with_nan(x8, (1, 3)), w8, b8),
            nan_exactly_where(lambda out: torch.arange(3)[:, None].eq(1).expand(3, 8), "layer_norm"), triton=True),
    returns("gelu of NaN and inf", lambda: ops.gelu(torch.tensor([float("nan"), float("inf"), 1.0], device=DEVICE)),
            lambda y: torch.testing.assert_close(y.cpu(), torch.tensor([float("nan"), float("inf"), 0.8412]),
                                                 equal_nan=True, rtol=0, atol=1e-4), triton=True),
    returns("gelu of a 0-d tensor", lambda: ops.gelu(torch.tensor(1.0, device=DEVICE)),
            lambda y: torch.testing.assert_close(y.cpu(), torch.tensor(0.8412), rtol=0, atol=1e-4), triton=True),
    raises("linear_gelu with a float16 weight",
           lambda: ops.linear_gelu(x8, torch.ones(4, 8, device=DEVICE).half(), torch.ones(4, device=DEVICE)),
           fastgpt.BackendError, "dtypes torch.float32/torch.float16/torch.float32 of input/weight/bias differ",
           triton=True),
    raises("linear_gelu of a 0-d tensor", lambda: ops.linear_gelu(torch.tensor(1.0, device=DEVICE),
                                                                  torch.ones(4, 8, device=DEVICE),
                                                                  torch.ones(4, device=DEVICE)),
           fastgpt.BackendError, "a 0-dimensional input", triton=True),
    *(raises(f"layer_norm eps {eps!r} ({path})", functools.partial(ops.layer_norm, x8, w8, b8, eps), error,
             f"layer_norm: eps must be {fragment}", triton=path == "triton")
      for path in ("eager", "triton")
      for eps, error, fragment in [(-1.0, ValueError, "a positive finite number, got -1.0"),
                                   (0.0, ValueError, "a positive finite number, got 0.0"),
                                   (float("nan"), ValueError, "a positive finite number, got nan"),
                                   (float("inf"), ValueError, "a positive finite number, got inf"),
                                   ("1e-5", TypeError, "a float, got str")]),
    raises("dropout_add_layer_norm eps -1", lambda: ops.dropout_add_layer_norm(x8, x8, w8, b8, eps=-1.0), ValueError,
           "dropout_add_layer_norm: eps must be a positive finite number, got -1.0"),
    *(raises(f"linear_gelu without a bias ({path})", lambda: ops.linear_gelu(x8, torch.ones(4, 8, device=DEVICE), None),
             TypeError,
             "linear_gelu: bias must be a tensor", triton=path == "triton") for path in ("eager", "triton")),
    raises("residual and branch shapes differ", lambda: ops.dropout_add_layer_norm(x8, x8[:2], w8, b8),
           fastgpt.BackendError, "branch shape (2, 8) != residual shape (3, 8)", triton=True),
    *(raises(f"dropout_p {p!r}", functools.partial(op, *args, dropout_p=p), error, fragment, triton=True)
      for (op, args), (p, error, fragment) in itertools.product(
          [(ops.causal_attention, (qkv, qkv, qkv)), (ops.dropout_add_layer_norm, (x8, x8, w8, b8))],
          [(1.0, ValueError, "dropout_p must be in [0, 1), got 1.0"),
           (-0.1, ValueError, "dropout_p must be in [0, 1), got -0.1"),
           (float("nan"), ValueError, "dropout_p must be in [0, 1), got nan"),
           ("0.1", TypeError, "dropout_p must be a float, got str")])),
    raises("attention on 3-D tensors", lambda: ops.causal_attention(qkv[0], qkv[0], qkv[0]), fastgpt.BackendError,
           "(B, H, T, d)", triton=True),
    raises("attention in float64", lambda: ops.causal_attention(qkv.double(), qkv.double(), qkv.double()),
           fastgpt.BackendError, "dtypes torch.float64/torch.float64/torch.float64", triton=True),
    raises("attention keys on another device", lambda: ops.causal_attention(qkv, qkv.to("meta"), qkv),
           fastgpt.BackendError, "inputs on different devices (q on cpu, k on meta", triton=True),
    returns("attention with a NaN query: only its row is NaN",
            lambda: ops.causal_attention(with_nan(qkv, (0, 1, 2, 5)), qkv, qkv),
            nan_exactly_where(lambda out: only_row(out, head=1, row=2), "causal_attention"), triton=True),
    returns("attention over zero tokens", lambda: ops.causal_attention(*[qkv[:, :, :0]] * 3),
            lambda out: out.shape == (1, 2, 0, 32) or pytest.fail(str(out.shape)), triton=True),
    raises("cached attention with more queries than keys",
           lambda: ops.cached_attention(torch.randn(1, 2, 6, 32, device=DEVICE), qkv, qkv), ValueError,
           "cached_attention: 6 queries but only 5 keys"),

    # Generation and the KV cache.
    returns("max_new_tokens 0: no tokens", lambda: list(generate_stream(model(), ids, 0, CTX)), equals([])),
    raises("max_new_tokens True", lambda: generate(model(), ids, True, CTX), ValueError,
           "max_new_tokens must be an int >= 0, got True"),
    # An absurd max_new_tokens is an upper bound, not an allocation: the stream is lazy, its cache bounded.
    returns("absurd max_new_tokens: tokens stream at once",
            lambda: list(itertools.islice(generate_stream(model(), ids, 10**30, CTX), 3)),
            lambda columns: [c.shape for c in columns] == [(1, 1)] * 3 or pytest.fail(str(columns))),
    returns("absurd max_new_tokens: stops at end-of-text",
            lambda: generate(eos_model(TINY), ids, 10**18, CTX, eos_id=V - 1),
            lambda out: torch.equal(out, ids) or pytest.fail(str(out))),
    raises("generating from an empty prompt", lambda: generate(model(), text_to_token_ids("", get_tokenizer()), 5, CTX),
           ValueError, "non-empty (batch, seq_len)"),
    raises("generating on another device", lambda: generate(model(), ids.to("meta"), 2, CTX), ValueError,
           "token ids are on meta but the model is on cpu"),
    *(raises(f"{how} NaN logits", lambda t=t: generate(nan_in_final_norm(model()), ids, 2, CTX, temperature=t),
             RuntimeError, "generate: the model returned NaN logits for new token 1 (batch row 0)")
      for how, t in (("sampling from", 1.0), ("greedy on", 0.0))),
    returns("a NaN query weight: NaN logits on the eager CPU path, as in the seed",
            lambda: nan_in_query_weight(model())(torch.ones(1, 4, dtype=torch.long)),
            lambda logits: torch.isnan(logits).all() or pytest.fail("CPU flash attention dropped the NaN")),
    raises("a KV cache for no sequences", lambda: KVCache.for_model(model(), 0), ValueError,
           "KVCache batch_size must be a positive int, got 0"),
    raises("a KV cache of another dtype", lambda: model()(ids, kv_cache=KVCache(2, 1, 4, 16, CTX, dtype=torch.float16)),
           ValueError, "the KV cache holds torch.float16 on cpu but the model computes torch.float32"),
    *(raises(f"generating from {dtype} ids", lambda dtype=dtype: generate(model(), ids.to(dtype), 2, CTX), TypeError,
             f"got dtype {dtype}; convert it with idx.long()")
      for dtype in (torch.int8, torch.int16, torch.uint8, torch.uint16, torch.uint32, torch.uint64)),
    *(raises(f"a forward pass on {dtype} ids", lambda dtype=dtype: model()(ids.to(dtype)), TypeError,
             f"got dtype {dtype}; convert them with idx.long()")
      for dtype in (torch.int8, torch.int16, torch.uint8, torch.uint16, torch.uint32, torch.uint64)),
    # The limit of softmax(logits / T): all probability on the largest logit.
    returns("temperature 1e-45 takes the most likely token",
            lambda: generate(eos_model(TINY), ids, 3, CTX, temperature=1e-45, generator=torch.Generator()),
            lambda out: out[0, -3:].tolist() == [V - 1] * 3 or pytest.fail(str(out))),
    returns("a +inf logit is the token sampled",
            lambda: generate(inf_logit_model(), ids, 3, CTX, temperature=1.0, top_k=5, generator=torch.Generator()),
            lambda out: out[0, -3:].tolist() == [V - 1] * 3 or pytest.fail(str(out))),

    # Tokenizer.
    raises("encoding bytes", lambda: text_to_token_ids(b"hello", get_tokenizer()), TypeError,
           "'bytes' object is not an instance of 'str'"),
    returns("encoding the empty string", lambda: text_to_token_ids("", get_tokenizer()),
            lambda ids: ids.shape == (1, 0) or pytest.fail(str(ids.shape))),
    raises("decoding float ids", lambda: token_ids_to_text(torch.tensor([[1.5]]), get_tokenizer()), TypeError,
           "token ids must be an integer tensor"),
    raises("decoding an id outside the vocabulary", lambda: token_ids_to_text(torch.tensor([[60000]]), get_tokenizer()),
           ValueError, "token id 60000 is outside the vocabulary [0, 50257)"),
    raises("decoding a negative id", lambda: token_ids_to_text(torch.tensor([[-1]]), get_tokenizer()),
           ValueError, "token id -1 is outside the vocabulary"),
    raises("decoding two rows at once", lambda: token_ids_to_text(torch.ones(2, 3, dtype=torch.long), get_tokenizer()),
           ValueError, "one sequence of ids, shape (n,) or (1, n), got shape (2, 3)"),

    # Checkpoints.
    raises("from_pretrained of a number", lambda: from_pretrained(123), TypeError,
           "expected str, bytes or os.PathLike object, not int"),
    raises("save_pretrained of a dict", lambda: save_pretrained({}, _scratch["dir"] / "never"), TypeError,
           "save_pretrained takes a fastgpt GPTModel, got dict"),
    raises("save_pretrained of a meta-device model", lambda: save_pretrained(meta_model(), scratch("meta/never")),
           ValueError, "the model is on the meta device"),
    returns("save_pretrained of a meta-device model makes no folder",
            lambda: folder_left_by_failed_save(meta_model(), scratch("meta2/never")), equals([])),
    raises("config.json fastgpt_weights_sha256 that is no sha256",
           lambda: from_pretrained(folder_with("bad-hash", fastgpt_weights_sha256=12)), CheckpointError,
           "config.json: fastgpt_weights_sha256 must be a sha256 (64 hex digits), got 12"),
    raises("weights from another save", lambda: from_pretrained(folder_with("other-hash",
                                                                            fastgpt_weights_sha256="0" * 64)),
           CheckpointError, "model.safetensors: does not match config.json (sha256"),
    # GPT2Config settings: computed, or refused by name -- never silently another model.
    *(raises(f"config.json {key}={value!r}", lambda key=key, value=value: from_pretrained(
        folder_with(f"cfg-{key}", **{key: value})), CheckpointError, fragment)
      for key, value, fragment in [
          ("scale_attn_by_inverse_layer_idx", True,
           "config.json: GPT-2 config scale_attn_by_inverse_layer_idx=True is not supported by fastgpt"),
          ("activation_function", "relu", "config.json: GPT-2 config activation_function='relu' is not supported"),
          ("n_inner", 100, "config.json: GPT-2 config n_inner=100 is not supported"),
          ("scale_attn_weights", False, "config.json: GPT-2 config scale_attn_weights=False is not supported"),
          ("add_cross_attention", True, "config.json: GPT-2 config add_cross_attention=True is not supported"),
          ("layer_norm_epsilon", -1, "config.json: GPT-2 config layer_norm_epsilon=-1 must be a positive finite"),
          ("attn_pdrop", 0.2, "attn_pdrop=0.2 differ; fastgpt has one drop_rate for all three: pass drop_rate="),
          ("resid_pdrop", "0.1", "config.json: GPT-2 config resid_pdrop='0.1' must be a number in [0, 1)"),
          ("qkv_bias", "no", "config.json: qkv_bias must be true or false, got 'no'"),
      ]),
    # A config claiming more blocks than the file holds fails at once, before anything is built.
    *(raises(f"config.json n_layer={n}", lambda n=n: from_pretrained(folder_with(f"layers-{n}", n_layer=n)),
             CheckpointError, f"holds 2 transformer blocks but config.json says n_layers={n}")
      for n in (20_000, 10**6)),
    raises("n_layers=10**6 passed for a 2-block file",
           lambda: from_pretrained(saved_tiny(), n_layers=10**6), CheckpointError,
           "holds 2 transformer blocks but you passed n_layers=1000000"),
    raises("config.json nested 100,000 deep",
           lambda: from_pretrained(folder_with("deep-config", config_text="[" * 100_000 + "]" * 100_000)),
           CheckpointError, "config.json: the file is JSON nested too deeply"),
    # Files that are not regular files would block forever.
    raises("a named pipe as the checkpoint", lambda: from_pretrained(fifo(scratch("pipe.safetensors"))),
           CheckpointError, "pipe.safetensors: is not a regular file"),
    *(raises(f"a named pipe as {file}", lambda file=file: from_pretrained(folder_with_fifo(f"fifo-{file}", file)),
             CheckpointError, f"{file}: is not a regular file") for file in ("config.json", "model.safetensors")),
    # Files that are no checkpoint, named without torch's advice to unpickle them anyway.
    raises("a text file as the checkpoint", lambda: from_pretrained(file_with("notes.txt", b"hello world\n")),
           CheckpointError, "notes.txt: is not a torch.save file (it starts with b'hell'"),
    raises("a pickle of garbage", lambda: from_pretrained(file_with("junk.pth", b"\x80\x02" + bytes(range(200)))),
           CheckpointError, "junk.pth: cannot be read as a torch.save file, truncated or damaged",
           absent="weights_only"),
    raises("a pickled module, not a state dict", lambda: from_pretrained(pickled_object_file()), CheckpointError,
           "refused: the file asks to run torch.nn.modules.linear.Linear, to build a Python object besides "
           "tensors; fastgpt loads weights only",
           absent="weights_only"),
    # Malformed safetensors: refused as the safetensors library refuses them (checked below).
    *(raises(f"safetensors with {kind}", lambda kind=kind, header=header, size=size: SafetensorsFile(
        raw_safetensors(kind.replace(" ", "-"), header, size)), CheckpointError, fragment)
      for kind, (header, size, fragment) in MALFORMED_SAFETENSORS.items()),
    raises("safetensors naming one tensor twice", lambda: SafetensorsFile(raw_safetensors(
        "repeated", b'{"a": ' + json.dumps(_tensor(0, 8)).encode() + b', "a": ' + json.dumps(_tensor(0, 8)).encode()
        + b"}", 8)), CheckpointError, "the safetensors header repeats the key(s) ['a']"),
    # Shard indexes: only files inside the checkpoint folder, named by strings.
    *(raises(f"a shard index naming {what}", lambda name=name, link=link, what=what: from_pretrained(
        sharded_folder(f"shards-{len(what)}", name, link)), CheckpointError, "which is outside the checkpoint folder")
      for what, name, link in [("../outside.safetensors", lambda folder: "../outside.safetensors", False),
                               ("an absolute path", lambda folder: str(scratch("outside.safetensors")), False),
                               ("a symlink out of the folder", lambda folder: "shard.safetensors", True)]),
    raises("a shard index with numbers for files", lambda: from_pretrained(sharded_folder("shards-int", lambda _: 1)),
           CheckpointError, "weight_map gives 1 for"),

    # The command line (in-process), for both commands.
    raises("profile --iters 0", lambda: cli("profile", "--iters", "0"), CLIError, "must be a positive integer, got 0"),
    raises("profile --seq-len abc", lambda: cli("profile", "--seq-len", "abc"), CLIError,
           "argument --seq-len: invalid _positive_int value: 'abc'"),
    raises("profile --size gpt2-huge", lambda: cli("profile", "--size", "gpt2-huge"), CLIError,
           "invalid choice: 'gpt2-huge'"),
    *(raises(f"{command} --device {device}", lambda command=command, device=device: cli(
        command, *(["x"] if command == "generate" else []), "--device", device), CLIError, fragment)
      for command in ("profile", "generate")
      for device, fragment in [("tpu", "unknown device 'tpu'; use cpu, cuda, cuda:N or mps"),
                               ("meta", "device 'meta' holds shapes but no data")]),
    *(raises(f"{command} --seed 2**70", lambda command=command: cli(command, *(["x"] if command == "generate" else []),
                                                                    "--seed", str(2**70)), CLIError,
             "argument --seed: must be an integer in [0, 2**64 - 1]") for command in ("profile", "generate")),
    raises("profile --trace to a folder", lambda: cli("profile", "--trace", str(_scratch["dir"])), CLIError,
           "cannot write the trace to"),
    raises("profile --json where nothing can be written", lambda: cli("profile", "--json", "/sys/report.json"),
           CLIError, "cannot write the JSON report to /sys/report.json: Permission denied"),
    returns("fastgpt --version", lambda: cli("--version"),
            lambda streams: streams == (f"fastgpt {fastgpt.__version__}\n", "") or pytest.fail(str(streams))),
    raises("generate --n-heads without a checkpoint", lambda: cli("generate", "x", "--n-heads", "8"), CLIError,
           "--n-heads applies to a --checkpoint state dict"),
    raises("generate --n-heads that disagrees with the checkpoint's config",
           lambda: cli("generate", "x", "--checkpoint", str(saved_tiny()), "--n-heads", "2"), CLIError,
           "--n-heads 2 disagrees with"),
    returns("generate --n-heads that agrees with the checkpoint's config",
            lambda: cli("generate", "x", "--checkpoint", str(saved_tiny()), "--n-heads", "4", "--max-new-tokens", "1"),
            lambda streams: "1 new tokens" in streams[1] or pytest.fail(str(streams))),
    raises("generate a checkpoint that is neither a path nor a name", lambda: cli("generate", "x", "--checkpoint",
                                                                                "gpt3"),
           CLIError, "checkpoint gpt3 does not exist"),
    raises("from_pretrained of the seed's models_dir itself",
           lambda: from_pretrained(seed_models_dir()), FileNotFoundError,
           "is the seed's models_dir (a folder of size subfolders: 124M), not a checkpoint"),
    raises("generate from a text file", lambda: cli("generate", "x", "--checkpoint", file_with("t.txt", b"some text")),
           CLIError, "t.txt: is not a torch.save file"),
    raises("no command", lambda: cli(), CLIError, "the following arguments are required: COMMAND"),
    raises("generate --max-new-tokens -5", lambda: cli("generate", "x", "--max-new-tokens", "-5"), CLIError,
           "must be a positive integer, got -5"),
    raises("generate --temperature nan", lambda: cli("generate", "x", "--temperature", "nan"), CLIError,
           "must be a finite number >= 0, got nan"),
    raises("generate --backend fast", lambda: cli("generate", "x", "--backend", "fast"), CLIError,
           "invalid choice: 'fast'"),
    raises("generate from a folder that is no checkpoint",
           lambda: cli("generate", "x", "--checkpoint", str(_scratch["dir"])), CLIError, "not a checkpoint folder"),
    returns("generate an absurd number of tokens: stops at end-of-text",
            lambda: cli("generate", "Hi", "--checkpoint", eos_checkpoint(), "--max-new-tokens", str(10**20)),
            lambda streams: (streams[0] == "Hi\n" and "0 new tokens" in streams[1]) or pytest.fail(str(streams))),
]


@pytest.fixture(scope="module", autouse=True)
def _scratch_folder(tmp_path_factory):
    _scratch["dir"] = tmp_path_factory.mktemp("bad-input")


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail a row that runs past ``seconds`` (a hang) instead of stalling the suite."""
    def hung(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _marks(case: Case) -> list:
    return [pytest.mark.skipif(case.needs_cuda and not torch.cuda.is_available(),
                               reason="needs a CUDA device to put the model on"),
            # NaN rows: the interpreter computes with numpy, which warns about NaN arithmetic.
            pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id, marks=_marks(case)) for case in CASES])
def test_bad_input_gets_a_clear_error_or_its_documented_result(case, request):
    if case.triton:
        request.getfixturevalue("forced_triton")
    with deadline(DEADLINE_S):
        if case.error is not None:
            with pytest.raises(case.error) as info:
                case.call()
            assert case.fragment in str(info.value)
            assert case.absent is None or case.absent not in str(info.value), str(info.value)
        else:
            case.check(case.call())


@pytest.mark.parametrize("kind", MALFORMED_SAFETENSORS)
def test_the_safetensors_library_refuses_each_malformed_file_too(kind):
    """The malformed files above are malformed by the library's own rules, not only by fastgpt's."""
    from safetensors import SafetensorError, safe_open

    header, size, _ = MALFORMED_SAFETENSORS[kind]
    with pytest.raises(SafetensorError):
        with safe_open(raw_safetensors(f"lib-{kind.replace(' ', '-')}", header, size), "pt") as f:
            [f.get_tensor(name) for name in f.keys()]

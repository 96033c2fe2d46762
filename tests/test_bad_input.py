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
import signal
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch

import fastgpt
from fastgpt import (
    DummyGPTModel, GPTModel, KVCache, from_pretrained, generate, generate_stream, get_tokenizer, gpt2_config, ops,
    save_pretrained, text_to_token_ids, token_ids_to_text, validate_config,
)
from fastgpt.cli import main as cli_main
from helpers import TINY

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


def with_nan(t: torch.Tensor, index) -> torch.Tensor:
    t = t.clone()
    t[index] = float("nan")
    return t


def nan_in_final_norm(m):
    """``m`` with one NaN in a parameter every logit depends on."""
    with torch.no_grad():
        m.final_norm.shift[0] = float("nan")
    return m


def nan_exactly_where(mask_fn, op):
    """Check: the output is NaN exactly where ``mask_fn(out)`` says (the inputs the NaN reaches), the
    Triton kernel of ``op`` having produced it."""
    def check(out):
        assert ops.dispatch_counts[(op, "triton")] == 1, dict(ops.dispatch_counts)
        expected = mask_fn(out)
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
]

x8, w8, b8 = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), torch.ones(8), torch.zeros(8)
ids = torch.ones(1, 3, dtype=torch.long)
qkv = torch.randn(1, 2, 5, 32, generator=torch.Generator().manual_seed(1))

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

    # The ops, forced to Triton: the kernels refuse clearly, or compute the documented result.
    raises("layer_norm of a list", lambda: ops.layer_norm([[1.0] * 8], w8, b8), TypeError,
           "layer_norm: expected a torch.Tensor, got list", triton=True),
    raises("layer_norm of a 0-d tensor", lambda: ops.layer_norm(torch.tensor(1.0), w8, b8), fastgpt.BackendError,
           "a 0-dimensional input", triton=True),
    raises("layer_norm of integers", lambda: ops.layer_norm(x8.long(), w8, b8), fastgpt.BackendError,
           "input dtype torch.int64", triton=True),
    raises("layer_norm weight on another device", lambda: ops.layer_norm(x8, w8.to("meta"), b8), fastgpt.BackendError,
           "weight is on meta, input on cpu", triton=True),
    returns("layer_norm of a row with NaN: that row is NaN", lambda: ops.layer_norm(with_nan(x8, (1, 3)), w8, b8),
            nan_exactly_where(lambda out: torch.arange(3)[:, None].eq(1).expand(3, 8), "layer_norm"), triton=True),
    returns("gelu of NaN and inf", lambda: ops.gelu(torch.tensor([float("nan"), float("inf"), 1.0])),
            lambda y: torch.testing.assert_close(y, torch.tensor([float("nan"), float("inf"), 0.8412]),
                                                 equal_nan=True, rtol=0, atol=1e-4), triton=True),
    returns("gelu of a 0-d tensor", lambda: ops.gelu(torch.tensor(1.0)),
            lambda y: torch.testing.assert_close(y, torch.tensor(0.8412), rtol=0, atol=1e-4), triton=True),
    raises("linear_gelu with a float16 weight", lambda: ops.linear_gelu(x8, torch.ones(4, 8).half(), torch.ones(4)),
           fastgpt.BackendError, "dtypes torch.float32/torch.float16/torch.float32 of input/weight/bias differ",
           triton=True),
    raises("linear_gelu of a 0-d tensor", lambda: ops.linear_gelu(torch.tensor(1.0), torch.ones(4, 8), torch.ones(4)),
           fastgpt.BackendError, "a 0-dimensional input", triton=True),
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
           "need equal (B, H, T, d)", triton=True),
    raises("attention in float64", lambda: ops.causal_attention(qkv.double(), qkv.double(), qkv.double()),
           fastgpt.BackendError, "dtypes torch.float64/torch.float64/torch.float64", triton=True),
    raises("attention keys on another device", lambda: ops.causal_attention(qkv, qkv.to("meta"), qkv),
           fastgpt.BackendError, "q, k, v on different devices", triton=True),
    returns("attention with a NaN query: only its row is NaN",
            lambda: ops.causal_attention(with_nan(qkv, (0, 1, 2, 5)), qkv, qkv),
            nan_exactly_where(lambda out: only_row(out, head=1, row=2), "causal_attention"), triton=True),
    returns("attention over zero tokens", lambda: ops.causal_attention(*[qkv[:, :, :0]] * 3),
            lambda out: out.shape == (1, 2, 0, 32) or pytest.fail(str(out.shape)), triton=True),
    raises("cached attention with more queries than keys",
           lambda: ops.cached_attention(torch.randn(1, 2, 6, 32), qkv, qkv), ValueError,
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
    raises("sampling from NaN logits", lambda: generate(nan_in_final_norm(model()), ids, 2, CTX, temperature=1.0),
           RuntimeError, "probability tensor contains either `inf`, `nan` or element < 0"),
    raises("a KV cache for no sequences", lambda: KVCache.for_model(model(), 0), ValueError,
           "KVCache batch_size must be a positive int, got 0"),

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

    # The command line (in-process), for both commands.
    raises("profile --iters 0", lambda: cli("profile", "--iters", "0"), CLIError, "must be a positive integer, got 0"),
    raises("profile --seq-len abc", lambda: cli("profile", "--seq-len", "abc"), CLIError,
           "argument --seq-len: invalid _positive_int value: 'abc'"),
    raises("profile --size gpt2-huge", lambda: cli("profile", "--size", "gpt2-huge"), CLIError,
           "invalid choice: 'gpt2-huge'"),
    raises("profile --device tpu", lambda: cli("profile", "--device", "tpu"), CLIError,
           "device type at start of device string: tpu"),
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
        else:
            case.check(case.call())

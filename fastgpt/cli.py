"""The ``fastgpt`` command line: ``fastgpt profile``, ``fastgpt generate`` and ``fastgpt check``.

Arguments are parsed before torch is imported, so ``--help`` and ``--version``
answer at once, and whatever a command raises for the user (a bad option, a
bad checkpoint, Ctrl-C, a closed pipe) ends in one line on stderr, not a traceback.
"""

from __future__ import annotations

import argparse
import codecs
import os
import re
import sys
import warnings

from . import __version__
from .config import GPT2_CONFIGS

# ops.BACKENDS, spelled out so that parsing arguments does not import torch (tests check they agree).
BACKENDS = ("auto", "triton", "eager")
_SEEDS = (0, 2**64 - 1)  # what torch.manual_seed takes
_DEVICE_NAME = re.compile(r"(cpu|cuda|mps)(:[0-9]+)?")  # what profiling.resolve_device can take


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgpt", description="fastgpt: a fast drop-in GPT-2 for PyTorch")
    parser.add_argument("--version", action="version", version=f"fastgpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    profile = sub.add_parser(
        "profile", help="profile GPT-2 latency: per-op table, tokens/s, MFU, peak memory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build a randomly initialised GPT-2 on the best device and backend of this machine, time\n"
                    "a forward pass, a training step or a generation, and print end-to-end latency, tokens/s,\n"
                    "MFU, peak memory and a per-op latency table (torch.profiler, grouped as attention /\n"
                    "layernorm / gelu / matmul / other) with the path (Triton or eager) each op took.\n"
                    "Progress goes to stderr, results to stdout.",
        epilog="examples:\n"
               "  fastgpt profile                                   # GPT-2 small forward pass\n"
               "  fastgpt profile --mode train-step --batch 8       # forward + backward + AdamW\n"
               "  fastgpt profile --mode generate --new-tokens 64   # prefill, first token, decode tokens/s\n"
               "  fastgpt profile --compare --trace trace.json      # eager vs Triton, with Perfetto traces\n"
               "  fastgpt profile --json report.json                # also write a machine-readable report")
    profile.add_argument("--mode", choices=["forward", "train-step", "generate"], default="forward",
                         help="what to time: inference forward passes, training steps (forward + backward + "
                              "AdamW) or greedy generation with the KV cache (default forward)")
    profile.add_argument("--size", default="gpt2-small", choices=list(GPT2_CONFIGS), help="model size (default gpt2-small)")
    profile.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")
    profile.add_argument("--seq-len", type=_positive_int, default=None,
                         help="tokens per sequence, the prompt when generating (default on CUDA 1024, 512 when "
                              "generating; 128 on CPU)")
    profile.add_argument("--new-tokens", type=_positive_int, default=None, metavar="N",
                         help="tokens to generate per call in --mode generate (default 128 on CUDA, 32 on CPU)")
    profile.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                         help="parameter dtype (default bfloat16 on CUDA, float32 on CPU)")
    profile.add_argument("--backend", choices=BACKENDS, default=None,
                         help="dispatch backend (default: FASTGPT_BACKEND if set, else auto: Triton where a kernel "
                              "supports the case on CUDA)")
    profile.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    profile.add_argument("--warmup", type=_non_negative_int, default=2, help="untimed warm-up steps (default 2)")
    profile.add_argument("--iters", type=_positive_int, default=None,
                         help="timed steps (default 10 forward passes, 5 train steps, 3 generate calls)")
    profile.add_argument("--seed", type=_seed, default=123, help="seed for weights and input ids")
    profile.add_argument("--peak-tflops", type=_positive_float, default=None, metavar="TFLOPS",
                         help="the device's peak TFLOP/s for MFU (default: known for H100/H200/A100, else MFU is n/a)")
    profile.add_argument("--compare", action="store_true",
                         help="run eager and Triton side by side on the same weights and print the speed-ups")
    profile.add_argument("--trace", metavar="FILE", default=None,
                         help="write a Chrome/Perfetto trace of the profiled steps to FILE "
                              "(with --compare: FILE-eager and FILE-triton)")
    profile.add_argument("--json", metavar="FILE", default=None,
                         help="also write a machine-readable report to FILE ('-': to stdout, instead of the table)")
    profile.add_argument("--no-ops", action="store_true", help="skip the torch.profiler per-op table")
    profile.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    generate = sub.add_parser("generate", help="continue a prompt with GPT-2, printing tokens as they come",
                              description="Continue PROMPT with GPT-2 weights from --checkpoint (a Hugging Face "
                                          "folder, OpenAI's TensorFlow folder or a state-dict file), or with a "
                                          "seeded random GPT-2 small, streaming tokens as they are produced. "
                                          "Greedy unless --temperature is above 0.")
    generate.add_argument("prompt", help="the text to continue")
    generate.add_argument("--checkpoint", default=None, metavar="PATH",
                          help="GPT-2 weights: a path, or a released GPT-2 by name (gpt2, gpt2-medium, gpt2-large, "
                               "gpt2-xl, or the seed's 124M ... 1558M), found in ./gpt2/<size> (the seed's "
                               "models_dir) or the Hugging Face cache (default: random GPT-2 small, untrained)")
    generate.add_argument("--download", action="store_true",
                          help="download a --checkpoint given by name from the Hugging Face hub if it is not found "
                               "locally (needs huggingface_hub); without it nothing is downloaded")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=50, metavar="N",
                          help="tokens to generate at most (default 50; stops early at <|endoftext|>)")
    generate.add_argument("--temperature", type=_non_negative_float, default=0.0, metavar="T",
                          help="sampling temperature; 0 picks the most likely token (default 0)")
    generate.add_argument("--top-k", type=_positive_int, default=None, metavar="K",
                          help="sample among the K most likely tokens only")
    generate.add_argument("--top-p", type=_probability, default=None, metavar="P",
                          help="sample among the most likely tokens holding probability P (nucleus sampling)")
    generate.add_argument("--n-heads", type=_positive_int, default=None, metavar="N",
                          help="attention heads of a --checkpoint state dict (a state dict does not record them; "
                               "default: GPT-2's for its width, with a warning)")
    generate.add_argument("--seed", type=_seed, default=123, help="seed for sampling and for the random model")
    generate.add_argument("--backend", choices=BACKENDS, default=None,
                          help="dispatch backend (default: FASTGPT_BACKEND if set, else auto)")
    generate.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")

    check = sub.add_parser(
        "check", help="measure every Triton kernel against eager PyTorch on this GPU and record the verdicts",
        description="Run GPT-2's cases (the four sizes' widths, batch x sequence buckets, bf16/fp16/fp32, forward "
                    "and backward, dropout 0 and 0.1, decode over caches of 128 to 8k) with the Triton kernel and "
                    "with eager PyTorch, check that they agree, time both, and record which one `auto` takes from "
                    "now on (the verdict cache: FASTGPT_VERDICTS). One row per case on stdout, progress on stderr.")
    check.add_argument("--op", action="append", default=None, metavar="OP",
                       help="check this op only (repeatable; default every op)")
    check.add_argument("--size", action="append", default=None, choices=list(_CHECK_SIZES), metavar="SIZE",
                       help="GPT-2 size whose widths to check (repeatable; default all four)")
    check.add_argument("--dtype", action="append", default=None, choices=["bfloat16", "float16", "float32"],
                       help="dtype to check (repeatable; default all three, float32 and float16 with --interpret)")
    check.add_argument("--interpret", action="store_true",
                       help="no GPU needed: tiny shapes on CPU tensors under Triton's interpreter (proves the "
                            "machinery; its times are not a speed)")
    check.add_argument("--json", metavar="FILE", default=None, help="also write the rows to FILE as JSON")
    check.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


_CHECK_SIZES = ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")  # checking.SIZES, without importing torch


def _check(args) -> int:
    import json

    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton
    import torch

    from .checking import check, format_rows

    if args.json is not None:
        from .profiling import check_writable
        check_writable(args.json, "JSON file")
    if not args.interpret and not torch.cuda.is_available():
        print("fastgpt check: no CUDA device here, so there is nothing to check: on CPU `auto` runs eager PyTorch. "
              "(--interpret runs tiny shapes under Triton's interpreter, to test the machinery.)")
        return 0

    def progress(line: str) -> None:
        if not args.quiet:
            print(f"[fastgpt] check {line}", file=sys.stderr, flush=True)

    rows = check(ops=args.op, sizes=args.size, dtypes=args.dtype, interpret=args.interpret, progress=progress)
    print(format_rows(rows))
    if args.json is not None:
        with open(args.json, "w") as out:
            json.dump([row.to_dict() for row in rows], out, indent=2)
            out.write("\n")
    return 0


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not _SEEDS[0] <= value <= _SEEDS[1]:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64 - 1], got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _profile(args) -> int:
    import json

    from .profiling import check_writable, compare, profile, report_json

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[fastgpt] {message}", file=sys.stderr, flush=True)

    if args.json not in (None, "-"):
        check_writable(args.json, "JSON report")  # before minutes of profiling, not after
    options = dict(size=args.size, batch=args.batch, seq_len=args.seq_len, dtype=args.dtype, device=args.device,
                   mode=args.mode, new_tokens=args.new_tokens, warmup=args.warmup, iters=args.iters,
                   seed=args.seed, peak_tflops=args.peak_tflops, trace=args.trace, profile_ops=not args.no_ops)
    if args.compare:
        if args.backend is not None:
            raise ValueError("--compare runs the eager and Triton backends itself; drop --backend")
        comparison = compare(log=log, **options)
        text, report = comparison.format(), report_json([comparison.eager, comparison.triton], comparison)
    else:
        result = profile(backend=args.backend, log=log, **options)
        text, report = result.format(), report_json([result])
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
            out.write("\n")
        log(f"wrote the JSON report to {args.json}")
    return 0


def _note(message: str) -> None:
    print(f"[fastgpt] {message}", file=sys.stderr, flush=True)


def _end_line() -> None:
    try:
        print(flush=True)
    except OSError:  # a closed pipe: the error being raised says more
        pass


def _generate(args) -> int:
    import time

    import torch

    from . import ops
    from .checkpoints import from_pretrained
    from .checkpoints.names import resolve_checkpoint
    from .config import gpt2_config
    from .generation import generate_stream
    from .model import GPTModel
    from .profiling import resolve_device
    from .tokenizer import get_tokenizer, text_to_token_ids

    if not args.prompt:
        raise ValueError("the prompt is empty; give some text to continue")
    if args.n_heads is not None and args.checkpoint is None:
        raise ValueError("--n-heads applies to a --checkpoint state dict; the random GPT-2 small has 12")
    if args.download and args.checkpoint is None:
        raise ValueError("--download applies to a --checkpoint given by name (e.g. --checkpoint gpt2)")
    if args.backend is not None:
        ops.set_backend(args.backend)
    device = resolve_device(args.device)
    problem = ops.forced_triton_problem(device)
    if problem:  # refused before the prompt is printed, not at the first token
        raise ops.BackendError(problem)
    tokenizer = get_tokenizer()
    if args.checkpoint is None:
        _note(f"no --checkpoint: a random GPT-2 small (seed {args.seed}); its output is untrained noise")
        torch.manual_seed(args.seed)
        model = GPTModel(gpt2_config("gpt2-small"))
    else:
        checkpoint = resolve_checkpoint(args.checkpoint, download=args.download)
        _check_n_heads(checkpoint, args.n_heads)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = from_pretrained(checkpoint, **({} if args.n_heads is None else {"n_heads": args.n_heads}))
        for warning in caught:
            _note(f"warning: {warning.message}")
    model = model.to(device).eval()
    vocab_size, context_length = model.cfg["vocab_size"], model.cfg["context_length"]
    idx = text_to_token_ids(args.prompt, tokenizer).to(device)
    if idx.shape[1] > context_length:
        _note(f"the prompt is {idx.shape[1]} tokens, more than the model's context of {context_length}: it sees "
              f"the last {context_length}")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        _note("--top-k and --top-p shape sampling only; with --temperature 0 (the default) the most likely token "
              "is taken: give --temperature above 0 to sample")
    stream = generate_stream(model, idx, args.max_new_tokens, context_length, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p,
                             eos_id=tokenizer.eot_token if tokenizer.eot_token < vocab_size else None,
                             generator=torch.Generator(device=device).manual_seed(args.seed))
    # Print bytes through an incremental UTF-8 decoder: one character may span two tokens.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    print(args.prompt, end="", flush=True)
    start, count = time.perf_counter(), 0
    try:
        for column in stream:
            token = int(column[0, 0])
            count += 1
            piece = tokenizer.decode_single_token_bytes(token) if token < tokenizer.n_vocab else f"<|{token}|>".encode()
            print(decoder.decode(piece), end="", flush=True)
    except Exception:
        _end_line()  # the text stops mid-line: the error that follows starts a line of its own
        raise
    elapsed = time.perf_counter() - start
    print(decoder.decode(b"", final=True), flush=True)
    _note(f"{count} new tokens in {elapsed:.2f} s ({count / elapsed:.1f} tokens/s) on {device}")
    return 0


def _check_before_torch(args) -> None:
    """Refuse what can be refused without torch (whose import takes seconds): a missing
    checkpoint, a device name no torch device of fastgpt's has. The rest is checked where it is used."""
    if getattr(args, "checkpoint", None) is not None and not os.path.exists(args.checkpoint) \
            and args.checkpoint not in _PRETRAINED_NAMES:  # a name is looked for later, in names.py's order
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    if getattr(args, "device", None) is not None and not _DEVICE_NAME.fullmatch(args.device):
        if args.device.partition(":")[0] == "meta":
            raise ValueError("device 'meta' holds shapes but no data, so it cannot run a model; use cpu, cuda or mps")
        raise ValueError(f"unknown device {args.device!r}; use cpu, cuda, cuda:N or mps")


# checkpoints.names.HUB_NAMES and SEED_SIZES, spelled out so that parsing arguments does not import torch.
_PRETRAINED_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "124M", "355M", "774M", "1558M")


def _check_n_heads(checkpoint, n_heads) -> None:
    """Refuse --n-heads for a checkpoint whose config records another head count (it would run another model)."""
    from pathlib import Path

    from .checkpoints.files import read_json

    if n_heads is None:
        return
    folder = Path(checkpoint)
    if folder.name.endswith(".index"):
        folder = folder.parent
    for name in ("config.json", "hparams.json"):
        config = folder / name
        if folder.is_dir() and config.exists():
            recorded = read_json(config).get("n_head")
            if recorded is not None and recorded != n_heads:
                raise ValueError(f"--n-heads {n_heads} disagrees with {config}, which records n_head={recorded!r}; "
                                 "--n-heads is for a state dict, which records no head count: drop it")
            return


def main(argv=None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        _check_before_torch(args)
        if args.command == "profile":
            return _profile(args)
        if args.command == "check":
            return _check(args)
        return _generate(args)
    except BrokenPipeError:
        # The reader went away (`fastgpt generate ... | head`): stop quietly, and keep
        # Python's exit-time flush from raising again on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"\nfastgpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, OSError) as err:
        # Errors with a message meant for the user (CheckpointError and BackendError among
        # them): no traceback. OSError: a file that cannot be read or written.
        parser.exit(2, f"fastgpt {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())

"""The ``fastgpt`` command line: ``fastgpt profile`` and ``fastgpt generate`` (more land with their issues)."""

from __future__ import annotations

import argparse
import codecs
import sys

from . import ops
from .config import GPT2_CONFIGS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgpt", description="fastgpt: a fast drop-in GPT-2 for PyTorch")
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
    profile.add_argument("--backend", choices=list(ops.BACKENDS), default=None,
                         help="dispatch backend (default auto: Triton where a kernel supports the case on CUDA)")
    profile.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    profile.add_argument("--warmup", type=_non_negative_int, default=2, help="untimed warm-up steps (default 2)")
    profile.add_argument("--iters", type=_positive_int, default=None,
                         help="timed steps (default 10 forward passes, 5 train steps, 3 generate calls)")
    profile.add_argument("--seed", type=int, default=123, help="seed for weights and input ids")
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
                          help="GPT-2 weights (default: random GPT-2 small, untrained)")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=50, metavar="N",
                          help="tokens to generate at most (default 50; stops early at <|endoftext|>)")
    generate.add_argument("--temperature", type=_non_negative_float, default=0.0, metavar="T",
                          help="sampling temperature; 0 picks the most likely token (default 0)")
    generate.add_argument("--top-k", type=_positive_int, default=None, metavar="K",
                          help="sample among the K most likely tokens only")
    generate.add_argument("--top-p", type=_probability, default=None, metavar="P",
                          help="sample among the most likely tokens holding probability P (nucleus sampling)")
    generate.add_argument("--seed", type=int, default=123, help="seed for sampling and for the random model")
    generate.add_argument("--backend", choices=list(ops.BACKENDS), default="auto", help="dispatch backend (default auto)")
    generate.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    return parser


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


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _profile(args) -> int:
    import json
    import os

    from .profiling import compare, profile, report_json

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[fastgpt] {message}", file=sys.stderr, flush=True)

    if args.json not in (None, "-") and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        # Checked before minutes of profiling, not after.
        raise ValueError(f"cannot write the JSON report to {args.json}: its folder does not exist")
    options = dict(size=args.size, batch=args.batch, seq_len=args.seq_len, dtype=args.dtype, device=args.device,
                   mode=args.mode, new_tokens=args.new_tokens, warmup=args.warmup, iters=args.iters,
                   seed=args.seed, peak_tflops=args.peak_tflops, trace=args.trace, profile_ops=not args.no_ops)
    if args.compare:
        if args.backend is not None:
            raise ValueError("--compare runs the eager and Triton backends itself; drop --backend")
        comparison = compare(log=log, **options)
        text, report = comparison.format(), report_json([comparison.eager, comparison.triton], comparison)
    else:
        result = profile(backend=args.backend or "auto", log=log, **options)
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


def _generate(args) -> int:
    import time

    import torch

    from .checkpoints import from_pretrained
    from .config import gpt2_config
    from .generation import generate_stream
    from .model import GPTModel
    from .profiling import default_device
    from .tokenizer import get_tokenizer, text_to_token_ids

    if not args.prompt:
        raise ValueError("the prompt is empty; give some text to continue")
    ops.set_backend(args.backend)
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    tokenizer = get_tokenizer()
    if args.checkpoint is None:
        print(f"[fastgpt] no --checkpoint: a random GPT-2 small (seed {args.seed}); its output is untrained noise",
              file=sys.stderr, flush=True)
        torch.manual_seed(args.seed)
        model = GPTModel(gpt2_config("gpt2-small"))
    else:
        model = from_pretrained(args.checkpoint)
    model = model.to(device).eval()
    vocab_size, context_length = model.cfg["vocab_size"], model.cfg["context_length"]
    idx = text_to_token_ids(args.prompt, tokenizer).to(device)
    stream = generate_stream(model, idx, args.max_new_tokens, context_length, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p,
                             eos_id=tokenizer.eot_token if tokenizer.eot_token < vocab_size else None,
                             generator=torch.Generator(device=device).manual_seed(args.seed))
    # Print bytes through an incremental UTF-8 decoder: one character may span two tokens.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    print(args.prompt, end="", flush=True)
    start, count = time.perf_counter(), 0
    for column in stream:
        token = int(column[0, 0])
        count += 1
        piece = tokenizer.decode_single_token_bytes(token) if token < tokenizer.n_vocab else f"<|{token}|>".encode()
        print(decoder.decode(piece), end="", flush=True)
    elapsed = time.perf_counter() - start
    print(decoder.decode(b"", final=True), flush=True)
    print(f"[fastgpt] {count} new tokens in {elapsed:.2f} s ({count / elapsed:.1f} tokens/s) on {device}",
          file=sys.stderr, flush=True)
    return 0


def main(argv=None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "profile":
            return _profile(args)
        if args.command == "generate":
            return _generate(args)
    except (ValueError, TypeError, ops.BackendError, RuntimeError, FileNotFoundError) as err:
        # Errors with a message meant for the user: no traceback.
        parser.exit(2, f"fastgpt {args.command}: error: {err}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())

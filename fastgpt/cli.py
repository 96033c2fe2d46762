"""The ``fastgpt`` command line: ``fastgpt profile`` (more subcommands land with their issues)."""

from __future__ import annotations

import argparse
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

    profile = sub.add_parser("profile", help="time GPT-2 forward passes and print latency and tokens/s",
                             description="Build a randomly initialised GPT-2 and time forward passes "
                                         "on the best available backend.")
    profile.add_argument("--size", default="gpt2-small", choices=list(GPT2_CONFIGS), help="model size (default gpt2-small)")
    profile.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")
    profile.add_argument("--seq-len", type=_positive_int, default=None,
                         help="tokens per sequence (default 1024 on CUDA, 128 on CPU)")
    profile.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                         help="parameter dtype (default bfloat16 on CUDA, float32 on CPU)")
    profile.add_argument("--backend", choices=list(ops.BACKENDS), default="auto", help="dispatch backend (default auto)")
    profile.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    profile.add_argument("--warmup", type=int, default=2, help="untimed warm-up passes (default 2)")
    profile.add_argument("--iters", type=_positive_int, default=10, help="timed passes (default 10)")
    profile.add_argument("--seed", type=int, default=123, help="seed for weights and input ids")
    profile.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def _profile(args) -> int:
    from .profiling import profile_forward

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[fastgpt] {message}", file=sys.stderr, flush=True)

    result = profile_forward(size=args.size, batch=args.batch, seq_len=args.seq_len, dtype=args.dtype,
                             backend=args.backend, device=args.device, warmup=args.warmup,
                             iters=args.iters, seed=args.seed, log=log)
    print(result.format())
    return 0


def main(argv=None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "profile":
            return _profile(args)
    except (ValueError, TypeError, ops.BackendError, RuntimeError) as err:
        # Errors with a message meant for the user: no traceback.
        parser.exit(2, f"fastgpt {args.command}: error: {err}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())

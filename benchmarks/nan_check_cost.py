"""The cost of propagating NaN through CPU attention (issue 20, item 5), measured A/B in one process.

    python benchmarks/nan_check_cost.py [threads] [rounds]

Forward pass of a GPT-2-small-width model (emb 768, 12 heads, 2 layers) at T=128 on the CPU, eager,
and one decode step with a 1024-position KV cache, with the check (fastgpt as it is) and without it
(ops._cpu_inputs_not_finite replaced by a function that says "finite"), interleaved round by round
so that a shared machine's noise hits both alike. Prints medians and the difference.
"""

import statistics
import sys
import time

import torch

from fastgpt import GPTModel, KVCache, ops


def main(threads: int = 1, rounds: int = 40) -> None:
    torch.set_num_threads(threads)
    cfg = dict(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=2, drop_rate=0.0,
               qkv_bias=True)
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    x = torch.randint(0, 50257, (1, 128))
    cache = KVCache.for_model(model, 1)
    q = torch.randn(1, 12, 128, 64)
    checked, unchecked = ops._cpu_inputs_not_finite, (lambda *_: False)

    def decode():
        cache.length = 1023
        model(x[:, :1], kv_cache=cache, last_logits_only=True)

    cases = {"forward T=128": lambda: model(x), "decode step, 1023 cached": decode,
             "causal_attention op, 12x128x64": lambda: ops.causal_attention(q, q, q)}
    with torch.inference_mode(), ops.use_backend("eager"):
        for name, run in cases.items():
            times = {"with check": [], "without": []}
            for _ in range(3):
                run()
            pair = [("with check", checked), ("without", unchecked)]
            for round_ in range(rounds):
                for label, fn in (pair if round_ % 2 else pair[::-1]):  # each goes first in half the rounds
                    ops._cpu_inputs_not_finite = fn
                    start = time.perf_counter()
                    run()
                    times[label].append(time.perf_counter() - start)
            ops._cpu_inputs_not_finite = checked
            with_, without = (statistics.median(times[k]) * 1e3 for k in ("with check", "without"))
            print(f"{name}: {with_:.3f} ms with the check, {without:.3f} ms without "
                  f"({with_ - without:+.3f} ms, {100 * (with_ / without - 1):+.1f}%)")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))

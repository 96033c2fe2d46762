"""What one query/key/value matmul is worth against three, on this machine (docs/design.md, issue 20).

    python benchmarks/qkv_fusion.py [--layers 4] [--rounds 12] [--threads N]

GPT-2 small's width (768, 12 heads, vocabulary 50257), float32, eager ops, a few
layers. Both contenders hold the same parameters -- W_query, W_key and W_value,
three ``nn.Parameter``s -- laid out as ``from_pretrained`` lays them out: views
of one (in, 3·out) buffer, GPT-2's c_attn. They differ only in the projection:

* ``three``: the model as shipped, ``W_query(x)``, ``W_key(x)``, ``W_value(x)``;
* ``fused``: one matmul over an (3·out, in) view of the shared buffer (no copy):
  ``few_row_linear`` on it at inference, and in training an autograd function
  whose backward is one matmul for the input's gradient and one for the three
  weights' (split into the three parameters' gradients).

Measured, rounds interleaved in rotating order (the machine is shared), medians:
a training step (forward, fused loss, backward, AdamW) at batch 2 × 256, and
greedy decoding with the KV cache at batch 1 (16-token prompt, then one token
per step), plus the projection alone. Prints one table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt.few_row_matmul import few_row_linear
from fastgpt.model import MultiHeadAttention

_three = MultiHeadAttention._projections
NAMES = ("three", "fused", "three again")


def _fused_view(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
    """The (3·n, ...) tensor whose three row blocks are a, b, c, when they are adjacent views of one buffer."""
    if not (a.shape == b.shape == c.shape and a.stride() == b.stride() == c.stride()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() == c.untyped_storage().data_ptr()):
        return None
    step = a.shape[0] * a.stride(0)
    if b.storage_offset() - a.storage_offset() != step or c.storage_offset() - b.storage_offset() != step:
        return None
    return a.as_strided((3 * a.shape[0], *a.shape[1:]), a.stride(), a.storage_offset())


class _OneMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wq, wk, wv, bq, bk, bv):
        weight = _fused_view(wq, wk, wv)
        bias = None if bq is None else _fused_view(bq, bk, bv)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bq is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight
        flat_grad, flat_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = (flat_grad.t() @ flat_x).chunk(3)
        grad_b = flat_grad.sum(0).chunk(3) if ctx.has_bias else (None,) * 3
        return (grad_x, *grad_w, *grad_b)


def _fused(att, x):
    q, k, v = att.W_query, att.W_key, att.W_value
    weight = _fused_view(q.weight, k.weight, v.weight)
    if weight is None:
        return _three(att, x)
    if torch.is_grad_enabled():
        out = _OneMatmul.apply(x, q.weight, k.weight, v.weight, q.bias, k.bias, v.bias)
    else:
        bias = None if q.bias is None else _fused_view(q.bias, k.bias, v.bias)
        out = few_row_linear(x, weight, bias)
    return out.split(att.d_out, dim=-1)


def _c_attn_layout(model):
    """W_query/W_key/W_value as views of one (in, 3·out) buffer, the other weights as from_pretrained keeps them."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features >= module.in_features:
                module.weight.data = module.weight.t().contiguous().t()
        for module in model.modules():
            if isinstance(module, MultiHeadAttention):
                parts = [module.W_query, module.W_key, module.W_value]
                buffer = torch.cat([p.weight.t() for p in parts], dim=1)  # (in, 3·out)
                for p, view in zip(parts, buffer.t().chunk(3)):
                    p.weight.data = view
                if parts[0].bias is not None:
                    bias = torch.cat([p.bias for p in parts])
                    for p, view in zip(parts, bias.chunk(3)):
                        p.bias.data = view


def _interleaved(fns: dict, rounds: int, clock) -> dict:
    times = {name: [] for name in fns}
    names = list(fns)
    for fn in fns.values():
        fn()  # warm-up
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = clock()
            fns[name]()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time (with --threads 1, insensitive to other processes "
                             "taking the cores; wall time would count their share)")
    parser.add_argument("--only", nargs="*", choices=["train", "decode", "projection"], default=None,
                        help="run only these measurements")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        parser.error("--clock cpu needs --threads 1 (with more threads it counts their spin-waiting)")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cfg = fastgpt.gpt2_config("gpt2-small", n_layers=args.layers, drop_rate=0.0, qkv_bias=True)
    fastgpt.set_backend("eager")
    models = {}
    for name in NAMES:
        torch.manual_seed(0)
        models[name] = fastgpt.GPTModel(cfg)
        _c_attn_layout(models[name])

    def use(name):
        # "three again": a second copy of the shipped model, timed like the others -- the noise floor.
        MultiHeadAttention._projections = _fused if name == "fused" else _three

    # ---- training step
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, cfg["vocab_size"], (2, 256), generator=gen)
    targets = torch.randint(0, cfg["vocab_size"], (2, 256), generator=gen)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5, foreach=True) for name, m in models.items()}

    def train_step(name):
        def step():
            use(name)
            model, opt = models[name].train(), optimizers[name]
            model.loss(inputs, targets).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    # ---- decoding with the KV cache
    prompt = torch.randint(0, cfg["vocab_size"], (1, 16), generator=gen)

    def decode(name):
        def run():
            use(name)
            model = models[name].eval()
            with torch.no_grad():
                cache = fastgpt.KVCache.for_model(model, 1, max_len=16 + args.new_tokens)
                nxt = model._logits(prompt, cache, last_logits_only=True)[:, -1].argmax(-1, keepdim=True)
                for _ in range(args.new_tokens - 1):
                    nxt = model._logits(nxt, cache, last_logits_only=True)[:, -1].argmax(-1, keepdim=True)
        return run

    # ---- the projection alone: forward + backward at 512 tokens, and one token without autograd
    att = {name: m.trf_blocks[0].att for name, m in models.items()}
    x_train = torch.randn(2, 256, cfg["emb_dim"], requires_grad=True)
    x_token = torch.randn(1, 1, cfg["emb_dim"])

    def proj_train(name):
        def run():
            use(name)
            sum(t.sum() for t in MultiHeadAttention._projections(att[name], x_train)).backward()
        return run

    def proj_token(name):
        def run():
            use(name)
            with torch.no_grad():
                for _ in range(100):
                    MultiHeadAttention._projections(att[name], x_token)
        return run

    # Same values either way (the fused forward and its gradients are the three matmuls').
    with torch.no_grad():
        use("three")
        a = models["three"].eval()(prompt)
        use("fused")
        b = models["fused"].eval()(prompt)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()

    print(f"GPT-2 small width, {args.layers} layers, float32, eager, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {args.clock} clock, medians of {args.rounds} interleaved rounds")
    for kind, label, make, unit in (("train", "training step, batch 2 x 256", train_step, "s"),
                                    ("decode", f"decode, batch 1, {args.new_tokens} tokens", decode, "tok/s"),
                                    ("projection", "QKV projection fwd+bwd, 512 tokens", proj_train, "ms"),
                                    ("projection", "QKV projection, 1 token (x100)", proj_token, "ms")):
        if args.only and kind not in args.only:
            continue
        med = _interleaved({name: make(name) for name in NAMES}, args.rounds, clock)
        if unit == "tok/s":
            vals = {n: args.new_tokens / t for n, t in med.items()}
            gain = {n: vals[n] / vals["three"] - 1 for n in NAMES}
        else:
            vals = {n: t * (1000 if unit == "ms" else 1) for n, t in med.items()}
            gain = {n: vals["three"] / vals[n] - 1 for n in NAMES}
        print(f"{label:38s} three {vals['three']:8.3f} {unit:5s} fused {vals['fused']:8.3f} {unit:5s} "
              f"fused faster by {100 * gain['fused']:+5.1f}%  (three again: {100 * gain['three again']:+5.1f}%)",
              flush=True)
    use("three")


if __name__ == "__main__":
    main()

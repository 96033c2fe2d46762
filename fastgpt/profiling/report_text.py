"""Text output of ``fastgpt profile``: one run, or eager and Triton side by side."""

from __future__ import annotations

import statistics
from typing import Optional

from .op_table import GROUP_DISPATCH_OPS, OpGroup, OpTable

NAME_WIDTH = 52
TOP_OPS = {"other": 5, "optimizer": 4}   # op rows shown under a group; the rest are summed in one row
TOP_OPS_DEFAULT = 3
_FORMULA = {"forward": "2·N + 4·L·T·d", "train-step": "6·N + 12·L·T·d"}


def _count(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def format_paths(paths: dict[str, dict[str, float]], only: Optional[tuple[str, ...]] = None,
                 verdicts: Optional[dict[str, str]] = None) -> str:
    """``causal_attention triton×12 (1.9× eager, checked), layer_norm eager×13`` (calls per pass),
    with measured auto's verdict behind an op's path where one was used."""
    verdicts = verdicts or {}
    parts = [f"{op} {'+'.join(f'{p}×{_count(n)}' for p, n in by_path.items())}"
             + (f" ({verdicts[op]})" if op in verdicts else "")
             for op, by_path in paths.items() if only is None or op in only]
    return ", ".join(parts)


def _group_path(result, group: str) -> str:
    if group in GROUP_DISPATCH_OPS:
        return format_paths(result.paths, GROUP_DISPATCH_OPS[group]) or "(not dispatched)"
    return "torch"


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def _memory_text(mem) -> str:
    before = f", {_mib(mem.before_bytes)} before the timed steps" if mem.before_bytes is not None else ""
    return f"peak {_mib(mem.peak_bytes)}{before} ({mem.method})"


def _device_line(result) -> str:
    if result.device.startswith("cuda"):
        where = f"{result.device}: {result.device_name}"
    else:
        where = f"{result.device}: {result.device_name}, {result.cpu_threads} threads"
    return f"{where} · {result.dtype}"


def _input_line(result) -> str:
    timed = len(result.latencies_ms)
    if result.mode == "generate":
        return (f"batch {result.batch} × prompt {result.seq_len} tokens, {result.new_tokens} new tokens each "
                f"(greedy, KV cache), {timed} timed generate calls after {result.warmup} warm-up")
    noun = "steps (forward + backward + AdamW)" if result.mode == "train-step" else "forward passes"
    return f"batch {result.batch} × seq_len {result.seq_len}, {timed} timed {noun} after {result.warmup} warm-up"


def _compute_line(result) -> str:
    if result.flops_per_token is None:
        return "n/a for generation (decoding is memory-bound: see tokens/s)"
    achieved = (f"{result.achieved_tflops:.3g} TFLOP/s achieved ({result.flops_per_token / 1e9:.3g} GFLOP/token, "
                f"{_FORMULA[result.mode]})")
    if result.mfu is None:
        return f"{achieved}; MFU n/a on {result.device_name if result.device.startswith('cuda') else 'cpu'}: " \
               f"pass --peak-tflops"
    return f"{achieved}; MFU {result.mfu:.1%} of {result.peak_tflops:g} TFLOP/s ({result.peak_source})"


def _mfu_short(result) -> str:
    if result.flops_per_token is None:
        return "n/a"
    return "n/a" if result.mfu is None else f"{result.mfu:.1%}"


def format_result(result) -> str:
    lat = result.latencies_ms
    noun = {"forward": "pass", "train-step": "step", "generate": "generate call"}[result.mode]
    lines = [
        f"fastgpt profile · {result.mode} · {result.size}, random weights",
        f"model       {result.parameters / 1e6:.1f}M parameters ({result.parameters_tied / 1e6:.1f}M with the "
        f"output head tied; {result.non_embedding_parameters / 1e6:.1f}M in matmuls)",
        f"device      {_device_line(result)} · backend {result.backend}",
        f"paths       {format_paths(result.paths, verdicts=result.verdicts) or '(no dispatched op ran)'}  "
        f"(calls per {noun})",
        f"input       {_input_line(result)}",
        f"latency     median {result.median_ms:,.2f} ms per {noun}  (min {min(lat):,.2f}, max {max(lat):,.2f})",
    ]
    gen = result.generation
    if gen is not None:
        prefill = statistics.median(gen.prefill_ms)
        lines += [
            f"prefill     median {prefill:,.2f} ms for the {result.seq_len}-token prompt "
            f"({result.batch * result.seq_len / (prefill / 1000):,.0f} tokens/s)",
            f"first token median {statistics.median(gen.first_token_ms):,.2f} ms (time to first token)",
        ]
        if result.tokens_per_s is not None:
            per_step = 1000 * result.batch / result.tokens_per_s
            lines.append(f"decode      median {per_step:,.2f} ms per token step, {result.tokens_per_s:,.1f} tokens/s "
                         f"(batch {result.batch}, {result.new_tokens - 1} steps after the first token)")
        else:
            lines.append("decode      n/a: one new token is all prefill (use --new-tokens 2 or more)")
    else:
        lines.append(f"throughput  {_rate(result.tokens_per_s)} tokens/s")
    lines.append(f"compute     {_compute_line(result)}")
    lines.append(f"memory      {_memory_text(result.memory)}")
    if result.ops is not None:
        lines += ["", *format_op_table(result, result.ops)]
    if result.trace:
        lines.append(f"trace       {result.trace} (open in https://ui.perfetto.dev or chrome://tracing)")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def _name(text: str, indent: int) -> str:
    text = " " * indent + text
    return text if len(text) <= NAME_WIDTH else text[:NAME_WIDTH - 1] + "…"


def _op_rows(table: OpTable, group: OpGroup) -> list[str]:
    shown = TOP_OPS.get(group.name, TOP_OPS_DEFAULT)
    rows = [f"{_name(op.name, 2):<{NAME_WIDTH}}  {'' if op.name.startswith('(') else _count(op.calls):>6}  "
            f"{op.ms:>9,.2f}  {table.share(op.ms):>6.1%}  {op.path}".rstrip() for op in group.ops[:shown]]
    rest = group.ops[shown:]
    if rest:
        ms = sum(op.ms for op in rest)
        more = f"({len(rest)} more {'op' if len(rest) == 1 else 'ops'})"
        rows.append(f"{_name(more, 2):<{NAME_WIDTH}}  {'':>6}  {ms:>9,.2f}  "
                    f"{table.share(ms):>6.1%}")
    return rows


def format_op_table(result, table: OpTable) -> list[str]:
    what = "GPU kernel time, charged to the op that launched it" if table.basis == "self device" else "self CPU time"
    lines = [f"{what}, per {'pass' if result.mode == 'forward' else 'step' if result.mode == 'train-step' else 'call'}"
             f" over {table.passes} profiled {'pass' if table.passes == 1 else 'passes'} (profiler overhead included)",
             f"{'group / op':<{NAME_WIDTH}}  {'calls':>6}  {'ms':>9}  {'share':>6}  path"]
    for group in table.groups:
        lines.append(f"{group.name:<{NAME_WIDTH}}  {'':>6}  {group.ms:>9,.2f}  {table.share(group.ms):>6.1%}  "
                     f"{_group_path(result, group.name)}")
        lines += _op_rows(table, group)
    lines.append(f"{'total':<{NAME_WIDTH}}  {'':>6}  {table.total_ms:>9,.2f}  {1:>6.1%}")
    if table.note:
        lines.append(f"note: {table.note}")
    return lines


def _ratio(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}×"


def format_comparison(comparison) -> str:
    eager, triton = comparison.eager, comparison.triton
    noun = {"forward": "pass", "train-step": "step", "generate": "generate call"}[eager.mode]
    width = 24

    def row(label, left, right, ratio=""):
        return f"{label:<{width}}{left:>16}{right:>16}{ratio:>11}".rstrip()

    lines = [
        f"fastgpt profile --compare · {eager.mode} · {eager.size}, random weights",
        f"device      {_device_line(eager)} · eager vs triton (backend {triton.backend}), same weights and inputs",
        f"input       {_input_line(eager)}",
        "",
        row("", "eager", "triton", "speed-up"),
        row(f"latency per {noun}", f"{eager.median_ms:,.2f} ms",
            f"{triton.median_ms:,.2f} ms", _ratio(comparison.speedup(eager.median_ms, triton.median_ms))),
    ]
    if eager.generation is not None:
        pe, pt = statistics.median(eager.generation.prefill_ms), statistics.median(triton.generation.prefill_ms)
        fe = statistics.median(eager.generation.first_token_ms)
        ft = statistics.median(triton.generation.first_token_ms)
        lines += [row("prefill", f"{pe:,.2f} ms", f"{pt:,.2f} ms", _ratio(comparison.speedup(pe, pt))),
                  row("first token", f"{fe:,.2f} ms", f"{ft:,.2f} ms", _ratio(comparison.speedup(fe, ft)))]
    te, tt = eager.tokens_per_s, triton.tokens_per_s
    label = "decode tokens/s" if eager.mode == "generate" else "tokens/s"
    lines.append(row(label, "n/a" if te is None else f"{te:,.1f}", "n/a" if tt is None else f"{tt:,.1f}",
                     _ratio(comparison.speedup(tt, te))))
    if eager.flops_per_token is not None:
        lines.append(row("MFU", _mfu_short(eager), _mfu_short(triton)))
    lines.append(row("peak memory", _mib(eager.memory.peak_bytes), _mib(triton.memory.peak_bytes)))
    lines += ["", f"eager paths   {format_paths(eager.paths)}",
              f"triton paths  {format_paths(triton.paths, verdicts=triton.verdicts)}"]
    if eager.ops is not None and triton.ops is not None:
        what = "GPU kernel time" if eager.ops.basis == "self device" else "self CPU time"
        lines += ["", f"{what} per {noun} in ms, over {eager.ops.passes} profiled "
                      f"{'pass' if eager.ops.passes == 1 else 'passes'} each",
                  row("group", "eager", "triton", "speed-up") + "  triton path"]
        for group in eager.ops.groups:
            other = triton.ops.group(group.name)
            right = other.ms if other else None
            lines.append(row(group.name, f"{group.ms:,.2f}", "–" if right is None else f"{right:,.2f}",
                             _ratio(comparison.speedup(group.ms, right))) + f"  {_group_path(triton, group.name)}")
        lines.append(row("total", f"{eager.ops.total_ms:,.2f}", f"{triton.ops.total_ms:,.2f}",
                         _ratio(comparison.speedup(eager.ops.total_ms, triton.ops.total_ms))))
    for result, name in ((eager, "eager"), (triton, "triton")):
        if result.trace:
            lines.append(f"trace ({name})  {result.trace}")
    notes = dict.fromkeys(eager.notes + triton.notes)
    lines += [f"note: {note}" for note in notes]
    lines.append(f"speed-up: eager time / triton time (above 1: Triton is faster); memory: {eager.memory.method}")
    return "\n".join(lines)

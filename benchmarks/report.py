"""Turn one pytest-benchmark JSON into a markdown report and throughput plots.

    python benchmarks/report.py results.json OUTDIR [--title TEXT] [--no-plots]

Writes ``OUTDIR/<name>.md`` (``<name>``: the JSON's file name without
``.json``) and, for each model-level measurement swept over sequence length,
``OUTDIR/<name>-<suite>-b<batch>.png``: tokens/s against sequence length, one
line per implementation (matplotlib).

The markdown starts with what was measured on (device, torch, Triton and
transformers versions, the commit, the mode the suites ran in), then one table
per pytest-benchmark group: each implementation's median and min time, the
figures the suite recorded (tokens/s, TFLOP/s, MFU, GB/s) and its speed-up
over fastgpt (eager) and over transformers -- the other's median divided by
this one, both measured in the same run (above 1: faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# Model-level suites (extra_info["suite"]), in report order, and whether their plot shows throughput.
SUITES = {"forward": "Model forward", "train step": "Training step (forward + backward + AdamW)",
          "prefill": "Generation: prefill", "first token": "Generation: time to first token",
          "decode": "Generation: decode"}
PLOTTED = ("forward", "train step", "prefill", "decode")
IMPL_ORDER = ("fastgpt (triton)", "fastgpt", "triton", "fastgpt (eager)", "eager", "kv cache", "torch.compile", "sdpa",
              "eager reference", "no cache (seed loop)", "transformers")
# Sections for the suites that record no extra_info["suite"], by test file.
FILE_SECTIONS = {"test_op_attention": "Op: causal attention",
                 "test_op_decode_attention": "Op: decode attention",
                 "test_op_layer_norm": "Op: LayerNorm and dropout + add + LayerNorm",
                 "test_op_gelu": "Op: bias + GELU",
                 "test_model_kv_cache": "Generation: KV cache vs the seed's no-cache loop"}
EAGER = ("fastgpt (eager)", "eager")
PEER = ("transformers",)
METRICS = (("tokens/s", "tokens/s", "{:,.1f}"), ("TFLOP/s", "TFLOP/s", "{:,.4g}"), ("GB/s", "GB/s", "{:,.1f}"),
           ("MFU", "MFU", "{:.1%}"))


class ReportError(ValueError):
    """The input is not a pytest-benchmark JSON report this command can read."""


def load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ReportError(f"{path}: not a pytest-benchmark report (no 'benchmarks' list; "
                          "write one with pytest --benchmark-json FILE)")
    if not data["benchmarks"]:
        raise ReportError(f"{path}: holds no timed benchmarks (was it run with --benchmark-disable?)")
    return data


def implementation(bench: dict) -> str:
    """The row label: what the suite recorded, else the test's parameters."""
    info, params = bench.get("extra_info") or {}, bench.get("params") or {}
    for value in (info.get("impl"), params.get("impl"), params.get("name")):
        if value:
            return str(value)
    return bench.get("param") or bench["name"]


def _order(label: str) -> tuple:
    return (IMPL_ORDER.index(label) if label in IMPL_ORDER else len(IMPL_ORDER), label)


def section(bench: dict) -> str:
    suite = (bench.get("extra_info") or {}).get("suite")
    if suite in SUITES:
        return SUITES[suite]
    # Kernel-level and other suites: one section per test file.
    stem = Path(bench.get("fullname", "").split("::")[0]).stem
    return FILE_SECTIONS.get(stem, f"{stem}.py" if stem else "other")


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:,.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:,.3g} ms"
    return f"{seconds * 1e6:,.3g} µs"


def _ratio(baseline, row) -> str:
    if baseline is None or row is baseline:
        return "1.00×" if row is baseline else "–"
    return f"{baseline['stats']['median'] / row['stats']['median']:.2f}×"


def group_table(benches: list[dict]) -> list[str]:
    rows = sorted(benches, key=lambda b: _order(implementation(b)))
    by_label = {implementation(b): b for b in rows}
    eager = next((by_label[label] for label in EAGER if label in by_label), None)
    peer = next((by_label[label] for label in PEER if label in by_label), None)
    metrics = [m for m in METRICS if any((b.get("extra_info") or {}).get(m[0]) is not None for b in rows)]
    header = ["implementation", "median", "min", *(m[1] for m in metrics)]
    if eager is not None:
        header.append("vs eager")
    if peer is not None:
        header.append("vs transformers")
    header.append("rounds")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for b in rows:
        info, stats = b.get("extra_info") or {}, b["stats"]
        cells = [implementation(b), _time(stats["median"]), _time(stats["min"])]
        for key, _, fmt in metrics:
            value = info.get(key)
            cells.append("n/a" if value is None else fmt.format(value))
        if eager is not None:
            cells.append(_ratio(eager, b))
        if peer is not None:
            cells.append(_ratio(peer, b))
        cells.append(str(stats["rounds"]))
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({_compile_note(b) for b in rows if (b.get("extra_info") or {}).get("compile_backend")})
    paths = sorted({f"{implementation(b)} paths: " + ", ".join(
        f"{op} {'+'.join(f'{p}×{n}' for p, n in by_path.items())}" for op, by_path in b["extra_info"]["paths"].items())
        for b in rows if (b.get("extra_info") or {}).get("paths") and implementation(b) == "fastgpt (triton)"})
    return lines + ([""] + [f"- {n}" for n in notes + paths] if notes or paths else [])


def _compile_note(bench: dict) -> str:
    info = bench["extra_info"]
    note = f"{implementation(bench)}: compiled with backend `{info['compile_backend']}`"
    if info.get("graphs") is not None:
        note += f", {info['graphs']} graph(s), {info.get('graph_breaks', 0)} graph break(s)"
    return note


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def sweeps(benches: list[dict]) -> dict[tuple, dict[str, list[tuple[int, float]]]]:
    """(suite, model, dtype, batch) -> implementation -> [(seq_len, tokens/s)], for sweeps of 2+ lengths."""
    found: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for b in benches:
        info = b.get("extra_info") or {}
        if info.get("suite") in PLOTTED and info.get("tokens/s") is not None and info.get("seq_len"):
            key = (info["suite"], info.get("model", "?"), info.get("dtype", "?"), info.get("batch", 1))
            found[key][implementation(b)].append((info["seq_len"], info["tokens/s"]))
    return {key: {impl: sorted(points) for impl, points in lines.items()}
            for key, lines in found.items() if len({t for pts in lines.values() for t, _ in pts}) >= 2}


def plot(key: tuple, lines: dict[str, list[tuple[int, float]]], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suite, model, dtype, batch = key
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for impl in sorted(lines, key=_order):
        xs, ys = zip(*lines[impl])
        # One colour per implementation in every plot.
        ax.plot(xs, ys, marker="o", label=impl, color=colors[_order(impl)[0] % len(colors)])
    ax.set_xscale("log", base=2)
    xs_all = sorted({t for pts in lines.values() for t, _ in pts})
    ax.set_xticks(xs_all, [str(t) for t in xs_all])
    ax.set_xlabel("prompt length (tokens)" if suite in ("prefill", "decode") else "sequence length (tokens)")
    ax.set_ylabel("generated tokens/s" if suite == "decode" else "tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{suite} · {model} {dtype} · batch {batch}\n{subtitle}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def header(data: dict, title: str | None) -> list[str]:
    machine = data.get("machine_info") or {}
    ours = machine.get("fastgpt") or {}
    commit = data.get("commit_info") or {}
    device = ours.get("device") or machine.get("cpu", {}).get("brand_raw") or machine.get("node", "unknown")
    when = (data.get("datetime") or "")[:10]
    rows = [("device", device), ("when", data.get("datetime", "?")),
            ("torch / Triton / transformers", " / ".join(str(ours.get(k)) for k in ("torch", "triton", "transformers"))),
            ("Python", ours.get("python") or machine.get("python_version")),
            ("CUDA", ours.get("cuda")), ("mode", ours.get("mode")),
            ("model suites", f"{ours.get('model')} in {ours.get('dtype')}" if ours.get("model") else None),
            ("torch.compile backend", ours.get("compile_backend")),
            ("commit", f"{commit.get('id', '?')[:12]}{' (uncommitted changes)' if commit.get('dirty') else ''}"
             if commit else None),
            ("pytest-benchmark", data.get("version")), ("note", ours.get("note"))]
    lines = [f"# {title or f'fastgpt benchmarks: {device}, {when}'}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows if v not in (None, "", "None / None / None")]
    lines += ["", "Times are per call (median and min over the rounds). Speed-ups divide the baseline's median by "
                  "the row's, both from this run: above 1 means faster than fastgpt (eager) or transformers.", ""]
    return lines


def build(data: dict, outdir: Path, name: str, title: str | None = None, plots: bool = True) -> list[Path]:
    """Write the markdown (and plots); return the files written."""
    benches = [b for b in data["benchmarks"] if b.get("stats")]
    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    images: dict[str, list[str]] = defaultdict(list)
    if plots:
        subtitle = (data.get("machine_info") or {}).get("fastgpt", {}).get("device", "")
        for key, lines in sorted(sweeps(benches).items()):
            suite, model, dtype, batch = key
            path = outdir / f"{name}-{_slug(suite)}-b{batch}.png"
            plot(key, lines, path, subtitle)
            written.append(path)
            images[SUITES[suite]].append(f"![{suite} tokens/s vs sequence length, batch {batch}]({path.name})")
    sections: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for b in benches:
        sections[section(b)][b.get("group") or b["name"]].append(b)
    order = list(SUITES.values()) + sorted(s for s in sections if s not in SUITES.values())
    md = header(data, title)
    for title_ in order:
        if title_ not in sections:
            continue
        md += [f"## {title_}", ""]
        for group in sorted(sections[title_], key=_group_key):
            md += [f"### {group}", "", *group_table(sections[title_][group]), ""]
        md += [*(f"{image}\n" for image in images.get(title_, []))]
    path = outdir / f"{name}.md"
    path.write_text("\n".join(md).rstrip() + "\n")
    return [path, *written]


def _group_key(group: str) -> tuple:
    # Natural order: "batch 1 × seq 128" before "batch 1 × seq 1024", "B8" before "B16".
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", group))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="a pytest --benchmark-json file")
    parser.add_argument("outdir", type=Path, help="folder for the markdown and PNG plots (created if missing)")
    parser.add_argument("--title", default=None, help="the markdown's title (default: device and date)")
    parser.add_argument("--no-plots", action="store_true", help="markdown only (no matplotlib needed)")
    args = parser.parse_args(argv)
    try:
        data = load(args.json)
        if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
            raise ReportError("plots need matplotlib (pip install matplotlib, or pass --no-plots)")
        written = build(data, args.outdir, args.json.name.removesuffix(".json"), args.title, plots=not args.no_plots)
    except ReportError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

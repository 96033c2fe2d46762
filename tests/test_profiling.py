"""The profiler behind `fastgpt profile`: op grouping, the per-op table, the modes, MFU, memory, compare."""

import json
import math
import re
import statistics
from types import SimpleNamespace

import pytest
import torch

import fastgpt
from fastgpt import ops
from fastgpt.profiling import compare, flops, profile, report_json, triton_side
from fastgpt.profiling.op_table import PYTHON_ROW, UNCLAIMED_ROW, build_op_table, op_group

# GPT-2's shape, small enough for a CPU test: head_dim 64, GPT-2's vocabulary.
TINY = {"vocab_size": 50257, "context_length": 64, "emb_dim": 128, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.1, "qkv_bias": False}


# ---------------------------------------------------------------- grouping by name

@pytest.mark.parametrize("name,group", [
    ("aten::scaled_dot_product_attention", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_flash_attention_forward", "attention"),
    ("aten::_efficient_attention_backward", "attention"),
    ("fastgpt::causal_attention", "attention"),
    ("fastgpt::causal_attention_backward", "attention"),
    ("fastgpt::decode_attention", "attention"),
    ("autograd::engine::evaluate_function: ScaledDotProductFlashAttentionForCpuBackward0", "attention"),
    ("aten::layer_norm", "layernorm"),
    ("aten::native_layer_norm_backward", "layernorm"),
    ("fastgpt::layer_norm", "layernorm"),
    ("fastgpt::dropout_add_layer_norm", "layernorm"),
    ("NativeLayerNormBackward0", "layernorm"),
    ("aten::gelu", "gelu"),
    ("fastgpt::gelu_backward", "gelu"),
    ("autograd::engine::evaluate_function: GeluBackward0", "gelu"),
    ("aten::mm", "matmul"),
    ("aten::addmm", "matmul"),
    ("aten::bmm", "matmul"),
    ("aten::matmul", "matmul"),
    ("aten::linear", "matmul"),
    ("autograd::engine::evaluate_function: AddmmBackward0", "matmul"),
    ("MmBackward0", "matmul"),
    ("Optimizer.step#AdamW.step", "optimizer"),
    ("aten::embedding", "other"),
    ("aten::add", "other"),
    ("aten::copy_", "other"),
    ("aten::mul", "other"),
    ("EmbeddingBackward0", "other"),
])
def test_ops_are_grouped_by_name(name, group):
    assert op_group(name) == group


# ---------------------------------------------------------------- the table, on synthetic events

CPU, CUDA = SimpleNamespace(name="CPU"), SimpleNamespace(name="CUDA")


def _event(name, self_us=0.0, parent=None, kernels=(), seq=-1, thread=1, fwd_thread=0, annotation=False):
    return SimpleNamespace(name=name, device_type=CPU, is_async=False, self_cpu_time_total=self_us,
                           kernels=[SimpleNamespace(name=k, duration=d) for k, d in kernels], cpu_parent=parent,
                           is_user_annotation=annotation, sequence_nr=seq, thread=thread, fwd_thread=fwd_thread)


def _kernel(name, us):
    return SimpleNamespace(name=name, device_type=CUDA, is_async=False,
                           time_range=SimpleNamespace(elapsed_us=lambda: us))


def _rows(table):
    return {(g.name, o.name): o for g in table.groups for o in g.ops}


def test_self_cpu_time_is_grouped_per_pass_and_children_join_their_callers_group():
    label = _event("fastgpt.forward", 40, annotation=True)
    sdpa = _event("aten::scaled_dot_product_attention", 10, label, seq=5)
    math_bmm = _event("aten::bmm", 300, sdpa, seq=6)        # inside attention: attention time
    linear = _event("aten::linear", 20, label, seq=7)
    mm = _event("aten::mm", 1000, linear, seq=8)
    add = _event("aten::add", 60, label)
    events = [label, sdpa, math_bmm, linear, mm, add]
    table = build_op_table(events, passes=2, device_time=False)

    assert table.basis == "self CPU"
    groups = {g.name: g.ms for g in table.groups}
    assert [g.name for g in table.groups] == ["attention", "layernorm", "gelu", "matmul", "other"]
    assert groups == pytest.approx({"attention": 0.155, "layernorm": 0.0, "gelu": 0.0, "matmul": 0.51,
                                    "other": 0.05})
    rows = _rows(table)
    assert rows[("attention", "aten::bmm")].path == "eager"
    assert rows[("other", PYTHON_ROW)].ms == pytest.approx(0.02)  # the label's own time: Python between ops
    assert rows[("matmul", "aten::mm")].calls == 0.5
    assert table.total_ms == pytest.approx(0.715)
    assert table.share(table.group("matmul").ms) == pytest.approx(0.51 / 0.715)


def test_backward_ops_join_their_forward_ops_group_and_the_optimizer_its_own():
    sdpa = _event("aten::scaled_dot_product_attention", 1, seq=5, thread=1)
    fwd_bmm = _event("aten::bmm", 1, sdpa, seq=6, thread=1)
    plain_mm = _event("aten::mm", 1, seq=9, thread=1)
    # Backward of the bmm inside attention: autograd names it BmmBackward0 (matmul by name).
    node = _event("autograd::engine::evaluate_function: BmmBackward0", 1, seq=6, fwd_thread=1)
    bwd_bmm = _event("aten::bmm", 100, node)
    node2 = _event("autograd::engine::evaluate_function: MmBackward0", 1, seq=9, fwd_thread=1)
    bwd_mm = _event("aten::mm", 200, node2)
    step = _event("Optimizer.step#AdamW.step", 5)
    sqrt = _event("aten::sqrt", 50, step)
    table = build_op_table([sdpa, fwd_bmm, plain_mm, node, bwd_bmm, node2, bwd_mm, step, sqrt], 1,
                           device_time=False)
    groups = {g.name: g.ms * 1000 for g in table.groups}
    assert groups["attention"] == pytest.approx(1 + 1 + 1 + 100)
    assert groups["matmul"] == pytest.approx(1 + 1 + 200)
    assert groups["optimizer"] == pytest.approx(55)


def test_device_time_charges_kernels_to_their_launching_op_and_never_counts_annotations():
    label = _event("fastgpt.forward", 500, annotation=True, kernels=[("fastgpt.forward", 900.0)])
    attn = _event("fastgpt::causal_attention", 30, label, kernels=[("_attn_fwd_kernel", 120.0)])
    linear = _event("aten::linear", 5, label)
    mm = _event("aten::mm", 8, linear, kernels=[("nvjet_tst_128x64", 300.0), ("memset", 2.0)])
    view = _event("aten::view", 3, label)  # launches nothing: no device time, no row
    device = [_kernel("_attn_fwd_kernel", 120.0), _kernel("nvjet_tst_128x64", 300.0), _kernel("memset", 2.0),
              _kernel("triton_unclaimed", 78.0), _kernel("fastgpt.forward", 900.0)]
    table = build_op_table([label, attn, linear, mm, view, *device], passes=1, device_time=True)

    assert table.basis == "self device"
    rows = _rows(table)
    assert rows[("attention", "fastgpt::causal_attention")].ms == pytest.approx(0.120)
    assert rows[("attention", "fastgpt::causal_attention")].path == "triton"
    assert rows[("matmul", "aten::mm")].ms == pytest.approx(0.302)
    assert rows[("other", UNCLAIMED_ROW)].ms == pytest.approx(0.078)
    assert ("other", "aten::view") not in rows and ("other", PYTHON_ROW) not in rows
    assert table.total_ms == pytest.approx(0.5)  # the kernels, once each; the annotation's span never


def test_without_device_kernels_the_table_falls_back_to_cpu_time_and_says_so():
    table = build_op_table([_event("aten::mm", 70)], passes=1, device_time=True)
    assert table.basis == "self CPU" and "no device kernels" in table.note
    assert table.group("matmul").ms == pytest.approx(0.07)


# ---------------------------------------------------------------- FLOPs and MFU

@pytest.mark.parametrize("cfg", [TINY, {**fastgpt.gpt2_config("gpt2-small")}, {**TINY, "qkv_bias": True}])
def test_non_embedding_parameters_count_every_matrix_but_the_embeddings(cfg):
    model = fastgpt.GPTModel(cfg)
    embeddings = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    assert flops.non_embedding_parameters(cfg) == fastgpt.parameter_count(model) - embeddings


def test_flops_per_token_follow_the_documented_formula():
    cfg = fastgpt.gpt2_config("gpt2-small")
    n = flops.non_embedding_parameters(cfg)
    assert n == 123_625_728
    assert flops.flops_per_token(cfg, 1024, training=False) == 2 * n + 4 * 12 * 1024 * 768
    assert flops.flops_per_token(cfg, 1024, training=True) == 6 * n + 12 * 12 * 1024 * 768


@pytest.mark.parametrize("name,dtype,tf32,peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989.0),
    ("NVIDIA H100 80GB HBM3", torch.float16, False, 989.0),
    ("NVIDIA H100 80GB HBM3", torch.float32, False, 67.0),
    ("NVIDIA H100 80GB HBM3", torch.float32, True, 494.5),
    ("NVIDIA H200", torch.bfloat16, False, 989.0),
    ("NVIDIA H100 PCIe", torch.bfloat16, False, 756.0),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, False, 312.0),
    ("NVIDIA A100 80GB PCIe", torch.float32, True, 156.0),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, False, None),
    ("AMD EPYC", torch.float32, False, None),
])
def test_peak_tflops_table(name, dtype, tf32, peak):
    assert flops.peak_tflops(name, dtype, tf32=tf32) == peak


def test_mfu():
    assert flops.mfu(1000.0, 1e9, None) is None
    assert flops.mfu(100_000.0, 1e9, 200.0) == pytest.approx(0.5)


# ---------------------------------------------------------------- real runs on the CPU

def test_forward_profile_measures_latency_paths_ops_and_memory():
    result = profile(config=TINY, seq_len=16, batch=2, warmup=1, iters=3)
    assert result.mode == "forward" and result.size == "custom" and len(result.latencies_ms) == 3
    assert all(t > 0 for t in result.latencies_ms)
    assert result.tokens_per_s == pytest.approx(2 * 16 / (result.median_ms / 1000))
    assert result.paths == {"causal_attention": {"eager": 2}, "dropout_add_layer_norm": {"eager": 2},
                            "layer_norm": {"eager": 3}, "linear_gelu": {"eager": 2}}
    assert result.flops_per_token == flops.flops_per_token({**TINY}, 16, training=False)
    assert result.mfu is None and result.peak_tflops is None  # no peak known for a CPU
    assert result.memory.peak_bytes >= result.memory.before_bytes > 0

    table = result.ops
    assert table.basis == "self CPU" and table.passes == 3
    rows = _rows(table)
    # Per pass: 2 blocks × 2 norms + the final one; every matmul: 2 × (query, key, value + out + 2 ff) + the head.
    assert rows[("layernorm", "aten::native_layer_norm")].calls == 5
    assert rows[("layernorm", "aten::native_layer_norm")].path == "eager"
    assert sum(o.calls for g in table.groups if g.name == "matmul" for o in g.ops
               if o.name in ("aten::mm", "aten::addmm")) == 13
    assert any(name.startswith("aten::_scaled_dot_product") for group, name in rows if group == "attention")
    assert rows[("gelu", "aten::gelu")].calls == 2
    assert all(g.ms >= 0 for g in table.groups) and table.total_ms > 0
    assert "optimizer" not in {g.name for g in table.groups}

    text = result.format()
    for fragment in ("fastgpt profile · forward · custom", "batch 2 × seq_len 16, 3 timed forward passes",
                     "MFU n/a on cpu", "self CPU time, per pass over 3 profiled passes", "attention ", "total "):
        assert fragment in text


def test_train_step_profile_counts_backward_and_optimizer_and_mfu_with_a_given_peak():
    result = profile(config=TINY, mode="train-step", seq_len=8, warmup=1, iters=2, peak_tflops=1.0)
    assert result.flops_per_token == flops.flops_per_token(TINY, 8, training=True)
    assert result.mfu == pytest.approx(result.tokens_per_s * result.flops_per_token / 1e12)
    assert result.peak_source == "given"
    groups = {g.name: g for g in result.ops.groups}
    assert groups["optimizer"].ms > 0
    assert any("backward" in op.name.lower() for op in groups["layernorm"].ops)
    assert any("backward" in op.name.lower() for op in groups["gelu"].ops)
    assert "dropout (0.1)" in result.format()


def test_generate_profile_reports_prefill_first_token_and_decode_rate():
    result = profile(config=TINY, mode="generate", seq_len=8, new_tokens=5, batch=2, warmup=0, iters=2)
    gen = result.generation
    assert len(gen.prefill_ms) == len(gen.first_token_ms) == len(gen.decode_tokens_per_s) == 2
    total, first = result.latencies_ms[0], gen.first_token_ms[0]
    assert 0 < first < total
    assert gen.decode_tokens_per_s[0] == pytest.approx(2 * 4 / ((total - first) / 1000))
    assert result.tokens_per_s == pytest.approx(statistics.median(gen.decode_tokens_per_s))
    # One prefill (causal attention) and four decode steps per call, through both blocks.
    assert result.paths["cached_attention"] == {"eager": 2 * 4}
    assert result.paths["causal_attention"] == {"eager": 2 * 1}
    assert result.flops_per_token is None and result.mfu is None
    text = result.format()
    assert "prefill     median" in text and "first token median" in text and "decode      median" in text


def test_trace_and_json_report(tmp_path):
    trace = tmp_path / "trace.json"
    result = profile(config=TINY, seq_len=8, warmup=0, iters=1, trace=str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "fastgpt.forward" for e in events)
    report = json.loads(json.dumps(report_json([result])))
    run = report["runs"][0]
    assert report["tool"] == "fastgpt profile" and report["torch_version"] == torch.__version__
    assert run["latency_ms"]["median"] == result.median_ms and run["tokens_per_s"] == result.tokens_per_s
    assert [g["name"] for g in run["ops"]["groups"]] == ["attention", "layernorm", "gelu", "matmul", "other"]
    assert math.isclose(sum(g["share"] for g in run["ops"]["groups"]), 1.0)


@pytest.mark.parametrize("options,message", [
    (dict(mode="backward"), "unknown mode 'backward'"),
    (dict(seq_len=65), "seq_len must be in [1, 64] (the context length), got 65"),
    (dict(mode="generate", seq_len=60, new_tokens=6), "need 65 cache positions, more than the context length 64"),
    (dict(mode="forward", new_tokens=4), "new_tokens applies to mode 'generate' only"),
    (dict(dtype="float64"), "unknown dtype 'float64'"),
    (dict(peak_tflops=0.0), "peak_tflops must be > 0"),
    (dict(trace="/no/such/folder/trace.json"), "its folder does not exist"),
    (dict(backend="fast"), "unknown backend 'fast'"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        profile(config=TINY, **options)


def test_compare_needs_triton_to_run_somewhere(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="--compare needs Triton kernels that run on cpu"):
        triton_side(torch.device("cpu"))
    assert triton_side(torch.device("cuda")) == "auto"
    with pytest.raises(ValueError, match="do not pass a backend"):
        compare(config=TINY, backend="eager")


@pytest.mark.skipif(torch.cuda.is_available() or not ops.interpreter_on(), reason="the interpreter run is for CPUs")
def test_compare_runs_eager_and_triton_on_the_same_model_under_the_interpreter():
    comparison = compare(config={**TINY, "n_layers": 1}, seq_len=8, warmup=0, iters=1)
    eager, triton = comparison.eager, comparison.triton
    assert eager.backend == "eager" and triton.backend == "triton"
    assert all(set(by_path) == {"eager"} for by_path in eager.paths.values())
    assert all(set(by_path) == {"triton"} for by_path in triton.paths.values())
    assert any(op.path == "triton" for g in triton.ops.groups for op in g.ops)
    assert comparison.to_dict()["latency"] == pytest.approx(eager.median_ms / triton.median_ms)
    text = comparison.format()
    assert "eager vs triton (backend triton)" in text and "interpreter" in text and "speed-up" in text


def test_profile_leaves_the_callers_counts_random_state_and_backend_as_they_were():
    ops.reset_dispatch_counts()
    ops.dispatch_counts[("gelu", "eager")] = 7  # the caller's own record
    torch.manual_seed(42)
    expected_next = torch.rand(3)
    torch.manual_seed(42)
    fastgpt.set_backend("eager")
    result = profile(config=TINY, seq_len=4, warmup=0, iters=1, profile_ops=False)
    assert result.backend == "eager"  # no backend given: the one in force
    assert dict(ops.dispatch_counts) == {("gelu", "eager"): 7}
    assert torch.equal(torch.rand(3), expected_next)
    assert fastgpt.get_backend() == "eager"

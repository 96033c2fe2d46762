"""fastgpt.fused_linear_cross_entropy and GPTModel.loss: the unfused loss's numbers, without its logits.

The eager path is checked against ``F.cross_entropy`` on the materialised
logits (the issue's bar: loss and every gradient within 1e-5 in float32); the
Triton kernel against a float64 reference under the interpreter (docs/design.md's
tolerances), with its outputs poisoned and its dispatch counted.
"""

import concurrent.futures
import multiprocessing

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import GPTModel, ops
from fastgpt import loss as loss_module
from fastgpt.loss import default_chunk_rows, fused_linear_cross_entropy
from catalogue_launches import launches_in_the_catalogue
from helpers import TINY, TOLERANCES, kernel_device, rel_err
from reference_model import RefGPTModel
from seed_training import seed_calc_loss_batch

HALF_DTYPES = (torch.bfloat16, torch.float16)


def _inputs(rows_shape=(3, 13), emb=24, vocab=97, dtype=torch.float32, device="cpu", ignored_every=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*rows_shape, emb, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, emb, generator=g) / emb**0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, vocab, rows_shape, generator=g)
    if ignored_every:
        targets.view(-1)[::ignored_every] = -100
    return hidden, weight, targets.to(device)


def _unfused(hidden, weight, targets, **kwargs):
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), **kwargs)


def _loss_and_grads(fn, hidden, weight, targets, **kwargs):
    loss = fn(hidden, weight, targets, **kwargs)
    return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))


# ---------------------------------------------------------------- eager path: the unfused numbers

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_loss_and_gradients_equal_the_unfused_ones(reduction, chunk_size):
    hidden, weight, targets = _inputs()  # 39 rows: 7 leaves a ragged last chunk
    with fastgpt.use_backend("eager"):
        got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, reduction=reduction,
                              chunk_size=chunk_size)
    want = _loss_and_grads(_unfused, hidden, weight, targets, reduction=reduction)
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, want):
        assert a.dtype == b.dtype and rel_err(a, b) <= 1e-5, name


def test_ignore_index_of_your_own_and_batches_with_nothing_to_learn_match_cross_entropy():
    hidden, weight, targets = _inputs(ignored_every=0)
    targets = torch.where(targets % 3 == 0, torch.full_like(targets, 5), targets)  # class 5 ignored, not -100
    got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, ignore_index=5)
    want = _loss_and_grads(_unfused, hidden, weight, targets, ignore_index=5)
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got, want))
    everything_ignored = torch.full_like(targets, -100)
    for reduction in ("mean", "sum"):
        got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, everything_ignored, reduction=reduction)
        want = _loss_and_grads(_unfused, hidden, weight, everything_ignored, reduction=reduction)
        # F.cross_entropy: NaN for a mean over no targets (0 / 0), 0 for the sum, zero gradients.
        assert torch.equal(got[0], want[0]) or (got[0].isnan() and want[0].isnan()), reduction
        assert want[0].isnan() == (reduction == "mean")
        for a, b in zip(got[1:], want[1:]):
            assert torch.equal(a, b) and not a.any(), reduction


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_under_autocast_the_matmuls_run_in_half_precision_and_the_softmax_in_float32(dtype):
    hidden, weight, targets = _inputs()
    with torch.autocast("cpu", dtype=dtype):
        got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, chunk_size=8)
        want = _loss_and_grads(_unfused, hidden, weight, targets)
    reference = _loss_and_grads(_unfused, hidden.double(), weight.double(), targets)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    # The loss sees the same half-precision logits as the unfused one, softmax in float32 in both.
    assert rel_err(got[0], want[0]) <= 1e-5
    fwd_tol, grad_tol = TOLERANCES[dtype]
    for a, b, ref in zip(got[1:], want[1:], reference[1:]):
        assert rel_err(a, b) <= grad_tol and rel_err(a, ref) <= grad_tol
    assert rel_err(got[0], reference[0]) <= fwd_tol


def test_the_logits_are_built_one_chunk_at_a_time_and_only_losses_without_autograd(monkeypatch):
    seen = []
    real = ops.cross_entropy_rows_eager

    def recording(logits, targets, scale, ignore_index, compute_grad):
        seen.append((logits.shape[0], compute_grad))
        return real(logits, targets, scale, ignore_index, compute_grad)

    monkeypatch.setattr(ops, "cross_entropy_rows_eager", recording)
    hidden, weight, targets = _inputs()
    fused_linear_cross_entropy(hidden, weight, targets, chunk_size=10).backward()
    assert seen == [(10, True), (10, True), (10, True), (9, True)]
    seen.clear()
    with torch.no_grad():
        value = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=20)
    assert seen == [(20, False), (19, False)]
    assert rel_err(value, _unfused(hidden, weight, targets)) <= 1e-5
    # GPT-2 small in float32 at batch 4 × 256: four chunks of 256 rows, 51 MB each instead of 206.
    assert default_chunk_rows(1024, 50257, 4) == 256
    assert default_chunk_rows(8192, 50257, 2) * 50257 * 2 <= loss_module.CHUNK_BYTES


def _peak_rss_growth(fused: bool) -> int:
    """VmHWM − VmRSS over one forward + backward on 64 MiB of logits. Run in a fresh process: a long
    test session's heap already holds freed pages, which a new allocation reuses without growing RSS."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the high-water mark to the current RSS
    hidden, weight, targets = _inputs(rows_shape=(512,), emb=64, vocab=32768, ignored_every=0)
    loss_fn = (lambda *args: fused_linear_cross_entropy(*args, chunk_size=32)) if fused else _unfused
    before = _status_bytes("VmRSS")
    torch.autograd.grad(loss_fn(hidden, weight, targets), (hidden, weight))
    return _status_bytes("VmHWM") - before


def _in_a_fresh_process(fn, *args):
    """fn(*args) in a newly spawned process of its own (one per call: no heap shared between measurements)."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        return fresh.submit(fn, *args).result()


def test_the_peak_memory_is_a_chunk_not_three_logits_tensors():
    """Measured: process RSS high-water mark (Linux) over one forward + backward, 64 MiB of logits."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError as err:
        pytest.skip(f"needs Linux's resettable RSS high-water mark (/proc/self/clear_refs): {err}")
    logits_bytes = 512 * 32768 * 4
    unfused, fused = _in_a_fresh_process(_peak_rss_growth, False), _in_a_fresh_process(_peak_rss_growth, True)
    # Unfused: the logits, their log-softmax and their gradient (about 3 × 64 MiB). Fused: a 4 MiB
    # chunk, the weight's 8 MiB gradient and the matmuls' workspace -- well under one logits tensor.
    assert unfused >= 2 * logits_bytes, unfused / 2**20  # the measurement sees the unfused logits
    assert fused <= unfused - 2 * logits_bytes, (fused / 2**20, unfused / 2**20)
    assert fused <= logits_bytes, fused / 2**20


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/self/status")


def test_a_second_backward_through_one_loss_is_refused_not_scaled_twice():
    hidden, weight, targets = _inputs()
    loss = fused_linear_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_an_upstream_gradient_scales_both_gradients():
    hidden, weight, targets = _inputs()
    got = torch.autograd.grad(3.5 * fused_linear_cross_entropy(hidden, weight, targets), (hidden, weight))
    want = torch.autograd.grad(3.5 * _unfused(hidden, weight, targets), (hidden, weight))
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got, want))


@pytest.mark.parametrize("change,error,message", [
    (dict(reduction="none"), ValueError, "reduction must be one of"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(targets=lambda t: t.float()), TypeError, "targets must be integer class ids"),
    (dict(targets=lambda t: t[:, :-1]), ValueError, r"targets must have shape hidden.shape\[:-1\]"),
    (dict(targets=lambda t: t.masked_fill(t == t.max(), 97)), ValueError, r"target 97 is outside the vocabulary"),
    (dict(weight=lambda w: w[:, :-1]), ValueError, "weight must be \\(vocab_size, emb_dim\\)"),
    (dict(weight=lambda w: w.double()), TypeError, "hidden is torch.float32 but weight is torch.float64"),
])
def test_bad_input_gets_a_clear_error(change, error, message):
    hidden, weight, targets = _inputs()
    kwargs = {k: v for k, v in change.items() if k not in ("targets", "weight")}
    targets = change["targets"](targets) if "targets" in change else targets
    weight = change["weight"](weight) if "weight" in change else weight
    with pytest.raises(error, match=message):
        fused_linear_cross_entropy(hidden, weight, targets, **kwargs)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32], ids=str)
def test_targets_of_the_dtypes_cross_entropy_takes_give_its_loss(dtype):
    hidden, weight, targets = _inputs(ignored_every=0)  # ids < 97 fit in uint8
    got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets.to(dtype))
    want = _loss_and_grads(_unfused, hidden, weight, targets)
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got, want))
    torch.manual_seed(0)
    model = GPTModel(TINY)
    ids = targets[:1, :8] % TINY["vocab_size"]
    loss = fastgpt.calc_loss_batch(ids, ids.to(dtype), model, "cpu")
    torch.testing.assert_close(loss, fastgpt.calc_loss_batch(ids, ids, model, "cpu"))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint16, torch.uint32, torch.uint64], ids=str)
def test_other_integer_targets_are_refused_with_a_way_out(dtype):
    hidden, weight, targets = _inputs(ignored_every=0)
    message = f"targets must be integer class ids of dtype torch.long .*got {dtype}; convert them with targets.long"
    with pytest.raises(TypeError, match=message):
        fused_linear_cross_entropy(hidden, weight, targets.to(dtype))
    torch.manual_seed(0)
    ids = targets[:1, :8]
    with pytest.raises(TypeError, match=message):
        fastgpt.calc_loss_batch(ids, ids.to(dtype), GPTModel(TINY), "cpu")


# ---------------------------------------------------------------- the model's loss

def _model_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_and_every_gradient_equal_the_unfused_models(tied):
    torch.manual_seed(0)
    model = GPTModel({**TINY, "qkv_bias": True}).train()  # drop_rate 0: deterministic training path
    if tied:
        fastgpt.tie_weights(model)
    idx = torch.randint(0, TINY["vocab_size"], (2, 23))
    targets = torch.randint(0, TINY["vocab_size"], (2, 23))
    targets[1, :5] = -100
    ops.reset_dispatch_counts()
    got_loss, got = _model_grads(model, model.loss(idx, targets))
    assert ops.dispatch_counts[("linear_cross_entropy", "eager")] == 1
    want_loss, want = _model_grads(model, F.cross_entropy(model(idx).flatten(0, 1), targets.flatten()))
    assert rel_err(got_loss, want_loss) <= 1e-5
    total = torch.cat([g.flatten() for g in want.values()]).norm()
    assert list(got) == list(want)
    for name, grad in got.items():
        if want[name].norm() > 1e-8 * total:
            assert rel_err(grad, want[name]) <= 1e-5, name
        else:  # the key bias: zero in exact arithmetic, so only rounding noise to compare
            assert (grad - want[name]).norm() <= 1e-6 * total, name


def test_a_wrapped_output_head_is_called_through_its_logits():
    torch.manual_seed(0)
    model = GPTModel(TINY)
    head = model.out_head
    model.out_head = torch.nn.Sequential(head, torch.nn.Tanh())  # computes more than its weight
    idx, targets = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    ops.reset_dispatch_counts()
    loss = model.loss(idx, targets)
    assert not ops.dispatch_counts[("linear_cross_entropy", "eager")]
    assert rel_err(loss, F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())) <= 1e-6


def test_forward_with_targets_is_the_loss_so_wrappers_run_it():
    torch.manual_seed(0)
    model = GPTModel(TINY)
    idx, targets = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    assert torch.equal(model(idx, targets=targets, reduction="sum"), model.loss(idx, targets, reduction="sum"))
    with pytest.raises(ValueError, match="cannot be combined with kv_cache or last_logits_only"):
        model(idx, targets=targets, last_logits_only=True)


def test_model_loss_checks_its_targets():
    model = GPTModel(TINY)
    idx = torch.randint(0, 97, (2, 9))
    with pytest.raises(ValueError, match=r"targets must be a tensor of the inputs' shape \(2, 9\), got \(2, 8\)"):
        model.loss(idx, idx[:, 1:])
    with pytest.raises(ValueError, match="token ids must have shape"):
        model.loss(idx[0], idx[0])


def test_calc_loss_batch_fuses_for_fastgpt_and_is_the_seeds_for_any_other_model():
    torch.manual_seed(0)
    ours, ref = GPTModel(TINY), RefGPTModel(TINY)
    ref.load_state_dict(ours.state_dict())
    x, y = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    want = seed_calc_loss_batch(x, y, ours, "cpu")
    ops.reset_dispatch_counts()
    assert rel_err(fastgpt.calc_loss_batch(x, y, ours, "cpu"), want) <= 1e-6
    assert ops.dispatch_counts[("linear_cross_entropy", "eager")] == 1
    assert torch.equal(fastgpt.calc_loss_batch(x, y, ref, "cpu"), seed_calc_loss_batch(x, y, ref, "cpu"))
    # Through forward, so the model's hooks (a DDP or FSDP wrapper's own) still run.
    calls = []
    handle = ours.register_forward_pre_hook(lambda *args: calls.append(1))
    fastgpt.calc_loss_batch(x, y, ours, "cpu")
    handle.remove()
    assert calls == [1]
    # A compiled model is called with the targets too; a subclass with its own forward is not.
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager")
    assert rel_err(fastgpt.calc_loss_batch(x, y, compiled, "cpu"), want) <= 1e-6

    class Scaled(GPTModel):
        def forward(self, in_idx):
            return 2 * super().forward(in_idx)

    scaled = Scaled(TINY)
    scaled.load_state_dict(ours.state_dict())
    ops.reset_dispatch_counts()
    assert torch.equal(fastgpt.calc_loss_batch(x, y, scaled, "cpu"), seed_calc_loss_batch(x, y, scaled, "cpu"))
    assert not ops.dispatch_counts[("linear_cross_entropy", "eager")]


def test_calc_loss_loader_averages_the_first_batches_like_the_seeds():
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 97, (2, 9), generator=g), torch.randint(0, 97, (2, 9), generator=g))
               for _ in range(3)]
    with torch.no_grad():
        each = [seed_calc_loss_batch(x, y, model, "cpu").item() for x, y in batches]
        assert fastgpt.calc_loss_loader(batches, model, "cpu") == pytest.approx(sum(each) / 3, rel=1e-6)
        assert fastgpt.calc_loss_loader(batches, model, "cpu", num_batches=2) == pytest.approx(sum(each[:2]) / 2,
                                                                                                rel=1e-6)
        assert fastgpt.calc_loss_loader(batches, model, "cpu", num_batches=10) == pytest.approx(sum(each) / 3,
                                                                                                 rel=1e-6)
    assert fastgpt.calc_loss_loader([], model, "cpu") != fastgpt.calc_loss_loader([], model, "cpu")  # NaN


# ---------------------------------------------------------------- the Triton kernel (the interpreter without a GPU)

def _rows_reference(logits, targets, scale, ignore_index):
    z = logits.double()
    ignored = targets == ignore_index
    losses = (torch.logsumexp(z, 1) - z.gather(1, targets.clamp_min(0)[:, None])[:, 0]).masked_fill(ignored, 0)
    grad = torch.softmax(z, 1) - F.one_hot(targets.clamp_min(0), z.shape[1]).double()
    return losses, grad * scale.double() * (~ignored)[:, None]


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_cols", [97, 1500, 4099])  # one block; two of 1024; two of 4096, the last nearly empty
def test_kernel_losses_and_in_place_gradient_match_float64(forced_triton, dtype, n_cols):
    from fastgpt.kernels.cross_entropy import cross_entropy_rows

    g = torch.Generator().manual_seed(n_cols)
    logits = (3 * torch.randn(9, n_cols, generator=g)).to(kernel_device(), dtype)
    targets = torch.randint(0, n_cols, (9,), generator=g).to(kernel_device())
    targets[[2, 7]] = -100
    scale = torch.tensor(1 / 7, device=kernel_device())
    want_losses, want_grad = _rows_reference(logits, targets, scale, -100)
    losses = cross_entropy_rows(logits, targets, scale, -100, compute_grad=False)
    assert torch.equal(losses, cross_entropy_rows(logits.clone(), targets, scale, -100, compute_grad=True))
    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert losses.dtype == torch.float32 and rel_err(losses, want_losses) <= fwd_tol
    cross_entropy_rows(logits, targets, scale, -100, compute_grad=True)  # logits become the gradient
    assert rel_err(logits, want_grad) <= grad_tol


@pytest.mark.kernels
@pytest.mark.parametrize("autocast_dtype", [None, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_op_with_the_kernel_matches_float64(forced_triton, autocast_dtype, reduction):
    hidden, weight, targets = _inputs(vocab=1500, device=kernel_device())
    reference = _loss_and_grads(_unfused, hidden.double(), weight.double(), targets, reduction=reduction)
    with launches_in_the_catalogue() as launches:  # ... each a specialisation the compile report covers
        with torch.autocast(kernel_device(), dtype=autocast_dtype, enabled=autocast_dtype is not None):
            got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, reduction=reduction,
                                  chunk_size=16)
    assert ops.dispatch_counts[("linear_cross_entropy", "triton")] == 1
    assert not ops.dispatch_counts[("linear_cross_entropy", "eager")]
    assert len(launches) == 3  # 39 rows in chunks of 16
    fwd_tol, grad_tol = TOLERANCES[autocast_dtype or torch.float32]
    assert rel_err(got[0], reference[0]) <= fwd_tol
    for name, a, b in zip(("d hidden", "d weight"), got[1:], reference[1:]):
        assert a.dtype == torch.float32 and rel_err(a, b) <= grad_tol, name


@pytest.mark.kernels
def test_kernel_handles_a_batch_with_nothing_to_learn(forced_triton):
    hidden, weight, targets = _inputs(device=kernel_device())
    everything_ignored = torch.full_like(targets, -100)
    loss, d_hidden, d_weight = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, everything_ignored)
    assert loss.isnan() and not d_hidden.any() and not d_weight.any()
    assert ops.dispatch_counts[("linear_cross_entropy", "triton")] == 1


def test_dispatch_follows_the_default_backend():
    hidden, weight, targets = _inputs()
    ops.reset_dispatch_counts()
    fused_linear_cross_entropy(hidden, weight, targets)  # auto on a CPU tensor: eager
    assert ops.dispatch_counts == {("linear_cross_entropy", "eager"): 1}
    hidden, weight, targets = (t.to(kernel_device()) for t in (hidden.double(), weight.double(), targets))
    with fastgpt.use_backend("triton"), pytest.raises(fastgpt.BackendError, match="logits dtype torch.float64"):
        fused_linear_cross_entropy(hidden, weight, targets)

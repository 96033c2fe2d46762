"""Every card Triton supports: what each launcher chooses there, on fake device properties.

Shared memory per block (opt-in) is 99 KB on sm_86/sm_89 (RTX 30/40), about 163 KB on
sm_80 (A100) and 227 KB on sm_90 (H100/H200). Attention prunes its tuned tiles to the
device by an estimate (attention_configs.candidates); the ahead-of-time report holds
that estimate against each tile's compiled shared memory, and every other kernel's one
derived config against 99 KB (tests/test_kernel_report.py). Below compute capability
8.0 (T4, V100) the tl.dot kernels refuse: Triton lowers tl.dot to FMA there.
"""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from fastgpt import ops  # noqa: E402
from fastgpt.kernels import attention, attention_configs, decode_attention, runtime  # noqa: E402
from fastgpt.kernels.attention_configs import (ARCH_FAMILIES, FP32_HEAD_DIMS, HEAD_DIMS, candidates,  # noqa: E402
                                               configs)

KB = 1024
CARDS = {"64 KB": 64 * KB, "sm_86/sm_89 99 KB": 101376, "sm_80 163 KB": 166912, "sm_90 227 KB": 232448}
FAKE_GPU = torch.device("cuda", 0)


def fake_card(monkeypatch, shared_optin, capability=(8, 6)):
    props = SimpleNamespace(shared_memory_per_block_optin=shared_optin, shared_memory_per_block=48 * KB,
                            multi_processor_count=84, name="fake", major=capability[0], minor=capability[1])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def attention_cases():
    for kind in ("fwd", "bwd"):
        for family in ARCH_FAMILIES:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for d in FP32_HEAD_DIMS if dtype == torch.float32 else HEAD_DIMS:
                    for dropout in (False, True):
                        yield kind, family, d, dtype, dropout


def estimate(config, d, dtype):
    return config.shared_bytes(d, torch.empty((), dtype=dtype).element_size())


@pytest.mark.parametrize("card", CARDS)
def test_attention_keeps_only_tiles_whose_estimate_fits_the_card(monkeypatch, card):
    limit = CARDS[card]
    fake_card(monkeypatch, limit)
    for kind, family, d, dtype, dropout in attention_cases():
        listed = configs(kind, family, d, dtype == torch.float32, dropout)
        kept = candidates(kind, family, d, dtype, dropout, FAKE_GPU)
        fitting = [c for c in listed if estimate(c, d, dtype) <= limit]
        # What fits, in the list's order (the first is the default where tuning cannot run);
        # where nothing fits by the estimate, the list's last (smallest) tile.
        assert kept == (fitting or listed[-1:]), (kind, family, d, dtype, dropout)


def test_each_card_keeps_a_fitting_tile_for_its_own_family(monkeypatch):
    # A card runs its family's list: sm_80 / sm_86 / sm_89 the sm80 one, sm_90 the sm90 one. Every
    # list keeps a tile whose estimate fits, but half-precision d = 128 on a 99 KB card: there the
    # forward keeps its last tile (estimate 112 KB, compiled 88 KB on sm_80: the report holds it).
    for card, family in (("sm_86/sm_89 99 KB", "sm80"), ("sm_80 163 KB", "sm80"), ("sm_90 227 KB", "sm90")):
        limit = CARDS[card]
        fake_card(monkeypatch, limit, capability=(9, 0) if family == "sm90" else (8, 6))
        assert attention_configs.arch_family(FAKE_GPU) == family
        fallbacks = []
        for kind, fam, d, dtype, dropout in attention_cases():
            if fam != family:
                continue
            kept = candidates(kind, family, d, dtype, dropout, FAKE_GPU)
            assert kept
            if not all(estimate(c, d, dtype) <= limit for c in kept):
                fallbacks.append((kind, d, dtype))
        expected = ({("fwd", 128, torch.float16), ("fwd", 128, torch.bfloat16)} if card.startswith("sm_86")
                    else set())
        assert set(fallbacks) == expected, card


def test_the_shared_memory_limit_is_the_opt_in_one_where_the_driver_reports_it(monkeypatch):
    fake_card(monkeypatch, 101376)
    assert runtime.shared_memory_per_block(FAKE_GPU) == 101376
    fake_card(monkeypatch, 0)  # no opt-in reported: the default per-block limit
    assert runtime.shared_memory_per_block(FAKE_GPU) == 48 * KB


def test_the_other_kernels_launch_one_config_whatever_the_card(monkeypatch):
    # LayerNorm, GELU, cross-entropy, column sums and decode derive their one config from the shapes
    # (decode's split count from the SM count), never from shared memory: the report holds that
    # config's compiled shared memory against 99 KB, so it runs on every card Triton supports.
    from fastgpt.kernels import column_sum, cross_entropy, gelu, layer_norm
    from fastgpt.kernels.report import catalogue
    looked_up = []
    props = SimpleNamespace(shared_memory_per_block_optin=64 * KB, shared_memory_per_block=48 * KB,
                            multi_processor_count=84)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: looked_up.append(device) or props)
    derived = (layer_norm.block_n(768), layer_norm.num_warps_for(layer_norm.block_n(768)), gelu.BLOCK,
               gelu.NUM_WARPS, cross_entropy.block_for(50257), column_sum.BLOCK_N,
               decode_attention.plan(96, 1000, runtime.sm_count(FAKE_GPU, elsewhere=4)))
    assert looked_up == [FAKE_GPU]  # the SM count, nothing else
    assert derived[-1] == decode_attention.plan(96, 1000, 84)
    cases = catalogue.all_cases()
    # Only attention's tuned tiles are pruned by shared memory; every other case must fit every card.
    assert {case.kernel.split("_")[0] for case in cases if case.pruning} == {"attention"}
    assert all(case.pruning is None for case in cases if not case.kernel.startswith(("attention_fwd",
                                                                                       "attention_bwd")))
    pruned = [case for case in cases if case.pruning]
    assert all(case.pruning.estimate > 0 and 1 <= case.pruning.size for case in pruned)


# ---------------------------------------------------------------- below compute capability 8.0

REFUSAL = "compute capability {}: Triton lowers tl.dot to FMA below 8.0; fastgpt runs eager there"


@pytest.mark.parametrize("capability, refused", [((7, 5), True), ((7, 0), True), ((6, 1), True),
                                                  ((8, 0), False), ((8, 6), False), ((8, 9), False),
                                                  ((9, 0), False), ((12, 0), False)])
def test_dot_kernels_refuse_below_compute_capability_8(monkeypatch, capability, refused):
    fake_card(monkeypatch, 64 * KB, capability)
    expected = REFUSAL.format(f"{capability[0]}.{capability[1]}") if refused else None
    assert runtime.dot_refusal(FAKE_GPU) == expected
    assert runtime.dot_refusal(torch.device("cpu")) is None  # the interpreter's tensors are never refused


def fake_cuda_tensors(*shapes, dtype=torch.float16):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        return [torch.empty(*shape, device="cuda", dtype=dtype) for shape in shapes]


def test_attention_and_decode_refuse_a_t4_and_accept_an_rtx_4090(monkeypatch):
    q, cache, one = fake_cuda_tensors((1, 2, 8, 64), (1, 2, 8, 64), (1, 2, 1, 64))
    fake_card(monkeypatch, 64 * KB, (7, 5))
    t4 = REFUSAL.format("7.5")
    assert attention.supports(q, q, q) == t4
    assert attention.supports_prefill(q, cache, cache) == t4
    assert decode_attention.supports(one, cache, cache) == t4
    fake_card(monkeypatch, 101376, (8, 9))
    assert attention.supports(q, q, q) is None
    assert decode_attention.supports(one, cache, cache) is None


def test_on_a_t4_auto_runs_eager_and_forced_triton_names_the_reason(monkeypatch):
    q, = fake_cuda_tensors((1, 2, 8, 64))
    fake_card(monkeypatch, 64 * KB, (7, 5))
    with ops.use_backend("auto"):
        assert ops.select_path("causal_attention", q, q, q)[0] == "eager"
    with ops.use_backend("triton"), pytest.raises(ops.BackendError, match=r"compute capability 7\.5: Triton lowers"):
        ops.select_path("causal_attention", q, q, q)


def test_element_wise_kernels_stay_allowed_below_8(monkeypatch):
    from fastgpt.kernels import cross_entropy, gelu, layer_norm
    x, w = fake_cuda_tensors((4, 768), (768,))
    fake_card(monkeypatch, 64 * KB, (7, 5))
    assert gelu.supports(x) is None
    assert layer_norm.supports(x, w, w) is None
    assert cross_entropy.supports(torch.float16) is None

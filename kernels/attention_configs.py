"""Which tiles the attention kernels (kernels/attention.py) launch: the tuned lists, the pinned test tile.

A config is (BLOCK_M, BLOCK_N, warps, stages). The forward's BLOCK_M query rows
walk BLOCK_N keys at a time; the backward keeps BLOCK_N keys (dK, dV) and then
BLOCK_N queries (dQ) resident and streams BLOCK_M rows past them. The launcher
times its tuned list per shape (kernels/autotune.py) and falls back on the
list's first entry where it cannot time; the tests and the interpreter run the
pinned tile. ``python -m fastgpt.kernels.report`` compiles every entry.
"""

import torch

from .autotune import Config
from .runtime import shared_memory_per_block

HEAD_DIMS = (32, 64, 128)
FP32_HEAD_DIMS = (32, 64)  # float32 at d = 128: every tf32x3 backward tile spills; use half precision
ARCH_FAMILIES = {"sm80": 80, "sm90": 90}
DELTA_BLOCK_M = 32  # rows per program of the backward's Δ = rowsum(dO ∘ O) kernel

# Tile configs, fastest-first by expectation (the first is the default where tuning
# cannot run: CUDA-graph capture), by (arch family, head_dim, float32 operands?,
# dropout?); None matches either. Every entry compiles for its architecture without
# spills, with and without dropout, in Triton 3.6 and the installed one, and on
# sm_90 every bf16/fp16 d = 64 matmul is a wgmma with N >= 64 (python -m
# fastgpt.kernels.report checks all of it). Register pressure decides the lists:
# with dropout's keep-mask live the forward drops the 128-key tile and the backward
# its pipelining (the 128 × 64 tiles sit near the register limit); Ampere, without
# wgmma, streams 32 queries in the backward. float32 operands (tf32x3: three TF32
# products per dot) take small tiles: they are not a speed target.
C = Config
FWD_TABLE = {
    ("sm90", 64, False, False): [C(128, 128, 8, 3), C(128, 64, 8, 3), C(128, 64, 8, 4), C(64, 64, 4, 3)],
    ("sm90", 64, False, True): [C(128, 64, 8, 3), C(128, 64, 8, 4), C(64, 64, 4, 3)],
    ("sm80", 64, False, None): [C(128, 64, 8, 3), C(128, 64, 8, 4), C(64, 64, 4, 3)],
    ("sm90", 32, False, True): [C(64, 32, 4, 3)],
    (None, 32, False, None): [C(128, 64, 8, 3), C(64, 32, 4, 3)],
    (None, 128, False, None): [C(128, 64, 8, 3), C(64, 64, 4, 3)],
    (None, 64, True, None): [C(32, 32, 4, 2)],
    (None, 32, True, None): [C(32, 16, 4, 2)],
}
# Backward: BLOCK_N resident keys (dK/dV) and queries (dQ), BLOCK_M rows streamed; BLOCK_N % BLOCK_M == 0.
BWD_TABLE = {
    ("sm90", 64, False, False): [C(64, 128, 8, 2), C(64, 128, 8, 3), C(64, 128, 8, 1)],
    ("sm90", 64, False, True): [C(64, 128, 8, 1)],
    ("sm80", 64, False, None): [C(32, 128, 8, 2), C(16, 64, 4, 2)],
    ("sm80", 32, False, True): [C(32, 64, 4, 2)],  # 32 x 128 is over the dropout cost limit there
    (None, 32, False, None): [C(32, 128, 8, 2), C(32, 64, 4, 2)],
    (None, 128, False, None): [C(32, 32, 4, 2), C(16, 32, 4, 2)],
    (None, 64, True, None): [C(16, 32, 4, 2)],
    (None, 32, True, None): [C(16, 64, 4, 2)],
}
del C
TABLES = {"fwd": FWD_TABLE, "bwd": BWD_TABLE}


def pinned(kind: str, head_dim: int, fp32: bool, family: str = "sm80") -> Config:
    """The one config the tests and the interpreter run (FASTGPT_ATTENTION_PINNED=1 on a GPU too): small
    tiles, so short sequences cross several tile edges. On sm_90 the half-precision d = 64 tiles are the
    smallest wgmma ones (64 × 64, 4 warps), so the GPU tests run the tuned tiles' instruction shapes."""
    if family == "sm90" and head_dim == 64 and not fp32:
        return Config(64, 64, 4, 2 if kind == "fwd" else 1)  # the 2-stage backward spills with dropout
    if kind == "fwd":
        if fp32:
            return Config(32, 16, 4, 2)
        # d = 128 with dropout spills at 2 stages under Triton 3.9.
        return Config(32, 32, 4, 1) if head_dim == 128 else Config(32, 32, 4, 2)
    if fp32 and head_dim == 32:
        return Config(16, 64, 4, 2)
    # Half-precision d = 64 streams 32 queries: a 16-query dQ tile uses a quarter of each dropout Philox call.
    return Config(32, 32, 4, 2) if head_dim == 64 and not fp32 else Config(16, 32, 4, 2)


def configs(kind: str, family: str, head_dim: int, fp32: bool, dropout: bool) -> list:
    """The tuned list for one case (the most specific table entry)."""
    table = TABLES[kind]
    for key in ((family, head_dim, fp32, dropout), (family, head_dim, fp32, None),
                (None, head_dim, fp32, dropout), (None, head_dim, fp32, None)):
        if key in table:
            return table[key]
    raise KeyError(f"no {kind} configs for {family} head_dim={head_dim} fp32={fp32} dropout={dropout}")


for _table in TABLES.values():
    for _key, _configs in _table.items():
        assert _key[0] in (None, *ARCH_FAMILIES), _key
for _configs in list(BWD_TABLE.values()) + [[pinned("bwd", d, f, a)] for d in (32, 64, 128) for f in (False, True)
                                             for a in ARCH_FAMILIES]:
    assert all(c.block_n % c.block_m == 0 for c in _configs)  # the backward's loops rely on it


def arch_family(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return "sm90"
    return "sm80"


def fits(config: Config, head_dim: int, dtype: torch.dtype, limit: int) -> bool:
    """Whether the pruning estimate (Config.shared_bytes) keeps ``config`` under ``limit`` bytes per block.
    The compile report holds the estimate against each config's compiled shared memory."""
    return config.shared_bytes(head_dim, torch.empty((), dtype=dtype).element_size()) <= limit


def candidates(kind, family, head_dim, dtype, dropout, device):
    """The tuned list for this case, without configs whose shared memory cannot fit the device
    (99 KB per block on sm_86/sm_89: RTX 30 and 40 cards run the sm80 lists' smaller tiles)."""
    listed = configs(kind, family, head_dim, dtype == torch.float32, dropout)
    if device.type != "cuda":
        return listed
    limit = shared_memory_per_block(device)
    return [c for c in listed if fits(c, head_dim, dtype, limit)] or listed[-1:]

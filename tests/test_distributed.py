"""torch.distributed: GPTModel trains under DDP and FSDP2 (fully_shard) with our kernels in it.

Two processes on the gloo backend (CPU) each train on half of a batch; their
losses, gradients and parameters must match one process trained on the whole
batch. The ranks (and the reference) run on CPU tensors under the Triton interpreter, on a GPU machine too.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed_worker import BATCH, STRATEGIES
from helpers import rel_err

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD_SIZE = 2
TIMEOUT_S = 240  # for all ranks together; a rank waiting on a dead peer gives up sooner (120 s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(backend: str, out_dir: Path) -> dict:
    """Start WORLD_SIZE worker processes; their results by strategy."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(WORLD_SIZE), "FASTGPT_BACKEND": "", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    # cwd out_dir keeps the repository root off sys.path; the script's folder (tests/) is on it.
    procs = [subprocess.Popen([sys.executable, str(WORKER), backend, str(out_dir)], cwd=out_dir,
                              env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for rank in range(WORLD_SIZE)]
    outputs, deadline = [], time.monotonic() + TIMEOUT_S
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for proc in procs:  # never leave a rank behind, whatever happened
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{output[-4000:]}"
    return {strategy: torch.load(out_dir / f"{strategy}.pt") for strategy in STRATEGIES}


def _single_process_reference(backend: str, out_dir: Path) -> dict:
    """The same training in one plain process, run as its own process too: the ranks use the
    interpreter on CPU tensors even on a GPU machine, and so must their reference."""
    env = {**os.environ, "FASTGPT_BACKEND": "", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(WORKER), "reference", backend, str(out_dir)], cwd=out_dir, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"reference exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    return torch.load(out_dir / "reference.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _run_ranks("triton", tmp_path_factory.mktemp("ranks"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    # Triton in both runs: the ranks must agree with the same kernels in one process.
    return _single_process_reference("triton", tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_train_like_one_process_on_the_whole_batch(strategy, two_ranks, reference):
    assert BATCH % WORLD_SIZE == 0
    result = two_ranks[strategy]
    # Every forward op took the Triton kernel (rank 0's record).
    ran = result["dispatch_counts"]
    for op in ("layer_norm", "linear_gelu", "dropout_add_layer_norm", "causal_attention"):
        assert ran.get((op, "triton"), 0) > 0 and ran.get((op, "eager"), 0) == 0, (op, ran)
    # Summation order differs (per-rank means, then an all-reduce), so equal within float32 noise.
    for got, want in zip(result["losses"], reference["losses"], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (result["losses"], reference["losses"])
    assert result["losses"][-1] < result["losses"][0], "it trains"
    for name, want in reference["grads"].items():
        assert rel_err(result["grads"][name], want) <= 1e-4, name
    for name, want in reference["params"].items():
        assert rel_err(result["params"][name], want) <= 1e-5, name
    if strategy == "fsdp2":
        # The seed's state-dict keys (att.mask included) survive sharding, gathered back in full.
        state_dict = result["state_dict"]
        assert list(state_dict) == list(reference["state_dict"])
        for name, want in reference["state_dict"].items():
            if name.endswith("att.mask"):
                assert torch.equal(state_dict[name], want), name
            else:
                assert rel_err(state_dict[name], want) <= 1e-5, name

"""Measured auto under torch.distributed: rank 0 decides, every rank takes its verdict (two gloo ranks on CPU)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("trust_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_take_rank_0s_verdicts(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "FASTGPT_BACKEND": "", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path)], cwd=tmp_path,
                              env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in range(2)]
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{out[-3000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["verdicts"] == ranks[1]["verdicts"]
    assert ranks[0]["paths"] == ranks[1]["paths"]
    # Rank 0's clock decided: layer_norm on Triton, gelu on eager (rank 1's clock says the opposite).
    assert ranks[0]["paths"][0] == {"layer_norm": "triton", "gelu": "eager"}
    assert ranks[0]["measured"] == {"layer_norm": 2, "gelu": 2}  # two row buckets each
    assert ranks[1]["measured"] == {}                             # rank 1 measured nothing

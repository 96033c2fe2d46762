"""One rank of test_trust_distributed.py: measured auto under torch.distributed (gloo, CPU tensors).

Run as ``python trust_worker.py OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set, and TRITON_INTERPRET=1. Each rank has its own verdict file and
a fake clock that disagrees with the other rank's (rank 0: Triton faster for
layer_norm, slower for gelu; rank 1 the opposite), so only a broadcast can make
them agree. Writes OUT_DIR/rank<N>.json: the path each call took and the checks it ran.
"""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def main(out_dir: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    os.environ["FASTGPT_VERDICTS"] = str(out_dir / f"verdicts-{rank}.json")
    os.environ["FASTGPT_TRUST"] = "check"
    from fastgpt import ops, trust

    ops._measure_on_cpu = True
    fast_op = "layer_norm" if rank == 0 else "gelu"

    measuring = {}   # the op being measured, for the clock
    real_measure = trust.measure

    def measure(op, *args, **kwargs):
        measuring["op"] = op
        return real_measure(op, *args, **kwargs)

    def clock(which, fn, reps, device):
        fn()
        return [1.0 if (which == "triton") == (measuring["op"] == fast_op) else 2.0] * reps

    trust.clock, trust.measure = clock, measure
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 64, generator=g)
        w, b = torch.ones(64), torch.zeros(64)
        paths = []
        for rows in (8, 8, 32, 8):   # the same call sequence on every rank; repeats need no broadcast
            ops.reset_dispatch_counts()
            ops.layer_norm(torch.randn(rows, 64, generator=g), w, b, 1e-5)
            ops.gelu(torch.randn(rows, 64, generator=g))
            paths.append({op: path for (op, path), n in ops.dispatch_counts.items()})
        dist.barrier()
    finally:
        dist.destroy_process_group()
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "paths": paths, "measured": dict(trust.measured),
        "verdicts": sorted([v.op, v.shape, v.path, v.status] for v in trust._session.values())}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""One rank of test_distributed.py: train GPTModel under DDP, then FSDP2, on its share of a batch.

Run as ``python distributed_worker.py BACKEND OUT_DIR`` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (test_distributed.py starts one process per rank).
For each strategy rank 0 writes what the test compares -- the loss of every step,
the last step's gradients and the final parameters, all gathered in full -- to
OUT_DIR/<strategy>.pt. Both strategies share one launch: starting processes costs
more than training this model. ``python distributed_worker.py reference BACKEND
OUT_DIR`` trains one plain process on the whole batch and writes OUT_DIR/reference.pt.

The ranks train on CPU tensors over gloo, on a GPU machine too, so forced Triton
runs under the interpreter in every process: test_distributed.py sets
TRITON_INTERPRET=1 in their environment (not this module, which the test imports).
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import fastgpt
from fastgpt import GPTModel, ops
from seed_training import make_optimizer, random_batch, train_step

# head_dim 32: a size the attention kernel takes. Small enough for the interpreter.
CFG = {"vocab_size": 97, "context_length": 16, "emb_dim": 64, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": False}
BATCH, SEQ_LEN, STEPS, LR = 2, 9, 2, 1e-3  # BATCH splits evenly across 2 ranks
STRATEGIES = ("ddp", "fsdp2")


def batch():
    """The whole batch, the same on every rank (and in the single-process reference)."""
    return random_batch(BATCH, SEQ_LEN, CFG["vocab_size"], seed=7)


def new_model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(CFG)


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor with every element: gathers an FSDP2 shard (a DTensor)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _wrap(model, strategy):
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    for block in model.trf_blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _check_fsdp2_state_dict(model, expected_keys):
    """The state dict keeps the seed's keys (att.mask included) and loads back, sharded and full."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    sharded = model.state_dict()
    assert list(sharded) == expected_keys, list(sharded)
    model.load_state_dict(sharded)
    full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    assert list(full_sd) == expected_keys, list(full_sd)
    # A copy: DCP may add entries to the dict it loads.
    set_model_state_dict(model, dict(full_sd), options=StateDictOptions(full_state_dict=True))
    return {name: full(t) for name, t in full_sd.items()}


def train(strategy: str, rank: int, world: int) -> dict:
    ops.reset_dispatch_counts()
    model = new_model()
    expected_keys = list(model.state_dict())
    model = _wrap(model, strategy)
    optimizer = make_optimizer(model, lr=LR)
    inputs, targets = batch()
    share = BATCH // world
    inputs, targets = inputs[rank * share:(rank + 1) * share], targets[rank * share:(rank + 1) * share]
    losses = []
    for _ in range(STEPS):
        loss = train_step(model, optimizer, inputs, targets)
        dist.all_reduce(loss)  # summed over ranks (gloo has no AVG on every torch we support) ...
        losses.append(loss.item() / world)  # ... so divided here: the full batch's mean loss
    inner = model.module if strategy == "ddp" else model
    result = {
        "losses": losses,
        "grads": {name: full(p.grad) for name, p in inner.named_parameters()},
        "params": {name: full(p) for name, p in inner.named_parameters()},
        "dispatch_counts": dict(ops.dispatch_counts),
    }
    if strategy == "fsdp2":
        result["state_dict"] = _check_fsdp2_state_dict(model, expected_keys)
    return result


def main(backend: str, out_dir: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # A bounded wait: a rank that dies must fail its peer, not hang it.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        fastgpt.set_backend(backend)
        for strategy in STRATEGIES:
            result = train(strategy, rank, world)
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{strategy}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def reference(backend: str, out_dir: str) -> None:
    """One process, the whole batch, no wrapper: what the ranks together must reproduce."""
    model = new_model()
    optimizer = make_optimizer(model, lr=LR)
    inputs, targets = batch()
    torch.set_num_threads(1)
    with fastgpt.use_backend(backend):
        losses = [train_step(model, optimizer, inputs, targets).item() for _ in range(STEPS)]
    torch.save({"losses": losses,
                "grads": {name: p.grad.detach().clone() for name, p in model.named_parameters()},
                "params": {name: p.detach().clone() for name, p in model.named_parameters()},
                "state_dict": model.state_dict()}, os.path.join(out_dir, "reference.pt"))


if __name__ == "__main__":
    if sys.argv[1] == "reference":
        reference(*sys.argv[2:4])
    else:
        main(*sys.argv[1:3])

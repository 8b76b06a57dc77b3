"""Data parallelism under torchrun without wrapping the model: each rank runs its own micro-batches,
then gradients are averaged across ranks before the optimizer step (what DDP computes, for any
module layout: student, Recalibrator, frozen parts). gloo on CPU, nccl on GPU.

    torchrun --nproc_per_node 8 -m student.cli train --cache cache/ --student ... --stage 2
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def setup() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of every gradient over ranks, in one flattened all-reduce per dtype."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in {g.dtype for g in grads}:
        group = [g for g in grads if g.dtype == dtype]
        flat = _flatten_dense_tensors(group)
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, synced in zip(group, _unflatten_dense_tensors(flat, group)):
            g.copy_(synced)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

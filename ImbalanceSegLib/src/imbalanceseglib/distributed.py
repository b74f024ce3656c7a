"""Data-parallel training with ``torch.distributed`` (launched by ``torchrun``).

Every rank draws the same global batch from the same seeded generator and trains on its own
slice of it; after the backward pass the gradients are averaged over the ranks with one
all-reduce (what DistributedDataParallel does, without overlapping communication with the
backward pass, so steps with several forward passes, such as asymmetric adversarial training,
work unchanged). The dynamic class weights (DisW/DifW/CDifW) are updated from the logits and
labels of the whole global batch, gathered from all ranks, so every rank uses the same weights.
Only rank 0 logs, evaluates, writes checkpoints and the bundle.

The result equals single-process training with the same global batch up to float rounding for
losses that are means over the samples (cross-entropy, Dice with ``dice_reduction: image``);
a Dice computed over the whole batch (``dice_reduction: batch``) is computed over each rank's
slice.

One machine, 2 processes on CPU:  ``torchrun --nproc-per-node 2 -m imbalanceseglib.cli train cfg.json --out run``
Several machines: ``torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:29500 ...``
(the output folder must be shared, since every rank reads the checkpoint when resuming).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(backend: Optional[str] = None) -> DistContext:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), or run alone."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return DistContext(dist.get_rank(), dist.get_world_size())


def local_slice(global_batch: int, ctx: DistContext) -> slice:
    if global_batch % ctx.world:
        raise ValueError(f"batch_size {global_batch} must be divisible by the number of processes ({ctx.world})")
    b = global_batch // ctx.world
    return slice(ctx.rank * b, (ctx.rank + 1) * b)


def broadcast_parameters(module: torch.nn.Module, ctx: DistContext) -> None:
    if ctx.active:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(module: torch.nn.Module, ctx: DistContext) -> None:
    """All-reduce the gradients (one flat buffer) and divide by the number of ranks."""
    if not ctx.active:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def mean_scalar(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of a scalar over the ranks (a NaN on any rank makes it NaN everywhere)."""
    v = value.detach().reshape(1).double().clone()
    if ctx.active:
        dist.all_reduce(v, op=dist.ReduceOp.SUM)
        v /= ctx.world
    return v[0]


def gather_batch(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate every rank's slice along the batch axis, in rank order (the global batch)."""
    if not ctx.active:
        return t
    parts = [torch.empty_like(t) for _ in range(ctx.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()

"""Multi-process training with PyTorch's own engine (torchrun / DDP).

``torchrun --nproc_per_node=G -m fingerprint_training train ...`` (or the console script) sets
RANK/WORLD_SIZE/LOCAL_RANK; :func:`setup` then joins the process group (nccl on CUDA, gloo on
CPU), puts each rank on its own GPU, and the trainer wraps the network in DDP. The subject
sampler gives each rank different subjects of a shared seeded stream
(:class:`fingerprint_training.sampler.SubjectBatchSampler`), DDP averages the gradients, so all
ranks keep identical weights. Rank 0 validates, logs and writes checkpoints.
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
    world_size: int = 1
    local_rank: int = 0
    device: Optional[torch.device] = None
    enabled: bool = False   # True when this process joined a process group we created

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def setup(device: torch.device, backend: Optional[str] = None) -> DistContext:
    """Join the process group described by the torchrun environment, if any.

    ``device`` is the device the user asked for; on CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    world = env_world_size()
    if world <= 1:
        return DistContext(device=device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        created = True
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device,
                       enabled=created or dist.is_initialized())


def wrap(network: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP-wrap ``network`` when running distributed.

    On CUDA, BatchNorm becomes ``SyncBatchNorm`` (in place: ``network`` itself is converted),
    so batch statistics and running statistics come from every rank's batch and stay identical
    on all ranks. SyncBatchNorm does not run on CPU; there (gloo, mainly for tests) each rank
    keeps running statistics of its own batches and rank 0's are the ones validated and saved.
    """
    if ctx.world_size <= 1:
        return network
    from torch.nn.parallel import DistributedDataParallel as DDP
    if ctx.device is not None and ctx.device.type == "cuda":
        network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
        return DDP(network, device_ids=[ctx.device.index], output_device=ctx.device.index)
    return DDP(network)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if hasattr(network, "module") else network


def _exchange_flag(flag: bool, ctx: DistContext, collective) -> bool:
    if ctx.world_size <= 1:
        return bool(flag)
    device = ctx.device if ctx.device is not None and ctx.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], device=device)
    collective(t)
    return bool(t.item())


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's decision (stop early, time up) for every rank."""
    return _exchange_flag(flag, ctx, lambda t: dist.broadcast(t, src=0))


def all_true(flag: bool, ctx: DistContext) -> bool:
    """Whether ``flag`` holds on every rank (a decision all ranks must take alike)."""
    return _exchange_flag(flag, ctx, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MIN))


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()

"""Multi-process training with PyTorch's own engine (torchrun / DDP).

``torchrun --nproc_per_node=G -m subject_fingerprint train ...`` (or the console script) sets
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
    """DDP-wrap ``network`` when running distributed (BatchNorm buffers follow rank 0)."""
    if ctx.world_size <= 1:
        return network
    from torch.nn.parallel import DistributedDataParallel as DDP
    if ctx.device is not None and ctx.device.type == "cuda":
        return DDP(network, device_ids=[ctx.device.index], output_device=ctx.device.index)
    return DDP(network)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if hasattr(network, "module") else network


def average_buffers(network: torch.nn.Module, ctx: DistContext) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the ranks.

    DDP keeps parameters identical but each rank updates its running statistics from its own
    batch; averaging them before validation and saving makes every rank hold the same model,
    with statistics of all ranks' data.
    """
    if ctx.world_size <= 1:
        return
    buffers = [b for b in unwrap(network).buffers() if b.is_floating_point()]
    if not buffers:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    flat = _flatten_dense_tensors([b.data for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    for b, v in zip(buffers, _unflatten_dense_tensors(flat, [b.data for b in buffers])):
        b.data.copy_(v)


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's decision (stop early, time up) for every rank."""
    if ctx.world_size <= 1:
        return bool(flag)
    device = ctx.device if ctx.device is not None and ctx.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


# -- self-test: two CPU processes, gloo, one step ------------------------------------------------

def _selftest_worker(rank: int, world_size: int, port: int, out_dir: str, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from .data import synthetic_dataset
    from .trainer import TrainConfig, Trainer

    ds = synthetic_dataset(n_subjects=8, images_per_subject=3, size=(32, 32), seed=3)
    cfg = TrainConfig(out=os.path.join(out_dir, "run"), dims=2, depth=18, size=(32, 32), steps=steps,
                      batch_subjects=2, images_per_subject=3, margin=1.0, device="cpu",
                      val_every=0, progress=False, seed=11, calibrate=False, write_outputs=False)
    trainer = Trainer(cfg, ds, None)
    first_batch = trainer.sampler.batch(0)
    trainer.run()
    net = unwrap(trainer.network)
    torch.save({"state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "batch": first_batch.tolist()}, os.path.join(out_dir, f"rank{rank}.pt"))


def selftest(out_dir: str, world_size: int = 2, steps: int = 1, port: Optional[int] = None) -> list:
    """Train ``steps`` steps in ``world_size`` CPU processes (gloo); return each rank's saved
    {"state", "batch"} so a caller can check that the weights agree."""
    import socket
    import torch.multiprocessing as mp
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    mp.spawn(_selftest_worker, args=(world_size, port, out_dir, steps), nprocs=world_size, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]

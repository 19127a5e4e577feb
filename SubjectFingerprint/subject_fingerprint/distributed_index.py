"""``torchrun --nproc_per_node=N [--nnodes=M] -m subject_fingerprint index ...``.

PyTorch's own launcher starts the processes and sets RANK / WORLD_SIZE / LOCAL_RANK; each rank
embeds one contiguous slice of the discovered images (on GPU ``LOCAL_RANK`` modulo the GPUs
when CUDA is used: more ranks than GPUs share them) into its own shard library ``<library>.shard-<rank>-of-<world>.h5`` beside the target.
After a barrier, rank 0 merges the shards in rank order into the target in one write session
(copy-on-write: the target is replaced atomically, or left as it was), then deletes them.
Because the slices are contiguous and merged in order, the target holds the same entries in
the same order as a single-process ``index`` of the same files.

The process group uses gloo: only barriers and the small reports travel between ranks.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from .errors import FingerprintError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank_device(device: str, local_rank: int, gpus: int) -> str:
    """The device of the rank ``local_rank`` on a machine with ``gpus`` GPUs: the GPUs dealt
    out in turn, so two ranks on one GPU both use it (each decodes with its own workers), or
    ``device`` as given when CUDA was not asked for or there is none."""
    spec = str(device or "auto").strip().lower()  # as resolve_device reads it
    if gpus > 0 and (spec.startswith("cuda") or spec == "auto"):
        return f"cuda:{local_rank % gpus}"
    return device


def shard_path(library, rank: int, world: int) -> Path:
    library = Path(library)
    return library.with_name(f"{library.name}.shard-{rank}-of-{world}.h5")


def index_distributed(sources, library, device="auto", timeout_minutes: float = 60.0, **kwargs):
    """Run this rank's share of ``lookup.index``; rank 0 merges. Returns ``(report, rank)``
    where rank 0's report sums all ranks."""
    import torch
    import torch.distributed as dist

    from .library import EmbeddingLibrary, merge_libraries
    from .lookup import IndexReport, index

    from .backends import cpu_cores

    world = world_size()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if kwargs.get("num_workers") is None:
        # The ranks on one machine share its cores: size each rank's decoders to its share.
        share = cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", world) or 1)
        kwargs["num_workers"] = share if share > 1 else 0
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(minutes=timeout_minutes))
    try:
        device = rank_device(device, local_rank, torch.cuda.device_count())
        target = Path(library)
        mine = shard_path(target, rank, world)
        for leftover in (mine, Path(str(mine) + ".lock")):
            leftover.unlink(missing_ok=True)  # from an earlier run that died
        known = frozenset()
        if kwargs.get("skip_duplicates", True) and target.exists():
            with EmbeddingLibrary.open(target, "r") as lib:
                known = frozenset(h for h in lib.column("content_hash").tolist() if h)
        error = None
        try:
            report = index(sources, mine, device=device, shard=(rank, world),
                           known_hashes=known, **kwargs)
        except Exception as exc:  # every rank must reach the barrier, or the others hang
            report, error = IndexReport(), f"rank {rank}: {exc}"
        reports = [None] * world
        dist.all_gather_object(reports, (report, error))
        errors = [e for _, e in reports if e]
        if rank == 0 and not errors:
            shards = [shard_path(target, r, world) for r in range(world)]
            try:
                merged = merge_libraries(shards, target,
                                         skip_duplicates=kwargs.get("skip_duplicates", True))
            except Exception as exc:  # reach the barrier first, then fail
                dist.barrier()
                raise FingerprintError(f"merging the shard libraries into {target} failed "
                                       f"({exc}); the shards are kept: {', '.join(map(str, shards))}"
                                       ) from exc
            for shard in shards:
                shard.unlink(missing_ok=True)
                Path(str(shard) + ".lock").unlink(missing_ok=True)
            total = IndexReport(backend=report.backend)
            for r, _ in reports:
                total.discovered += r.discovered
                total.embedded += r.embedded
                total.duplicates += r.duplicates
                total.failures.extend(r.failures)
                total.seconds = max(total.seconds, r.seconds)
                total.cancelled = total.cancelled or r.cancelled
            total.added = merged.added
            total.duplicates += len(merged.duplicates)  # duplicates across shards
            report = total
        dist.barrier()
        if errors:
            raise FingerprintError("; ".join(errors))
        return report, rank
    finally:
        if created:
            dist.destroy_process_group()

"""Two CPU processes (gloo) train one step with DDP: different subjects per rank, identical
weights afterwards. The worker lives here, not in the package, so the package's distributed
module does not import the trainer (no import cycle)."""

import os
import socket

import pytest
import torch

from fingerprint_training.data import synthetic_dataset
from fingerprint_training.distributed import unwrap
from fingerprint_training.trainer import TrainConfig, Trainer

CONFIG = dict(dims=2, depth=18, size=(32, 32), batch_subjects=2, images_per_subject=3, margin=1.0,
              device="cpu", val_every=0, progress=False, seed=11, calibrate=False, write_outputs=False)


def _data():
    return synthetic_dataset(n_subjects=8, images_per_subject=3, size=(32, 32), seed=3)


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(out=os.path.join(out_dir, "run"), steps=1, **CONFIG), _data(), None)
    first_batch = trainer.sampler.batch(0)
    trainer.run()
    params = {k: v.detach().cpu() for k, v in unwrap(trainer.network).named_parameters()}
    torch.save({"params": params, "batch": first_batch.tolist()}, os.path.join(out_dir, f"rank{rank}.pt"))
    from fingerprint_training.distributed import cleanup
    cleanup(trainer.ctx)


@pytest.mark.slow
def test_two_process_ddp_step_keeps_ranks_identical(tmp_path, one_torch_thread):
    import torch.multiprocessing as mp

    init = Trainer(TrainConfig(out="unused", steps=1, **CONFIG), _data(), None)
    before = {k: v.detach().clone() for k, v in init.network.named_parameters()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert set(ranks[0]["batch"]).isdisjoint(ranks[1]["batch"])  # different subjects per rank
    a, b = ranks[0]["params"], ranks[1]["params"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], before[k]) for k in a)  # the step changed the weights


def _worker_one_rank_non_finite(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Rank 1's loss *value* is infinite at step 2 while its gradient is not: every rank must
    still skip that step, or their weights part."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(out=os.path.join(out_dir, "run"), steps=3, **CONFIG), _data(), None)

    class OneRankInfinite(type(trainer.objective)):
        def __call__(self, *a, step=0, **kw):
            loss, stats = super().__call__(*a, step=step, **kw)
            if step == 1 and rank == 1:
                loss = loss + loss.detach() * float("inf")
            return loss, stats
    trainer.objective.__class__ = OneRankInfinite
    skipped, step = [], trainer.train_step

    def recording(s):
        row = step(s)
        skipped.append(row["skipped"])
        return row
    trainer.train_step = recording
    trainer.run()
    state = {k: v.detach().cpu() for k, v in unwrap(trainer.network).named_parameters()}
    torch.save({"state": state, "skipped": skipped}, os.path.join(out_dir, f"rank{rank}.pt"))
    from fingerprint_training.distributed import cleanup
    cleanup(trainer.ctx)


@pytest.mark.slow
def test_a_step_non_finite_on_one_rank_is_skipped_on_every_rank(tmp_path, one_torch_thread):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker_one_rank_non_finite, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == [0, 1, 0]
    a, b = ranks[0]["state"], ranks[1]["state"]
    # (BatchNorm statistics are each rank's own until DDP broadcasts rank 0's at a forward pass.)
    assert all(torch.equal(a[k], b[k]) for k in a)

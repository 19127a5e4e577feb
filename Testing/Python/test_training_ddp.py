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

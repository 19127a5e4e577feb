"""The training loop: P x K subject batches, mining + loss options, AdamW with a warmed-up cosine
schedule, validation with the N-way K-shot protocol, best/last checkpoints, exact resume.

Reproducibility: every random draw of step ``s`` (batch, augmentation, random hard negative)
comes from generators seeded by (seed, s, rank), and the network is initialised from ``seed``;
so on CPU the same seed gives the same weights, and a run resumed from ``last.pt`` continues
exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from monai.optimizers import WarmupCosineSchedule
from subject_fingerprint.backends import _memory_format, cpu_has_bf16
from subject_fingerprint.csvsafe import SafeDictWriter
from subject_fingerprint.device import resolve_device
from subject_fingerprint.model import FingerprintModel

from . import distributed as ddp
from . import metrics
from .augment import AugmentConfig
from .augment_more import augment_batch, preset
from .calibration_fit import calibration_pairs, fit_calibration
from .data import InMemoryDataset
from .losses import MetricObjective
from .sampler import InstanceBatchSampler, SubjectBatchSampler

STATE_FORMAT = "fingerprint-training-state/1"
LOG_COLUMNS = ("step", "phase", "loss", "used_triplets", "active_triplets", "candidates", "memory",
               "lr", "seconds", "val_mean_recall", "val_hit_1", "val_hit_5", "val_n_way",
               "pair_accuracy", "skipped")
MAX_SKIPPED_IN_A_ROW = 20            # non-finite steps in a row before a run is called diverged


@dataclass
class TrainConfig:
    """Every hyperparameter of a run; stored in the checkpoint's metadata["training"]."""

    source: str = ""
    manifest: Optional[str] = None
    split: Optional[str] = None
    out: str = "run"
    dims: int = 2
    depth: int = 50
    embedding_dim: int = 128
    size: Sequence[int] = (64, 64)
    spacing: Optional[Sequence[float]] = None
    steps: int = 2000
    batch_subjects: int = 32
    images_per_subject: int = 4
    loss: str = "triplet"            # triplet | contrastive | multi-similarity (needs normalize)
    miner: str = "algorithm1"        # algorithm1 | batch-hard | all
    margin: Optional[float] = None   # None: 4.0 triplet (paper), 0.2 normalised triplet, 1.0 contrastive,
                                     # 0.5 multi-similarity base
    pos_margin: float = 0.0
    xbm: int = 0                     # cross-batch memory size (0 = off)
    xbm_start: int = 0
    normalize: bool = False
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    min_lr_ratio: float = 0.01
    grad_clip: float = 5.0
    ema: float = 0.0                 # decay of an exponential moving average of the weights, which
                                     # is then what is validated and saved (0 = off)
    augment: bool = True
    augment_preset: str = "paper"    # paper | domain (domain-2d / domain-3d by dims): augment_more.py
    augment_aspect: float = 0.0      # log-range of a lost aspect ratio, added to the preset (0: off)
    augment_scale: float = 0.0       # +- relative zoom in place of the preset's (0: the preset's)
    init_from: Optional[str] = None  # start from this checkpoint's weights (fine-tuning)
    val_moved: bool = False          # 3D: validate on rigidly moved volumes (sources.py, moved.py)
    pretrain_steps: int = 0          # instance-discrimination steps (each image a "subject") first
    verification_head: bool = False  # also train a pair-verification head (BCE, detached embeddings)
    canonical_pose: bool = False     # resample inputs into their moments' frame before the ResNet
    device: str = "auto"
    amp: bool = True                 # float16 mixed precision on CUDA
    cpu_bf16: bool = False           # bfloat16 autocast on a CPU with bf16 units (not bit-exact)
    val_every: int = 100             # 0 = validate only at the end
    val_episodes: int = 100
    val_n_way: int = 20
    val_k_shot: int = 1
    patience: int = 0                # validations without improvement before stopping; 0 = never
    resume: bool = False
    seed: int = 42
    cross_modal: bool = False
    max_minutes: float = 0.0         # stop (saving last.pt) after this wall time; 0 = no limit
    stop_at: Optional[int] = None    # stop after this many steps as if interrupted (tests)
    progress: bool = True
    calibrate: bool = True
    threads: int = 0                 # torch CPU threads (0 = torch default)
    write_outputs: bool = True

    def resolved_margin(self) -> float:
        if self.margin is not None:
            return float(self.margin)
        if self.loss == "contrastive":
            return 1.0
        if self.loss == "multi-similarity":
            return 0.5
        return 0.2 if self.normalize else 4.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["size"] = list(self.size)
        d["spacing"] = list(self.spacing) if self.spacing else None
        d["margin"] = self.resolved_margin()
        return d


@dataclass
class TrainResult:
    out_dir: str
    best_path: Optional[str]
    last_path: Optional[str]
    log_path: Optional[str]
    plot_path: Optional[str]
    steps_done: int
    best_step: int
    best_metric: Optional[float]
    best_validation: dict = field(default_factory=dict)
    stopped_early: bool = False
    interrupted: bool = False
    seconds: float = 0.0
    last_loss: Optional[float] = None


def _amp_for(device, cuda_amp: bool, cpu_bf16: bool):
    """(enabled, dtype) of mixed precision: float16 with loss scaling on CUDA; bfloat16 on a
    CPU with bf16 units when asked (AMX: 2-3x faster steps), decided from the CPU flags at run
    time. CPU bf16 is opt-in because oneDNN's bf16 kernels are not bitwise reproducible: a
    resumed run then matches the uninterrupted one only to bf16 rounding."""
    if cuda_amp and device.type == "cuda":
        return True, torch.float16
    if cpu_bf16 and device.type == "cpu":
        if not cpu_has_bf16():
            print("--bf16: this CPU has no bfloat16 units (amx_bf16/avx512_bf16); training in float32")
            return False, torch.float32
        return True, torch.bfloat16
    return False, torch.float32


def _seed_for(*parts: int) -> int:
    # A stable 63-bit seed from a tuple (hash() of ints is stable, but keep it explicit).
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def load_initial_weights(model, path) -> None:
    """Copy the network weights of checkpoint ``path`` into ``model`` (same architecture; the
    ``normalize`` flag may differ: it adds no weights, so a raw model can be fine-tuned into a
    normalised one and back)."""
    from subject_fingerprint.checkpoint import load_checkpoint
    start = load_checkpoint(path)

    def weights_shape(arch):
        return {k: v for k, v in arch.items() if k != "normalize"}

    if weights_shape(start.architecture) != weights_shape(model.architecture):
        raise ValueError(f"{path}: its architecture {start.architecture} differs from the run's "
                         f"{model.architecture}")
    model.network.load_state_dict(start.network.state_dict())


def _read_state(path) -> dict:
    """``last.pt`` read like ``load_checkpoint`` reads models: weights only, and every problem
    (pickled code, damage, another file) a ``CheckpointError`` that names the file."""
    import pickle
    import warnings

    from subject_fingerprint.errors import CheckpointError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):
            raise CheckpointError(path, "the training state contains objects that would run code "
                                        "when loaded; refusing to resume from it") from None
        raise CheckpointError(path, "not a training state file (unreadable)") from None
    except Exception as exc:  # noqa: BLE001 - zip errors, truncation, random bytes
        raise CheckpointError(path, f"not a training state file (unreadable: "
                                    f"{type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(path, "not a training state file (no format marker)")
    return state


class Trainer:
    """One training run on preloaded datasets (see :func:`run_training` for files/splits)."""

    def __init__(self, config: TrainConfig, train_set: InMemoryDataset,
                 val_set: Optional[InMemoryDataset] = None, preprocessing=None,
                 data_info: Optional[dict] = None, modalities: Sequence[str] = ()):
        self.cfg = config
        if config.threads:
            torch.set_num_threads(int(config.threads))
        device, notice = resolve_device(config.device)
        if notice:
            print(notice)
        self.ctx = ddp.setup(device)
        self.device = self.ctx.device
        self.train_set, self.val_set = train_set, val_set
        self.data_info = dict(data_info or {})
        if preprocessing is None:
            from subject_fingerprint.preprocess import Preprocessing
            preprocessing = Preprocessing(spatial_dims=config.dims, size=tuple(config.size),
                                          spacing=tuple(config.spacing) if config.spacing else None)
        if train_set.spatial_dims != config.dims:
            raise ValueError(f"training images are {train_set.spatial_dims}D but --dims is {config.dims}")
        torch.manual_seed(config.seed)  # identical initial weights on every rank and every run
        self.model = FingerprintModel.create(config.dims, depth=config.depth,
                                             embedding_dim=config.embedding_dim,
                                             preprocessing=preprocessing, modalities=tuple(modalities),
                                             canonical_pose=config.canonical_pose,
                                             normalize=config.normalize)
        if config.init_from:
            load_initial_weights(self.model, config.init_from)
        self.model.network.to(self.device)
        if self.device.type == "cpu":
            # oneDNN's channels-last convolutions are ~1.4x faster than NCHW in training too.
            self.model.network.to(memory_format=_memory_format(config.dims))
        self.network = ddp.wrap(self.model.network, self.ctx)
        self.ema = None
        if config.ema:
            if not 0.0 < config.ema < 1.0:
                raise ValueError(f"--ema is a decay between 0 and 1, not {config.ema}")
            if config.verification_head:
                # The head learns on the trained network's embeddings, not the average's: the
                # saved pair would not belong together.
                raise ValueError("--ema and --verification-head cannot be combined")
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            # The average's BatchNorm statistics are averaged with its weights (use_buffers),
            # so the saved model is one consistent network, not averaged weights on the last
            # step's statistics.
            self.ema = AveragedModel(self.model.network, multi_avg_fn=get_ema_multi_avg_fn(config.ema),
                                     use_buffers=True)
        self.sampler = SubjectBatchSampler(train_set.labels, config.batch_subjects,
                                           config.images_per_subject, seed=config.seed,
                                           rank=self.ctx.rank, world_size=self.ctx.world_size,
                                           groups=train_set.groups, cross_modal=config.cross_modal)
        self.instance_sampler = None
        if config.pretrain_steps > 0:
            self.instance_sampler = InstanceBatchSampler(
                len(train_set), self.sampler.batch_size // 2, copies=2, seed=config.seed,
                rank=self.ctx.rank, world_size=self.ctx.world_size)
        self.objective = MetricObjective(loss=config.loss, miner=config.miner,
                                         margin=config.resolved_margin(), normalize=config.normalize,
                                         xbm_size=config.xbm, embedding_dim=config.embedding_dim,
                                         cross_modal=config.cross_modal, pos_margin=config.pos_margin,
                                         xbm_start=config.xbm_start)
        self.pair_head = None
        if config.verification_head:
            from subject_fingerprint.verification import PairHead

            self.pair_head = PairHead(config.embedding_dim, normalize=config.normalize).to(self.device)
            self.model.pair_head = self.pair_head
            self.pair_head_ddp = ddp.wrap(self.pair_head, self.ctx)  # gradients averaged across ranks
        decay, no_decay = [], []
        named = list(self.network.named_parameters())
        if self.pair_head is not None:
            named += list(self.pair_head.named_parameters(prefix="pair_head"))
        for name, p in named:
            (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on norms/biases
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
        # Warm-up from lr/warmup to lr, then cosine decay floored at min_lr_ratio * lr.
        self.scheduler = WarmupCosineSchedule(
            self.optimizer, warmup_steps=config.warmup, t_total=config.steps,
            end_lr=config.lr * config.min_lr_ratio,
            warmup_multiplier=1.0 / config.warmup if config.warmup > 0 else 0.0)
        self.use_amp, self.amp_dtype = _amp_for(self.device, config.amp, config.cpu_bf16)
        # bfloat16 has float32's range: only float16 needs loss scaling.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.aug_config = (preset(config.augment_preset, config.dims, aspect=config.augment_aspect or None,
                                  scale=config.augment_scale or None)
                           if config.augment else AugmentConfig())
        self.out = Path(config.out)
        self.writes = config.write_outputs and self.ctx.is_main
        self.step = 0
        self.best_metric: Optional[float] = None
        self.best_step = -1
        self.best_validation: dict = {}
        self.bad_validations = 0
        self.skipped_in_a_row = 0
        self.rows: list = []
        self.seconds_before = 0.0

    # -- one step -------------------------------------------------------------------------------
    def _batch(self, step: int):
        ds = self.train_set
        if self.instance_sampler is not None and step < self.cfg.pretrain_steps:
            idx = self.instance_sampler.batch(step)
            n = len(idx)
            labels = torch.from_numpy(idx.astype(np.int64))  # copies of an image are positives
            groups = torch.arange(n, dtype=torch.long)       # so cross-modal masks accept copies
            return "pretrain", idx, labels, groups
        idx = self.sampler.batch(step)
        return "train", idx, torch.from_numpy(ds.labels[idx]), torch.from_numpy(ds.groups[idx])

    def train_step(self, step: int) -> dict:
        phase, idx, labels, groups = self._batch(step)
        if phase == "train" and step == self.cfg.pretrain_steps and self.cfg.pretrain_steps > 0:
            self.objective.reset_memory()
        x = self.train_set.images[torch.from_numpy(idx)].to(self.device, non_blocking=True)
        rank = self.ctx.rank
        if self.cfg.augment:
            gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, step, rank, 1))
            x = augment_batch(x, gen, self.aug_config)
        mine_gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, step, rank, 2))
        self.network.train()
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=_memory_format(self.cfg.dims))
        # What the forward pass changes besides the weights, to undo if the step is skipped.
        before = ([b.detach().clone() for b in ddp.unwrap(self.network).buffers()],
                  self.objective.state_dict())
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            emb = self.network(x)
        loss, stats = self.objective(emb.float(), labels, groups, generator=mine_gen, step=step)
        pair_accuracy = None
        if self.pair_head is not None and phase == "train":
            from subject_fingerprint.verification import batch_pair_loss

            # Detached: the head learns to read the embeddings without changing them.
            e = emb.detach().float()
            self.pair_head.train()
            pair_loss, pair_accuracy = batch_pair_loss(self.pair_head_ddp, e, labels.to(e.device))
            loss = loss + pair_loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip and self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), clip)
        if self.pair_head is not None:
            norm = norm + torch.nn.utils.clip_grad_norm_(self.pair_head.parameters(), clip)
        lr = self.optimizer.param_groups[0]["lr"]
        # A non-finite loss or gradient (float16 overflows; torch 2.13's bf16 weight gradient of
        # a 3x3 stride-2 convolution on a 1x1 input is NaN in a third to a half of the calls,
        # Testing/benchmark_bf16_conv_grad.py) would turn every weight into NaN: such a step is
        # skipped on every rank alike (or their weights would part), the BatchNorm statistics
        # and the cross-batch memory are put back as they were, and the schedule moves on as if
        # it had been taken. The scaler lowers its scale as usual.
        finite = ddp.all_true(bool(torch.isfinite(loss.detach()) and torch.isfinite(norm)), self.ctx)
        if finite:
            self.scaler.step(self.optimizer)
        else:
            for saved, b in zip(before[0], ddp.unwrap(self.network).buffers()):
                b.copy_(saved)
            self.objective.load_state_dict(before[1])
        self.scaler.update()
        if finite and self.ema is not None and phase == "train":
            self.ema.update_parameters(ddp.unwrap(self.network))
        with warnings.catch_warnings():
            # A skipped first step moves the schedule before any optimizer step, on purpose.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return {"step": step, "phase": phase, "loss": float(loss.detach()),
                "used_triplets": stats.used_triplets, "active_triplets": stats.active,
                "candidates": stats.candidates, "memory": stats.memory, "lr": lr,
                "pair_accuracy": pair_accuracy, "skipped": 0 if finite else 1}

    def _diverged(self, row: dict) -> None:
        """Stop a run that gives nothing but non-finite steps, keeping its log."""
        self.rows.append({**row, "step": self.step + 1})
        if self.writes:
            self._write_log()
        last = self.out / "last.pt"
        kept = f"{last} holds the last saved state" if last.is_file() else "no last.pt was written yet"
        precision = (" or train in float32 (without --bf16)" if self.use_amp and self.amp_dtype == torch.bfloat16
                     else " or without float16 (--no-amp)" if self.use_amp else "")
        raise FloatingPointError(
            f"training diverged: {self.skipped_in_a_row} steps in a row up to step {self.step + 1} had "
            f"a non-finite loss or gradient ({kept}; its log is in {self.out / 'log.csv'}); "
            f"try a lower --lr{precision}")

    # -- validation -----------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Float32 embeddings, whatever the training precision: validation and the calibration
        must see the distances of the engine's float32 reference. (A fine-tuned model measured
        different-subject distances of 0.04 at embedding norms of 4; bf16 rounding moved those
        distances by 12 %, and a calibration fitted on them gave 11 % false positives at a 1 %
        target, BENCHMARKS.md.)"""
        net = self.evaluated_network()
        was_training = net.training
        net.eval()
        out = []
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(self.device)
            if self.device.type == "cpu":
                x = x.contiguous(memory_format=_memory_format(self.cfg.dims))
            out.append(net(x).float().cpu())
        net.train(was_training)
        emb = torch.cat(out)
        if self.cfg.normalize:
            emb = torch.nn.functional.normalize(emb, dim=1)
        return emb.numpy()

    def evaluated_network(self) -> torch.nn.Module:
        """The network that is validated, calibrated and saved: the moving average with --ema."""
        if self.ema is not None and int(self.ema.n_averaged) > 0:
            return self.ema.module
        return ddp.unwrap(self.network)

    def val_n_way(self) -> int:
        if self.val_set is None:
            return 0
        # cross-modal episodes need K supports of another modality than the query
        groups = self.val_set.groups if self.cfg.cross_modal else None
        eligible = len(metrics.eligible_subjects(self.val_set.labels, self.cfg.val_k_shot, groups))
        n = min(self.cfg.val_n_way, eligible)
        return n if n >= 2 else 0

    def validate(self) -> Optional[dict]:
        n_way = self.val_n_way()
        if not n_way:
            return None
        groups = self.val_set.groups if self.cfg.cross_modal else None
        emb = self.embed(self.val_set.images)
        return metrics.nway_kshot(emb, self.val_set.labels, n_way=n_way, k_shot=self.cfg.val_k_shot,
                                  episodes=self.cfg.val_episodes, seed=0, groups=groups)

    # -- checkpoints ----------------------------------------------------------------------------
    def _metadata(self, steps_done: int) -> dict:
        training = dict(self.data_info)
        training.update({
            "steps": int(steps_done), "best_step": int(self.best_step),
            "hyperparameters": self.cfg.to_dict(),
            "train_summary": self.train_set.summary(),
            "val_summary": self.val_set.summary() if self.val_set is not None else None,
            "world_size": self.ctx.world_size, "device": str(self.device),
            "mixed_precision": str(self.amp_dtype).replace("torch.", "") if self.use_amp else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "seconds": round(self.seconds_before, 1),
        })
        return training

    def save_best(self, validation: Optional[dict]) -> None:
        from subject_fingerprint.checkpoint import save_checkpoint
        self.model.metadata["training"] = self._metadata(self.step)
        self.model.metadata["metrics"] = {"validation": validation} if validation else {}
        trained, self.model.network = self.model.network, self.evaluated_network()
        try:
            save_checkpoint(self.model, self.out / "best.pt")
        finally:
            self.model.network = trained

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "step": int(self.step),
                "network": {k: v.detach().cpu() for k, v in ddp.unwrap(self.network).state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "xbm": self.objective.state_dict(),
                "pair_head": (None if self.pair_head is None else
                              {k: v.detach().cpu() for k, v in self.pair_head.state_dict().items()}),
                "best_metric": self.best_metric, "best_step": self.best_step,
                "best_validation": json.dumps(self.best_validation),
                "bad_validations": self.bad_validations, "seconds": self.seconds_before,
                "ema": None if self.ema is None else {k: v.detach().cpu() for k, v in self.ema.state_dict().items()},
                "skipped_in_a_row": self.skipped_in_a_row,
                "config": json.dumps(self.cfg.to_dict()),
                "torch_rng": torch.get_rng_state()}

    def save_last(self) -> None:
        path = self.out / "last.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load_last(self, path) -> None:
        state = _read_state(path)
        try:
            saved = json.loads(state["config"])
        except (KeyError, TypeError, ValueError):
            saved = None
        if not isinstance(saved, dict):
            from subject_fingerprint.errors import CheckpointError

            raise CheckpointError(path, "damaged training state (no readable configuration)")
        for key in ("dims", "depth", "embedding_dim", "loss", "miner", "normalize", "xbm", "seed",
                    "batch_subjects", "images_per_subject", "verification_head", "canonical_pose",
                    "ema"):
            was = saved.get(key, getattr(TrainConfig, key, None))  # a key older runs lacked: its default
            if was != self.cfg.to_dict().get(key):
                raise ValueError(f"cannot resume: {key} was {was!r}, now {self.cfg.to_dict().get(key)!r}")
        try:
            self._restore(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            from subject_fingerprint.errors import CheckpointError

            raise CheckpointError(path, f"damaged training state, cannot resume from it "
                                        f"({type(exc).__name__}: {str(exc)[:200]})") from None

    def _restore(self, state) -> None:
        ddp.unwrap(self.network).load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.objective.load_state_dict(state["xbm"])
        if self.pair_head is not None:
            self.pair_head.load_state_dict(state["pair_head"])
        self.step = int(state["step"])
        self.best_metric, self.best_step = state["best_metric"], int(state["best_step"])
        self.best_validation = json.loads(state["best_validation"])
        self.bad_validations = int(state["bad_validations"])
        self.seconds_before = float(state["seconds"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        torch.set_rng_state(state["torch_rng"])

    # -- log and plot ---------------------------------------------------------------------------
    def _write_log(self) -> None:
        path = self.out / "log.csv"
        with open(path, "w", newline="") as fh:
            w = SafeDictWriter(fh, fieldnames=LOG_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for row in self.rows:
                w.writerow(row)

    def _read_log(self) -> None:
        path = self.out / "log.csv"
        if path.is_file():
            with open(path, newline="") as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= self.step]

    def plot(self) -> Optional[Path]:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.rows:
            return None
        steps = np.array([int(r["step"]) for r in self.rows])
        loss = np.array([float(r["loss"]) for r in self.rows])
        used = np.array([float(r["used_triplets"]) for r in self.rows])
        lr = np.array([float(r["lr"]) for r in self.rows])
        val = [(int(r["step"]), float(r["val_mean_recall"])) for r in self.rows if r.get("val_mean_recall") not in (None, "")]
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        axes[0].plot(steps, loss, alpha=0.3, label="loss")
        win = max(1, len(loss) // 50)
        csum = np.cumsum(np.insert(loss, 0, 0.0))  # trailing moving average, no edge artefacts
        axes[0].plot(steps[win - 1:], (csum[win:] - csum[:-win]) / win, label=f"mean of {win}")
        axes[0].set_xlabel("step"); axes[0].set_title("training loss"); axes[0].legend()
        axes[1].plot(steps, used, label="used triplets/pairs")
        ax2 = axes[1].twinx()
        ax2.plot(steps, lr, color="C3", label="learning rate")
        axes[1].set_xlabel("step"); axes[1].set_title("used triplets (blue), lr (red)")
        if val:
            vs, vv = zip(*val)
            axes[2].plot(vs, vv, marker="o")
        axes[2].set_ylim(0, 1); axes[2].set_xlabel("step")
        axes[2].set_title(f"validation {self.val_n_way()}-way {self.cfg.val_k_shot}-shot Mean-Recall@K")
        fig.tight_layout()
        path = self.out / "training.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    # -- calibration ----------------------------------------------------------------------------
    def fit_calibration(self) -> Optional[dict]:
        """Calibration fitted on validation pairs: all same-subject pairs and a seeded sample of
        different-subject pairs (as ``evaluate`` does), never an N x N x D array."""
        if self.val_set is None:
            return None
        emb = self.embed(self.val_set.images)
        pos, neg = calibration_pairs(emb, self.val_set.labels)
        if len(pos) < 2 or len(neg) < 2:
            return None
        return fit_calibration(pos, neg, target_fpr=0.01).to_dict()

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.writes:
            self.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume and (self.out / "last.pt").is_file():
            self.load_last(self.out / "last.pt")
            if self.writes:
                self._read_log()
        elif cfg.resume and self.ctx.is_main:
            print(f"no {self.out / 'last.pt'} to resume from: starting afresh")
        start_step, t0 = self.step, time.time()
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start_step, disable=not (cfg.progress and self.ctx.is_main),
                   desc="training", dynamic_ncols=True)
        stopped_early = interrupted = False
        last_loss = None
        stop_at = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
        while self.step < stop_at:
            row = self.train_step(self.step)
            if row["skipped"]:
                self.skipped_in_a_row += 1
                if self.ctx.is_main:
                    bar.write(f"step {self.step + 1}: non-finite loss or gradient (loss {row['loss']}), "
                              f"update skipped")
                if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    self._diverged(row)
            else:
                self.skipped_in_a_row = 0
                last_loss = row["loss"]
            self.step += 1
            row["step"] = self.step  # the log counts steps done
            row["seconds"] = round(self.seconds_before + time.time() - t0, 2)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", used=row["used_triplets"])
            is_last = self.step == cfg.steps
            if (cfg.val_every and self.step % cfg.val_every == 0) or is_last:
                stop = False
                if self.ctx.is_main:
                    v = self.validate()
                    if v is not None:
                        metric = float(v["mean_recall_at_k"])
                        row.update(val_mean_recall=metric, val_hit_1=v["mean_hit_at_r"].get("1"),
                                   val_hit_5=v["mean_hit_at_r"].get("5"), val_n_way=v["n_way"])
                        bar.write(f"step {self.step}: val {v['n_way']}-way {v['k_shot']}-shot "
                                  f"Mean-Recall@K {metric:.4f}  Hit@1 {v['mean_hit_at_r'].get('1', float('nan')):.4f}")
                        improved = self.best_metric is None or metric > self.best_metric
                        # A tie keeps the later (longer-trained) weights, but only a strict
                        # improvement resets the patience counter.
                        if improved or metric == self.best_metric:
                            self.best_metric, self.best_step, self.best_validation = metric, self.step, v
                            if self.writes:
                                self.seconds_before += time.time() - t0; t0 = time.time()
                                self.save_best(v)
                        if improved:
                            self.bad_validations = 0
                        else:
                            self.bad_validations += 1
                            stop = bool(cfg.patience) and self.bad_validations >= cfg.patience
                    elif is_last and self.writes:  # nothing to validate on: keep the final weights
                        self.best_step = self.step
                        self.save_best(None)
                self.rows.append(row)
                stopped_early = ddp.broadcast_flag(stop, self.ctx)
                if self.writes:
                    self.seconds_before += time.time() - t0; t0 = time.time()
                    self.save_last(); self._write_log()
                if stopped_early:
                    bar.write(f"early stop at step {self.step}: no improvement in {cfg.patience} validations")
                    break
            else:
                self.rows.append(row)
            if cfg.max_minutes:  # every rank asks, rank 0's clock decides
                over = (self.seconds_before + time.time() - t0) / 60 > cfg.max_minutes
                if ddp.broadcast_flag(over, self.ctx):
                    interrupted = True
                    break
        bar.close()
        if self.step < cfg.steps and not stopped_early:
            interrupted = True
        self.seconds_before += time.time() - t0
        if interrupted and self.ctx.is_main:
            # time limit or --stop-at: validate what we have so best.pt reflects it, then save state
            if self.writes and self.rows and self.rows[-1].get("val_mean_recall") in (None, ""):
                v = self.validate()
                if v is not None and (self.best_metric is None or v["mean_recall_at_k"] > self.best_metric):
                    self.best_metric, self.best_step, self.best_validation = float(v["mean_recall_at_k"]), self.step, v
                    self.save_best(v)
                if v is not None:
                    self.rows[-1].update(val_mean_recall=v["mean_recall_at_k"], val_n_way=v["n_way"],
                                         val_hit_1=v["mean_hit_at_r"].get("1"), val_hit_5=v["mean_hit_at_r"].get("5"))
            if self.writes:
                self.save_last(); self._write_log()
        plot_path = None
        if self.writes:
            if self.best_step < 0:
                self.best_step = self.step
                self.save_best(None)
            if cfg.calibrate and (self.out / "best.pt").is_file() and not interrupted:
                self._calibrate_best()
            plot_path = self.plot()
        ddp.barrier(self.ctx)
        return TrainResult(out_dir=str(self.out), best_path=str(self.out / "best.pt") if self.writes else None,
                           last_path=str(self.out / "last.pt") if self.writes else None,
                           log_path=str(self.out / "log.csv") if self.writes else None,
                           plot_path=str(plot_path) if plot_path else None, steps_done=self.step,
                           best_step=self.best_step, best_metric=self.best_metric,
                           best_validation=self.best_validation, stopped_early=stopped_early,
                           interrupted=interrupted, seconds=self.seconds_before, last_loss=last_loss)

    def _calibrate_best(self) -> None:
        from subject_fingerprint.checkpoint import load_checkpoint, save_checkpoint
        best = load_checkpoint(self.out / "best.pt")
        net = self.evaluated_network()
        current = {k: v.detach().clone() for k, v in net.state_dict().items()}
        net.load_state_dict(best.network.state_dict())
        try:
            cal = self.fit_calibration()
        finally:
            net.load_state_dict(current)
        if cal is not None:
            best.metadata["calibration"] = cal
            save_checkpoint(best, self.out / "best.pt")


# -- from files -------------------------------------------------------------------------------------

def run_training(cfg: TrainConfig) -> TrainResult:
    """Discover the images of ``cfg.source``, keep the split's train/val subjects, preload them
    and train. The checkpoint records source, manifest, split file and its sha256."""
    from subject_fingerprint.io import discover
    from subject_fingerprint.records import modality_family

    from .data import preload
    from .splits import file_sha256, load_split, records_in

    found = discover([cfg.source], manifest=cfg.manifest)
    records = found.records
    if not records:
        raise ValueError(f"no images found in {cfg.source}")
    if cfg.split:
        split = load_split(cfg.split)
        train_recs, val_recs = records_in(records, split, "train"), records_in(records, split, "val")
        split_info = {"split": str(cfg.split), "split_sha256": file_sha256(cfg.split)}
    else:
        train_recs, val_recs, split_info = records, [], {"split": None}
    from subject_fingerprint.preprocess import Preprocessing
    pre = Preprocessing(spatial_dims=cfg.dims, size=tuple(cfg.size),
                        spacing=tuple(cfg.spacing) if cfg.spacing else None)
    show = cfg.progress and int(os.environ.get("RANK", "0")) == 0
    train_set = preload(train_recs, pre, progress=show, description="loading train")
    val_set = preload(val_recs, pre, progress=show, description="loading val") if val_recs else None
    for ds in (train_set, val_set):
        for f in (ds.failures if ds is not None else []):
            print(f"warning: skipped {f.path}: {f.reason}")
    families = sorted({modality_family(r.modality) for r in train_set.records} - {"other"})
    info = {"source": str(cfg.source), "manifest": str(cfg.manifest) if cfg.manifest else None,
            "discovered_images": len(records), "discovery_failures": len(found.failures), **split_info}
    trainer = Trainer(cfg, train_set, val_set, preprocessing=pre, data_info=info, modalities=families)
    try:
        return trainer.run()
    finally:
        ddp.cleanup(trainer.ctx)

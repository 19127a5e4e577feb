"""Batched embedding of images with a ``FingerprintModel``.

Decoding and preprocessing run in a ``torch.utils.data.DataLoader`` (optionally with worker
processes) so the network never waits on disk; an image that cannot be read or does not fit
the model becomes a ``Failure`` and the run goes on. An image whose content hash is in
``skip_hashes`` (already in the library) is reported as skipped right after decoding, before
preprocessing and the network. The network runs through a backend from :mod:`.backends`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .model import check_image_fits
from .errors import Failure, FingerprintError
from .records import LoadedImage


_CPU_VOXELS_PER_PASS = 1 << 18
_MIN_BATCH, _MAX_BATCH = 16, 256


def _cpu_pass_images(size) -> int:
    """Images of ``size`` in one CPU pass of 2^18 input voxels."""
    return max(1, _CPU_VOXELS_PER_PASS // max(1, int(np.prod(tuple(size)))))


def _pass_images(device, size) -> int:
    """Images per forward pass on ``device`` for inputs of ``size`` (see Embedder.pass_size)."""
    return _cpu_pass_images(size) if device.type == "cpu" else _MAX_BATCH


def shifted(x, offsets):
    """``x`` (B, C, *spatial) moved by whole pixels ``offsets`` per spatial axis, the edge
    pixels replicated into what comes in (Preprocessing.test_shift)."""
    import torch.nn.functional as F

    pad, crop = [], []
    for axis, k in enumerate(offsets):
        n = x.shape[2 + axis]
        crop.append(slice(0, n) if k >= 0 else slice(-k, n - k))
        pad.append((k, 0) if k >= 0 else (0, -k))
    # F.pad lists the last axis first.
    padded = F.pad(x, [p for pair in reversed(pad) for p in pair], mode="replicate")
    return padded[(slice(None), slice(None), *crop)].contiguous()


def mean_over_views(run, x, views):
    """``run(x)`` averaged over the views ``x`` shifted by each of ``views`` (pixel offsets,
    ``Preprocessing.view_shifts``); just ``run(x)`` for the unshifted view alone."""
    import torch

    if len(views) == 1 and not any(views[0]):
        return run(x)
    return torch.stack([run(shifted(x, v)) for v in views]).mean(0)


def default_batch_size(model) -> int:
    """Images decoded and stored together: one CPU pass of 2^18 voxels (64 images of 64 x 64
    px, where the bf16 and ONNX kernels need a batch that size to run at speed), at least 16
    and at most 256."""
    return max(_MIN_BATCH, min(_MAX_BATCH, _cpu_pass_images(model.preprocessing.size)))


@dataclass
class EmbeddedBatch:
    """Embeddings of the records that worked, in order, and the failures of the rest."""

    records: list = field(default_factory=list)
    content_hashes: list = field(default_factory=list)
    embeddings: np.ndarray = None
    failures: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (record, content hash) already stored
    decode_seconds: float = 0.0  # decode + preprocess time summed over the items
    model_seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.records)


def _default_loader(record):
    # Imported lazily: io pulls in pydicom/SimpleITK, not needed to build an Embedder.
    from .io import load_image

    return load_image(record)


class _RecordDataset:
    """Map-style dataset: record -> (input array, record, content hash) or ``Failure``.

    Holds only plain values (preprocessing, dims, modalities, loader) so it pickles cheaply
    into worker processes; the network stays in the main process.
    """

    def __init__(self, records, preprocessing, spatial_dims, modalities, loader,
                 skip_hashes=None):
        self.records = list(records)
        self.preprocessing = preprocessing
        self.spatial_dims = spatial_dims
        self.modalities = list(modalities)
        self.loader = loader
        self.skip_hashes = skip_hashes or frozenset()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        started = time.perf_counter()
        try:
            loader = self.loader or _default_loader
            loaded = loader(record)
            if loaded.content_hash and loaded.content_hash in self.skip_hashes:
                return _Skipped(record, loaded.content_hash, time.perf_counter() - started)
            check_image_fits(loaded, self.spatial_dims, self.modalities)
            array = self.preprocessing.apply(loaded)
            return array, record, loaded.content_hash, time.perf_counter() - started
        except Exception as exc:  # one bad image must not stop the run
            source = getattr(record, "source", record)
            if isinstance(exc, FingerprintError) and not getattr(exc, "reason", None):
                # Our own errors are written for users; no exception class name needed.
                return Failure(str(source), str(exc))
            return Failure.from_exception(source, exc)


@dataclass
class _Skipped:
    record: object
    content_hash: str
    seconds: float


def _collate(items):
    """Stack the good items, keep the failures and skipped ones aside (the default collate
    cannot)."""
    import torch

    good = [item for item in items if isinstance(item, tuple)]
    failures = [item for item in items if isinstance(item, Failure)]
    skipped = [item for item in items if isinstance(item, _Skipped)]
    inputs = torch.from_numpy(np.stack([g[0] for g in good])) if good else None
    return {
        "inputs": inputs,
        "records": [g[1] for g in good],
        "hashes": [g[2] for g in good],
        "failures": failures,
        "skipped": [(s.record, s.content_hash) for s in skipped],
        "decode_seconds": sum(g[3] for g in good) + sum(s.seconds for s in skipped),
    }


class Embedder:
    """Runs a ``FingerprintModel`` over records, loaded images or tensors.

    The network runs through one of :data:`~subject_fingerprint.backends.BACKENDS`
    (``backend``; ``"auto"`` measures the candidates on a check batch when the Embedder is made
    and keeps the fastest that matches float32). ``device_notice`` holds the message from
    ``resolve_device`` (e.g. "CUDA is not available; using the CPU") or None;
    ``backend_choice`` what the check measured.
    """

    def __init__(self, model, device="auto", batch_size: Optional[int] = None, num_workers: int = 0,
                 loader=None, progress: bool = True, amp: bool = True,
                 channels_last: bool = True, backend: str = "torch"):
        """``loader(record) -> LoadedImage`` defaults to ``subject_fingerprint.io.load_image``
        (tests inject their own). ``amp`` allows float16 autocast on CUDA with the torch
        backend; ``channels_last`` stores activations NHWC/NDHWC for the torch backends (on
        the CPU the NCHW path is 1.1-1.7x slower and slower per image at batch 8 than at 1).
        ``num_workers=None`` sizes the decoding workers to the cores; ``batch_size=None`` takes
        :func:`default_batch_size`."""
        from .backends import cpu_cores
        from .device import resolve_device

        self.model = model
        self.device, self.device_notice = resolve_device(device)
        self.batch_size = max(1, int(batch_size or default_batch_size(model)))
        if num_workers is None:
            num_workers = cpu_cores() if cpu_cores() > 1 else 0
        self.num_workers = max(0, int(num_workers))
        self.loader = loader
        self.progress = progress
        self.amp = bool(amp)
        self.embedded_count = 0  # images that went through the network
        self._backend_request = backend or "torch"
        self._channels_last = channels_last
        self._choice = None
        # The Embedder owns the network from here on: on its device, in eval mode.
        self.network = model.network
        if self._backend_request != "auto":
            self.backend_choice  # an impossible explicit backend fails here, not mid-run

    @property
    def backend_choice(self):
        """The backend in use; ``auto`` is decided on first use, so a run that finds every
        image already stored never pays for the check."""
        return self._decide()

    def _decide(self, first=None):
        """Decide the backend (once); ``auto`` measures on ``first``, the first real batch to
        embed, when there is one: distances between real images are what must survive a
        lower precision (noise inputs of an untrained network sit closer together). The
        candidates are timed on one pass and checked on at least ``CHECK_BATCH`` images (a
        pass of one large image has no distance to check)."""
        from .backends import CHECK_BATCH, Choice, TorchRunner, check_batch, choose

        if self._choice is None:
            request = self._backend_request
            if request == "torch" and not (self.amp and self.device.type == "cuda"):
                runner = TorchRunner(self.model.network, self.device, self.model.spatial_dims,
                                     channels_last=self._channels_last,
                                     input_size=tuple(self.model.preprocessing.size))
                self._choice = Choice(runner, "torch")
            else:
                # Measured on a batch shaped like the real passes: at 64 px ONNX wins at 2
                # images and bf16 at 64, by 2x either way.
                batch = min(self.batch_size, _pass_images(self.device, self.model.preprocessing.size))
                checked = max(batch, CHECK_BATCH)
                real = first is not None and len(first) >= CHECK_BATCH
                check = first[:checked].float() if real else check_batch(self.model, checked)
                self._choice = choose(self.model, request, self.device, check=check,
                                      timing=check[:batch])
        return self._choice

    @property
    def runner(self):
        return self.backend_choice.runner

    @property
    def backend(self) -> str:
        """Name of the backend in use ("auto" until it is decided)."""
        return self._choice.name if self._choice is not None else self._backend_request

    @property
    def embedding_dim(self) -> int:
        return self.model.embedding_dim

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.embedding_dim), dtype=np.float32)

    def embed_tensor(self, x):
        """Embed a ready batch ``(B, 1, *size)``; returns a float32 CPU tensor ``(B, D)``."""
        self.embedded_count += int(x.shape[0])
        self._decide(first=x)
        return mean_over_views(self._embed_view, x, self.model.preprocessing.view_shifts())

    def _embed_view(self, x):
        """One view of a batch, in passes of :meth:`pass_size` images."""
        import torch

        step = self.pass_size(x)
        if step >= x.shape[0]:
            return self.runner(x)
        return torch.cat([self.runner(x[i:i + step]) for i in range(0, x.shape[0], step)])

    def pass_size(self, x) -> int:
        """Images per forward pass. On the CPU a pass is capped at 2^18 input voxels (one
        512x512 image): above that the activations leave the cache and batch 8 measured
        slower per image than batch 1 with every backend (BENCHMARKS.md)."""
        if self.device.type != "cpu":
            return int(x.shape[0])
        return _pass_images(self.device, x.shape[2:])

    def iter_batches(self, records, skip_hashes=None):
        """Yield one ``EmbeddedBatch`` per ``batch_size`` records, in record order.

        Images whose content hash is in ``skip_hashes`` (a set of str) are not embedded;
        they come back in ``EmbeddedBatch.skipped``."""
        from torch.utils.data import DataLoader

        dataset = _RecordDataset(records, self.model.preprocessing, self.model.spatial_dims,
                                 self.model.modalities, self.loader, skip_hashes)
        if len(dataset) == 0:
            return
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if self.num_workers else None,
        )
        for batch in loader:
            started = time.perf_counter()
            if batch["inputs"] is not None:
                embeddings = self.embed_tensor(batch["inputs"]).numpy().astype(np.float32, copy=False)
            else:
                embeddings = self._empty()
            yield EmbeddedBatch(batch["records"], batch["hashes"], embeddings, batch["failures"],
                                batch["skipped"], batch["decode_seconds"],
                                time.perf_counter() - started)

    def embed_records(self, records, progress=None) -> EmbeddedBatch:
        """Embed every record; one ``EmbeddedBatch`` with everything that worked.

        ``progress`` (default: the constructor's, True) shows a tqdm bar in images/s.
        """
        records = list(records)
        show = self.progress if progress is None else progress
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(records), unit="img", desc="embedding")
        out_records, hashes, parts, failures = [], [], [], []
        try:
            for batch in self.iter_batches(records):
                out_records.extend(batch.records)
                hashes.extend(batch.content_hashes)
                parts.append(batch.embeddings)
                failures.extend(batch.failures)
                if bar is not None:
                    bar.update(len(batch.records) + len(batch.failures))
        finally:
            if bar is not None:
                bar.close()
        embeddings = np.concatenate(parts, axis=0) if parts else self._empty()
        return EmbeddedBatch(out_records, hashes, embeddings, failures)

    def embed_loaded(self, images) -> np.ndarray:
        """Embed already loaded images; raises ``ModelMismatchError`` for one that does not fit."""
        import torch

        images = list(images)
        if isinstance(images and images[0], np.ndarray):
            raise TypeError("embed_loaded takes LoadedImage objects")
        parts = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            arrays = []
            for loaded in chunk:
                self.model.check_image(loaded)
                arrays.append(self.model.preprocessing.apply(loaded))
            parts.append(self.embed_tensor(torch.from_numpy(np.stack(arrays))).numpy())
        return np.concatenate(parts, axis=0).astype(np.float32, copy=False) if parts else self._empty()


__all__ = ["Embedder", "EmbeddedBatch", "LoadedImage"]

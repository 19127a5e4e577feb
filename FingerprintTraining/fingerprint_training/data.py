"""Training data held in memory: every image decoded and preprocessed once into a tensor.

The datasets this project trains on are small (a thousand 64 px X-rays, a few dozen volumes),
so preloading makes each step cost only the network, and makes augmentation the only
randomness in the input pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch


@dataclass
class InMemoryDataset:
    """Preprocessed images (N, 1, *size) with integer subject labels and modality groups."""

    images: torch.Tensor
    labels: np.ndarray            # subject index per image (into ``subjects``)
    groups: np.ndarray            # modality index per image (into ``modalities``)
    subjects: List[str]
    modalities: List[str]
    records: list = field(default_factory=list)
    failures: list = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def spatial_dims(self) -> int:
        return self.images.dim() - 2

    def subject_ids(self) -> List[str]:
        return [self.subjects[i] for i in self.labels.tolist()]

    def images_per_subject(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.subjects))

    def summary(self) -> dict:
        counts = self.images_per_subject()
        return {"images": len(self), "subjects": len(self.subjects),
                "subjects_with_2plus_images": int((counts >= 2).sum()),
                "modalities": list(self.modalities), "failures": len(self.failures)}


def from_arrays(images, subject_ids: Sequence[str], modalities: Optional[Sequence[str]] = None,
                records: Optional[list] = None) -> InMemoryDataset:
    """Build a dataset from arrays already preprocessed to (1, *size) each (or a stacked tensor)."""
    if isinstance(images, torch.Tensor):
        tensor = images.float()
    else:
        tensor = torch.from_numpy(np.stack([np.asarray(a, dtype=np.float32) for a in images]))
    modalities = list(modalities) if modalities is not None else [""] * len(subject_ids)
    subjects = sorted(set(subject_ids))
    mods = sorted(set(modalities))
    s_index = {s: i for i, s in enumerate(subjects)}
    m_index = {m: i for i, m in enumerate(mods)}
    return InMemoryDataset(
        images=tensor.contiguous(),
        labels=np.array([s_index[s] for s in subject_ids], dtype=np.int64),
        groups=np.array([m_index[m] for m in modalities], dtype=np.int64),
        subjects=subjects, modalities=mods, records=list(records or []))


def preload(records: Sequence, preprocessing, progress: bool = True,
            description: str = "loading") -> InMemoryDataset:
    """Decode (``subject_fingerprint.io.load_image``) and preprocess every record once.

    Images that fail to read become ``Failure`` entries in ``.failures`` and are left out.
    """
    from subject_fingerprint.errors import Failure
    from subject_fingerprint.io import load_image
    from tqdm import tqdm

    arrays, subject_ids, modalities, kept, failures = [], [], [], [], []
    for rec in tqdm(records, desc=description, disable=not progress, leave=False):
        try:
            arrays.append(preprocessing.apply(load_image(rec)))
        except Exception as exc:  # one bad file must not stop training; it is reported
            failures.append(Failure.from_exception(rec.source, exc))
            continue
        subject_ids.append(rec.subject_id)
        modalities.append(rec.modality or "")
        kept.append(rec)
    if not arrays:
        raise ValueError("no image could be loaded"
                         + (f" (first failure: {failures[0].reason})" if failures else ""))
    ds = from_arrays(arrays, subject_ids, modalities, kept)
    ds.failures = failures
    return ds


def synthetic_dataset(n_subjects: int = 8, images_per_subject: int = 4, size=(32, 32),
                      seed: int = 0, noise: float = 0.15, singletons: int = 0,
                      nuisance: float = 0.0) -> InMemoryDataset:
    """Subjects = distinct random textures; images = a shifted, noisy, contrast-varied copy of
    the subject's texture, plus (``nuisance`` > 0) a per-image very smooth intensity field that
    an untrained network confuses with identity and a trained one learns to ignore.
    For tests and smoke runs (2D or 3D by ``len(size)``)."""
    rng = np.random.default_rng(seed)
    dims = len(size)
    images, subjects = [], []

    def texture(div=4):
        coarse = rng.standard_normal([max(2, s // div) for s in size]).astype(np.float32)
        t = torch.from_numpy(coarse)[None, None]
        mode = "bilinear" if dims == 2 else "trilinear"
        return torch.nn.functional.interpolate(t, size=tuple(size), mode=mode, align_corners=False)[0, 0].numpy()

    def variant(base):
        shift = rng.integers(-2, 3, size=dims)
        img = np.roll(base, tuple(int(s) for s in shift), axis=tuple(range(dims)))
        img = img * rng.uniform(0.8, 1.2) + rng.uniform(-0.2, 0.2)
        if nuisance:
            img = img + nuisance * texture(div=max(size))
        return (img + noise * rng.standard_normal(img.shape)).astype(np.float32)[None]

    for s in range(n_subjects):
        base = texture()
        for _ in range(images_per_subject):
            images.append(variant(base))
            subjects.append(f"subject{s:03d}")
    for u in range(singletons):
        images.append(variant(texture()))
        subjects.append(f"single{u:03d}")
    return from_arrays(images, subjects)

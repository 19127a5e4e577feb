"""Training on several sources at once (``train NIH=path/a KERMANY=path/b``).

Each source is ``NAME=PATH`` (PATH: a folder, its ``manifest.csv`` read when present, or a
manifest CSV) with its own split file (``--split NAME=FILE``). Subject IDs are prefixed with
the source name, so patient "12" of one hospital is never patient "12" of another. Batches are
balanced across sources (each gets an equal share of the P subjects of a step), and
validation is the mean over sources of each source's own N-way K-shot figure, so a large
source cannot hide a small one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .data import InMemoryDataset
from .sampler import SubjectBatchSampler
from .trainer import Trainer, TrainConfig, TrainResult

SEPARATOR = "/"   # between source name and subject ID


@dataclass(frozen=True)
class SourceSpec:
    name: str
    path: str
    manifest: Optional[str] = None
    split: Optional[str] = None


def _name_and_value(text: str):
    name, sep, value = text.partition("=")
    if sep and name and SEPARATOR not in name and not os.path.sep in name:
        return name, value
    return None, text


def parse_sources(texts: Sequence[str], splits: Sequence[str] = (),
                  manifests: Sequence[str] = ()) -> List[SourceSpec]:
    """``NAME=PATH`` (or a bare PATH, named after its folder) plus ``NAME=FILE`` splits and
    manifests; a bare split / manifest is accepted when there is one source only."""
    specs = []
    for text in texts:
        name, path = _name_and_value(text)
        p = Path(path)
        name = name or (p.parent.name if p.suffix.lower() == ".csv" else p.name) or "source"
        manifest = str(p) if p.suffix.lower() == ".csv" else None
        specs.append(SourceSpec(name, str(p), manifest))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must differ: {', '.join(names)}")

    def assign(values, what):
        out = {}
        for text in values or ():
            name, value = _name_and_value(text)
            if name is None:
                if len(specs) != 1:
                    raise ValueError(f"with several sources, give each --{what} as NAME=FILE ({text!r})")
                name = specs[0].name
            if name not in names:
                raise ValueError(f"--{what} {text!r}: no source named {name!r} (sources: {', '.join(names)})")
            out[name] = value
        return out

    split_of, manifest_of = assign(splits, "split"), assign(manifests, "manifest")
    return [SourceSpec(s.name, s.path, manifest_of.get(s.name, s.manifest), split_of.get(s.name))
            for s in specs]


def concat(parts: Sequence, names: Sequence[str]) -> InMemoryDataset:
    """One dataset from per-source datasets; subject IDs become ``NAME/ID``; the source of every
    image is kept in ``.source_index`` (into ``.source_names``)."""
    from .data import from_arrays
    images, ids, mods, recs, src, failures = [], [], [], [], [], []
    for i, (ds, name) in enumerate(zip(parts, names)):
        if ds is None:
            continue
        images.append(ds.images)
        ids += [f"{name}{SEPARATOR}{s}" for s in ds.subject_ids()]
        mods += [ds.modalities[g] for g in ds.groups.tolist()]
        recs += list(ds.records)
        src += [i] * len(ds)
        failures += list(ds.failures)
    if not images:
        raise ValueError("no source has images for this part of the split")
    out = from_arrays(torch.cat(images), ids, mods, recs)
    out.failures = failures
    out.source_index = np.asarray(src, dtype=np.int64)
    out.source_names = list(names)
    return out


class BalancedSourceSampler(SubjectBatchSampler):
    """P x K batches whose P subjects are shared equally among the sources (the remainder
    rotating with the step); still a pure function of (seed, step), so resume is exact."""

    def __init__(self, labels, source_of_image, subjects_per_batch, images_per_subject, **kw):
        super().__init__(labels, subjects_per_batch, images_per_subject, **kw)
        source_of_image = np.asarray(source_of_image)
        member_source = np.array([source_of_image[m[0]] for m in self.members])
        self.sources = sorted(set(member_source.tolist()))
        self.by_source = [np.flatnonzero(member_source == s) for s in self.sources]

    def batch(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(step), 7])
        n_src = len(self.sources)
        shares = [self.P // n_src + (1 if (j - step) % n_src < self.P % n_src else 0) for j in range(n_src)]
        mine = []
        for members, share in zip(self.by_source, shares):
            share = min(share, len(members) // self.world_size)
            if share < 1:
                continue
            picked = rng.choice(members, share * self.world_size, replace=False)
            images = [self._images(rng, self.members[s]) for s in picked]  # same draws on every rank
            mine += images[self.rank * share:(self.rank + 1) * share]
        return np.concatenate(mine)


class MultiSourceTrainer(Trainer):
    """A :class:`Trainer` whose batches are balanced across sources and whose validation
    figure is the mean of the per-source figures."""

    def __init__(self, config: TrainConfig, train_set: InMemoryDataset,
                 val_sets: Dict[str, InMemoryDataset], **kw):
        if config.val_moved and config.dims == 3:
            # Every validation volume moved (seeded): co-registration no longer gives identity away.
            from .moved import move, rigid_transforms
            for i, ds in enumerate(val_sets.values()):
                ds.images = move(ds.images, rigid_transforms(len(ds), seed=config.seed + 1 + i))
        val_all = concat([val_sets[n] for n in val_sets], list(val_sets)) if val_sets else None
        super().__init__(config, train_set, val_all, **kw)
        self.val_sets = dict(val_sets)
        self.sampler = BalancedSourceSampler(
            train_set.labels, train_set.source_index, config.batch_subjects, config.images_per_subject,
            seed=config.seed, rank=self.ctx.rank, world_size=self.ctx.world_size,
            groups=train_set.groups, cross_modal=config.cross_modal)

    def validate(self) -> Optional[dict]:
        per, everything = {}, self.val_set
        try:
            for name, ds in self.val_sets.items():
                self.val_set = ds
                v = super().validate()
                if v is not None:
                    per[name] = v
        finally:
            self.val_set = everything
        if not per:
            return None
        keys = sorted({k for v in per.values() for k in v["mean_hit_at_r"]})
        return {"n_way": min(v["n_way"] for v in per.values()), "k_shot": self.cfg.val_k_shot,
                "episodes": self.cfg.val_episodes,
                "mean_recall_at_k": float(np.mean([v["mean_recall_at_k"] for v in per.values()])),
                "mean_hit_at_r": {k: float(np.mean([v["mean_hit_at_r"][k] for v in per.values()
                                                    if k in v["mean_hit_at_r"]])) for k in keys},
                "per_source": {n: {"n_way": v["n_way"], "mean_recall_at_k": v["mean_recall_at_k"]}
                               for n, v in per.items()}}

    def fit_calibration(self) -> Optional[dict]:
        """Calibration on each source's validation pairs, never across sources; the thresholds
        are the smallest of the sources' (within the target FPR on each)."""
        from .calibration_fit import fit_calibration, within_source_pairs

        pos, neg, groups = within_source_pairs((self.embed(ds.images), ds.labels)
                                               for ds in self.val_sets.values())
        if len(pos) < 2 or len(neg) < 2:
            return None
        return fit_calibration(pos, neg, target_fpr=0.01, neg_groups=groups).to_dict()


def run_multi_training(cfg: TrainConfig, specs: Sequence[SourceSpec]) -> TrainResult:
    """Discover, split and preload every source, then train one model on all of them."""
    from subject_fingerprint.io import discover
    from subject_fingerprint.preprocess import Preprocessing
    from subject_fingerprint.records import modality_family

    from .data import preload
    from .splits import file_sha256, load_split, records_in

    pre = Preprocessing(spatial_dims=cfg.dims, size=tuple(cfg.size),
                        spacing=tuple(cfg.spacing) if cfg.spacing else None)
    show = cfg.progress and int(os.environ.get("RANK", "0")) == 0
    trains, vals, info = [], {}, []
    for spec in specs:
        found = discover([spec.path], manifest=spec.manifest)
        if not found.records:
            raise ValueError(f"source {spec.name}: no images found in {spec.path}")
        entry = {"name": spec.name, "source": spec.path, "manifest": spec.manifest,
                 "discovered_images": len(found.records), "discovery_failures": len(found.failures),
                 "split": spec.split}
        if spec.split:
            split = load_split(spec.split)
            train_recs, val_recs = records_in(found.records, split, "train"), records_in(found.records, split, "val")
            entry["split_sha256"] = file_sha256(spec.split)
        else:
            train_recs, val_recs = found.records, []
        if not train_recs:
            raise ValueError(f"source {spec.name}: no training images in {spec.split}")
        trains.append(preload(train_recs, pre, progress=show, description=f"loading {spec.name} train"))
        if val_recs:
            vals[spec.name] = preload(val_recs, pre, progress=show, description=f"loading {spec.name} val")
        for ds in [trains[-1]] + ([vals[spec.name]] if spec.name in vals else []):
            for f in ds.failures:
                print(f"warning: {spec.name}: skipped {f.path}: {f.reason}")
        entry["train_summary"] = trains[-1].summary()
        info.append(entry)
    names = [s.name for s in specs]
    train_set = concat(trains, names)
    families = sorted({modality_family(r.modality) for r in train_set.records} - {"other"})
    data_info = {"source": " ".join(f"{s.name}={s.path}" for s in specs), "sources": info,
                 "split": " ".join(f"{s.name}={s.split}" for s in specs if s.split) or None}
    trainer = MultiSourceTrainer(cfg, train_set, vals, preprocessing=pre, data_info=data_info,
                                 modalities=families)
    from . import distributed as ddp
    try:
        return trainer.run()
    finally:
        ddp.cleanup(trainer.ctx)

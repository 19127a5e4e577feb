"""Subject-disjoint train/validation/test splits, seeded, stored as JSON.

Subjects with several images and subjects with a single image ("distractors": they can never be
anchors) are shuffled and cut separately, so every split gets its share of both kinds.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

SPLIT_NAMES = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


def _cut(subjects: List[str], fractions: Sequence[float]) -> List[List[str]]:
    """Cut an (already shuffled) list into len(fractions) parts; rounding goes to the last part
    only through the cumulative boundaries, so sizes add up exactly."""
    total = float(sum(fractions))
    bounds, acc = [0], 0.0
    for f in fractions:
        acc += f / total
        bounds.append(int(round(acc * len(subjects))))
    bounds[-1] = len(subjects)
    return [subjects[bounds[i]:bounds[i + 1]] for i in range(len(fractions))]


def make_split(records: Iterable, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 42,
               source: str = "", manifest: str = "") -> dict:
    """Split the subjects of ``records`` (ImageRecord-like, with ``subject_id``) into
    subject-disjoint train/val/test lists.

    Deterministic: the subject ids are sorted before a ``random.Random(seed)`` shuffle, so the
    same subjects and seed give the same split whatever order discovery returned them in.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError("fractions must be three non-negative numbers (train val test)")
    counts = Counter(r.subject_id for r in records)
    if not counts:
        raise ValueError("no images found: nothing to split")
    rng = random.Random(seed)
    multi = sorted(s for s, n in counts.items() if n >= 2)
    single = sorted(s for s, n in counts.items() if n < 2)
    rng.shuffle(multi)
    rng.shuffle(single)
    parts = [a + b for a, b in zip(_cut(multi, fractions), _cut(single, fractions))]
    split = {"seed": int(seed), "fractions": [float(f) for f in fractions], "source": str(source)}
    if manifest:
        split["manifest"] = str(manifest)
    for name, part in zip(SPLIT_NAMES, parts):
        split[name] = sorted(part)
    split["counts"] = {
        name: {"subjects": len(split[name]),
               "subjects_with_2plus_images": sum(1 for s in split[name] if counts[s] >= 2),
               "images": sum(counts[s] for s in split[name])}
        for name in SPLIT_NAMES}
    return split


def check_split(split: dict) -> None:
    """Raise ValueError unless the split has the three lists and they are disjoint."""
    for name in SPLIT_NAMES:
        if name not in split or not isinstance(split[name], list):
            raise ValueError(f"split file lacks the list {name!r}")
    seen: Dict[str, str] = {}
    for name in SPLIT_NAMES:
        for subject in split[name]:
            if subject in seen:
                raise ValueError(f"subject {subject!r} is in both {seen[subject]} and {name}")
            seen[subject] = name


def save_split(split: dict, path) -> Path:
    check_split(split)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(split, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def load_split(path) -> dict:
    try:
        split = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read split file {path}: {exc}") from exc
    check_split(split)
    return split


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def records_in(records: Iterable, split: dict, name: str) -> list:
    """The records whose subject is in split[name] (order kept)."""
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split {name!r}; use one of {SPLIT_NAMES}")
    wanted = set(split[name])
    return [r for r in records if r.subject_id in wanted]

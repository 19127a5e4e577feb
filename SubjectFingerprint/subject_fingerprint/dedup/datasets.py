"""The DATASET arguments of ``dedup``: folders to embed, or libraries embedded earlier."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..errors import FingerprintError, ModelMismatchError
from .engine import EmbeddedDataset

_NAME = re.compile(r"^([A-Za-z0-9_.\-]+)=(.+)$")


def parse_dataset_arg(text: str) -> Tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (the name is then the folder or file name)."""
    match = _NAME.match(text)
    if match and not Path(text).exists():
        name, path = match.group(1), Path(match.group(2))
    else:
        path = Path(text)
        name = path.stem if path.suffix == ".h5" else path.resolve().name
    if not path.exists():
        raise FingerprintError(f"{path}: no such folder or library")
    return name, path


def _from_library(name: str, path: Path, model) -> EmbeddedDataset:
    from ..library import EmbeddingLibrary

    with EmbeddingLibrary.open(path, mode="r") as lib:
        if lib.model_id != model.model_id:
            raise ModelMismatchError(
                f"{path} holds embeddings of model {lib.model_id}, but dedup runs model "
                f"{model.model_id}; re-embed that dataset's folder or pass the matching --model")
        return EmbeddedDataset(
            name=name,
            embeddings=np.asarray(lib.embeddings, dtype=np.float32),
            subject_ids=np.asarray(lib.column("subject_id"), dtype=object),
            image_ids=np.asarray(lib.column("image_id"), dtype=object),
            sources=np.asarray(lib.column("source"), dtype=object),
            content_hashes=np.asarray(lib.column("content_hash"), dtype=object),
            library=str(path))


def _from_folder(name: str, path: Path, model, device: str, batch_size: int,
                 save_dir: Optional[Path], progress) -> EmbeddedDataset:
    from ..embed import Embedder
    from ..io import discover
    from ..library import EmbeddingLibrary

    found = discover([str(path)], dataset=name)
    embedded = Embedder(model, device=device, batch_size=batch_size).embed_records(
        found.records, progress=progress)
    records, hashes = embedded.records, embedded.content_hashes
    embeddings, failures = embedded.embeddings, list(found.failures) + embedded.failures
    library = None
    if save_dir is not None and records:
        library = Path(save_dir) / f"{name}.h5"
        with EmbeddingLibrary.open(library, mode="a", model=model) as lib:
            lib.add(records, hashes, embeddings, skip_duplicates=False)
        library = str(library)
    return EmbeddedDataset(
        name=name,
        embeddings=embeddings.astype(np.float32),
        subject_ids=np.array([r.subject_id for r in records], dtype=object),
        image_ids=np.array([r.image_id for r in records], dtype=object),
        sources=np.array([r.source for r in records], dtype=object),
        content_hashes=np.array(hashes, dtype=object),
        failures=failures,
        library=library,
        root=str(path))


def load_dataset(text: str, model, device: str = "auto", batch_size: int = 16,
                 save_dir: Optional[Path] = None, progress=True) -> EmbeddedDataset:
    """Embed a folder (a PACS export, a manifest folder, a folder per subject) or read an
    existing ``.h5`` library made by the same model."""
    name, path = parse_dataset_arg(text)
    if path.is_file() and path.suffix == ".h5":
        return _from_library(name, path, model)
    if not path.is_dir():
        raise FingerprintError(f"{path}: a dataset is a folder or an embedding library (.h5)")
    if save_dir is not None and (Path(save_dir) / f"{name}.h5").exists():
        # Never add to (or replace) a library made earlier: it is reused by naming it.
        raise FingerprintError(
            f"{Path(save_dir) / (name + '.h5')} already exists; pass it as the dataset to "
            f"reuse it, or choose another --save-libraries folder")
    return _from_folder(name, path, model, device, batch_size, save_dir, progress)

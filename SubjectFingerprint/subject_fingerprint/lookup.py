"""High-level calls behind the command line and the Slicer module: index images into a
library, and find the closest subjects for new images.

Both accept a checkpoint path, a loaded :class:`~subject_fingerprint.model.FingerprintModel`
or ``None`` (the bundled starter model).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Union

from .errors import Failure, FingerprintError, LibraryError
from .records import LoadedImage

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]


@dataclass
class IndexReport:
    """What one ``index`` run did."""

    added: int = 0
    duplicates: int = 0
    embedded: int = 0  # images that went through the network (0 when all were stored)
    backend: str = ""
    failures: List[Failure] = field(default_factory=list)
    # DICOM objects that hold no image (SR, KO, presentation states, DICOMDIR): not failures.
    not_images: List[Failure] = field(default_factory=list)
    notices: List[str] = field(default_factory=list)
    discovered: int = 0
    cancelled: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "discovered": self.discovered,
            "added": self.added,
            "duplicates": self.duplicates,
            "embedded": self.embedded,
            "backend": self.backend,
            "failures": [{"path": f.path, "reason": f.reason} for f in self.failures],
            "not_images": [{"path": f.path, "reason": f.reason} for f in self.not_images],
            "notices": list(self.notices),
            "cancelled": self.cancelled,
            "seconds": round(self.seconds, 3),
        }


class Cancelled(FingerprintError):
    """Raised inside a run when the caller's ``cancel()`` said so."""


def resolve_model(model=None, device="cpu"):
    """Return a FingerprintModel from a model object, a checkpoint path or None (starter)."""
    from .checkpoint import default_model_path, load_checkpoint
    from .model import FingerprintModel

    if isinstance(model, FingerprintModel):
        return model
    path = default_model_path() if model in (None, "") else Path(model)
    return load_checkpoint(path, device=device)


def _progress_reporter(progress, total: int, desc: str):
    """Turn the ``progress`` argument into a function ``update(n_done, message)`` and a closer."""
    if callable(progress):
        state = {"done": 0}

        def update(n, message=""):
            state["done"] += n
            progress(state["done"], total, message)

        return update, lambda: None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)

        def update(n, message=""):
            if message:
                bar.set_postfix_str(message, refresh=False)
            bar.update(n)

        return update, bar.close
    return (lambda n, message="": None), lambda: None


def index(
    sources: Sequence[Union[str, Path]],
    library: Union[str, Path],
    model=None,
    dataset: str = "",
    manifest: Optional[Union[str, Path]] = None,
    device: str = "auto",
    batch_size: Optional[int] = None,
    num_workers: int = 0,
    skip_duplicates: bool = True,
    progress: Union[bool, ProgressFn] = True,
    cancel: Optional[Callable[[], bool]] = None,
    transactional: bool = False,
    commit_overhead: float = 0.1,
    backend: str = "torch",
    shard: Optional[tuple] = None,
    known_hashes: Optional[frozenset] = None,
) -> IndexReport:
    """Embed every image found under ``sources`` and add it to the library file ``library``.

    Files that cannot be read are collected in ``report.failures`` and do not stop the run.
    By default what is embedded is published as it goes (``EmbeddingLibrary.maybe_commit``:
    commits spaced so that copying costs at most ``commit_overhead`` of the time), so a long run
    that dies keeps most of what it finished. With ``transactional=True`` nothing is published
    until every image is embedded: a cancelled or killed run leaves the library as it was.

    Content hashes already in the library are checked right after decoding, so re-indexing a
    folder embeds nothing that is stored (unless ``skip_duplicates=False``). ``backend`` is
    one of :data:`subject_fingerprint.backends.BACKENDS`; ``num_workers=None`` sizes the
    decoding workers to the cores. ``shard=(rank, world)`` indexes only the rank-th of world
    contiguous slices of the images (the torchrun path, :mod:`.distributed_index`), and
    ``known_hashes`` are content hashes to skip besides those in ``library``.
    """
    from .embed import Embedder
    from .io import discover
    from .library import EmbeddingLibrary

    started = time.perf_counter()
    fmodel = resolve_model(model)
    found = discover([str(s) for s in sources], manifest=manifest, dataset=dataset)
    records = found.records
    if shard is not None:
        rank, world = shard
        n = len(records)
        records = records[rank * n // world:(rank + 1) * n // world]
    # What discovery found wrong (unreadable files, non-images, notices) is reported once,
    # by the first shard.
    first = not shard or shard[0] == 0
    report = IndexReport(discovered=len(records),
                         failures=list(found.failures) if first else [],
                         not_images=list(found.skipped) if first else [],
                         notices=list(found.notices) if first else [])
    embedder = Embedder(fmodel, device=device, batch_size=batch_size, num_workers=num_workers,
                        backend=backend)
    update, close = _progress_reporter(progress, len(records), "embedding")
    decode_s = model_s = 0.0
    decoded = 0

    # The library is copy-on-write: each commit publishes a new file atomically.
    with EmbeddingLibrary.open(library, mode="a", model=fmodel) as lib:
        known = None
        if skip_duplicates and (len(lib) or known_hashes):
            known = frozenset(h for h in lib.column("content_hash").tolist() if h)
            known = known | frozenset(known_hashes or ())
        try:
            for batch in embedder.iter_batches(records, skip_hashes=known):
                if cancel is not None and cancel():
                    raise Cancelled("cancelled by the user")
                report.failures.extend(batch.failures)
                report.duplicates += len(batch.skipped)
                report.embedded += len(batch.records)
                decoded += len(batch.records) + len(batch.skipped)
                decode_s += batch.decode_seconds
                model_s += batch.model_seconds
                if len(batch.records):
                    result = lib.add(batch.records, batch.content_hashes, batch.embeddings,
                                     skip_duplicates=skip_duplicates, backends=[embedder.backend])
                    report.added += result.added
                    report.duplicates += len(result.duplicates)
                if not transactional:
                    lib.maybe_commit(commit_overhead)
                # Decode runs in parallel workers: its rate is per worker times the workers.
                workers = max(1, embedder.num_workers)
                rates = (f"decode {workers * decoded / max(decode_s, 1e-9):.0f} img/s, "
                         f"model {report.embedded / model_s if model_s else 0:.0f} img/s, "
                         f"{report.added} added")
                update(len(batch.records) + len(batch.failures) + len(batch.skipped), rates)
        except Cancelled:
            report.cancelled = True
            if transactional:
                lib.rollback()
                report.added = report.duplicates = 0
        finally:
            close()
    report.backend = embedder.backend
    report.seconds = time.perf_counter() - started
    logger.info("indexed %d images into %s in %.1f s (%d duplicates, %d failures)",
                report.added, library, report.seconds, report.duplicates, len(report.failures))
    return report


def library_backend(lib, device) -> str:
    """The backend that embedded the whole library, if it runs here; else eager torch (the
    one to embed a few more images with, so they compare with the stored ones exactly)."""
    from .backends import unavailable
    from .device import resolve_device

    made_with = lib.backends
    if len(made_with) != 1 or made_with[0] in ("torch", "auto"):
        return "torch"
    reason = unavailable(made_with[0], resolve_device(device)[0])
    if reason:
        logger.info("library made with %s, which cannot run here (%s): querying with torch",
                    made_with[0], reason)
        return "torch"
    return made_with[0]


def _calibration_notice(lib, fmodel) -> str:
    """Say so when the probabilities come from another calibration than the library recorded."""
    from .checkpoint import calibration_id

    recorded = calibration_id(lib.model_metadata.get("calibration"))
    current = calibration_id(fmodel.metadata.get("calibration"))
    if not recorded or recorded == current:
        return ""
    return (f"{lib.path} was built with calibration {recorded}; the model now has "
            f"{current or 'none'}: probabilities follow the model's calibration")


def load_query_image(image) -> LoadedImage:
    """A query given as a path (file or DICOM series folder) or an already loaded image."""
    if isinstance(image, LoadedImage):
        return image
    from .io import read_image

    return read_image(str(image))


# Open-set query: prior probability that the query's subject is in the library at all, and
# the posterior a candidate needs to be reported as the match.
PRIOR_IN_LIBRARY = 0.5
MATCH_LEVEL = 0.9


def open_set(results, subject_counts: dict, calibration, prior_in_library: float = PRIOR_IN_LIBRARY,
             level: float = MATCH_LEVEL) -> None:
    """Turn each result's probabilities into open-set posteriors, in place, and decide.

    Hypotheses: the query's subject is library subject k (prior ``prior_in_library / N``
    each) or none of them. A candidate's likelihood ratio is the model's (a logit fitted on
    balanced pairs is a log likelihood ratio) at its closest image, divided by its number of
    images: the closest of m images of another person is about m times likelier to be that
    close. Subjects not among the candidates are taken as LR 0, which only raises the
    posteriors shown. ``result.open_set`` says which subject matches, or that none does.
    """
    import math

    n = max(len(subject_counts), 1)
    prior = min(max(prior_in_library, 1e-12), 1 - 1e-12) / n
    for result in results:
        best: dict = {}
        for m in list(result.subjects) + list(result.images):
            key = (m.dataset, m.subject_id)
            best[key] = min(best.get(key, math.inf), m.distance)
        log_lr = {key: calibration.coef * d + calibration.intercept
                  - math.log(max(subject_counts.get(key, 1), 1)) for key, d in best.items()}
        # log of each hypothesis' weight; "none" has prior 1 - prior_in_library and LR 1.
        logw = {key: math.log(prior) + v for key, v in log_lr.items()}
        log_none = math.log(1 - prior * n) if prior * n < 1 else -math.inf
        top = max([log_none, *logw.values()])
        total = math.exp(log_none - top) + sum(math.exp(w - top) for w in logw.values())
        posteriors = {key: math.exp(w - top) / total for key, w in logw.items()}
        for m in list(result.subjects) + list(result.images):
            m.probability = posteriors.get((m.dataset, m.subject_id))
        first = result.subjects[0] if result.subjects else None
        p = first.probability if first is not None else None
        matched = first is not None and p is not None and p >= level
        result.open_set = {
            "match": first.subject_id if matched else None,
            "dataset": first.dataset if matched else None,
            "best_posterior": p, "best_subject": first.subject_id if first else None,
            "likelihood_ratio": (math.exp(min(log_lr[(first.dataset, first.subject_id)], 700))
                                 if first is not None else None),
            "level": level, "prior_in_library": prior_in_library,
            "answer": (f"match: {first.subject_id}" if matched else
                       "no subject of the library matches"
                       + (f" (best: {first.subject_id}, posterior {p:.3g})" if first else "")),
        }


def query(
    images: Iterable,
    library: Union[str, Path],
    model=None,
    k: int = 10,
    device: str = "auto",
    failures: Optional[List[Failure]] = None,
    notices: Optional[List[str]] = None,
    backend: Optional[str] = None,
    prior_in_library: float = PRIOR_IN_LIBRARY,
    level: float = MATCH_LEVEL,
):
    """Rank the library's images and subjects for each query image.

    ``notices`` (a list) receives remarks that are not failures: a model whose calibration
    differs from the one the library recorded when it was built.

    ``images`` are paths or :class:`LoadedImage` objects. A bad image raises, unless a list
    is passed as ``failures``: then it is recorded there and skipped. Returns one
    ``QueryResult`` per kept image, in order, with ``.query`` set to the image's name.

    With a calibrated model the probabilities are open-set posteriors (see :func:`open_set`)
    and ``result.open_set`` names the matching subject, or says that none matches.

    ``backend=None`` embeds the queries as the library's images were embedded (the one backend
    it records, if that runs here; else eager float32), so an image that is in the library is
    found at distance 0 (about 0.001 with bf16), not at the 0.02 of mixing bf16 and float32.
    """
    from .embed import Embedder
    from .library import EmbeddingLibrary
    from .search import rank

    fmodel = resolve_model(model)
    with EmbeddingLibrary.open(library, mode="r", model=fmodel) as lib:
        if len(lib) == 0:
            raise LibraryError(f"{library}: the library is empty; index some images first")
        note = _calibration_notice(lib, fmodel)
        if note:
            logger.info("%s", note)
            if notices is not None:
                notices.append(note)
        names, loaded = [], []
        for image in images:
            name = image.record.source if isinstance(image, LoadedImage) else str(image)
            try:
                item = load_query_image(image)
                fmodel.check_image(item)
            except FingerprintError as exc:
                if failures is None:
                    raise
                failures.append(Failure.from_exception(name, exc))
                continue
            names.append(name)
            loaded.append(item)
        if not loaded:
            return []
        if backend is None:
            backend = library_backend(lib, device)
        embeddings = Embedder(fmodel, device=device, backend=backend).embed_loaded(loaded)
        results = rank(lib, embeddings, k=k, calibration=fmodel.calibration)
        if fmodel.calibration is not None:
            import numpy as np

            codes, keys = lib.subject_codes()
            counts = np.bincount(codes, minlength=len(keys))
            open_set(results, {(ds, sid): int(c) for (ds, sid), c in zip(keys, counts)},
                     fmodel.calibration, prior_in_library, level)
    for name, result in zip(names, results):
        result.query = name
    return results

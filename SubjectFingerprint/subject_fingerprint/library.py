"""The embedding library: one HDF5 file holding fingerprint embeddings and who they belong to.

Layout (readable with plain h5py; strings are UTF-8, read them with ``dset.asstr()[...]``)::

    /embeddings    float32 (N, D), chunked (4096, D), resizable
    /subject_id /image_id /dataset /modality /view /source    variable-length UTF-8 strings (N,)
    /content_hash  fixed-length UTF-8 string (N,) (64 bytes for a SHA-256 hex digest; widened
                   if a longer hash ever comes)
    /added         float64 (N,) unix time the entry was added
    attrs: format_version (int), model_id (str), model_metadata (JSON text), embedding_dim (int),
           embedding_backends (JSON list of the inference backends that made the rows)

Crash safety (copy-on-write). A published library file is never modified in place. A write
session copies the file to ``<name>.tmp-<pid>-<random>`` in the same folder the first time it
changes something, makes its changes in the copy, and on ``commit()`` / ``close()`` flushes,
fsyncs and ``os.replace``-s the copy over the library (atomic on POSIX and Windows). A crash or
kill at any moment therefore leaves either the old file or the new one, never a mixture; the
abandoned copy is deleted by the next writer. Readers take no writer lock: an open reader keeps
reading the file it opened (the old inode) while a writer publishes a new one.

The cost is a copy of the whole file once per write session (about 1.5 s per GB here), so
callers that add many small batches to a large library should open once and ``commit()`` every
so often rather than opening per batch.

Writers are serialised by an OS lock (``filelock``: ``flock``, or ``msvcrt.locking`` on
Windows) on ``<name>.lock``: a second writer waits up to ``lock_timeout`` seconds and then gets
``LibraryLockedError`` naming the process that holds the lock. The lock file exists only
while a writer holds it; if it is deleted meanwhile, the holder takes it again before
publishing or, if another writer got it first, refuses to publish (see ``_WriterLock``). A
working copy is removed as abandoned only when the process named in it is dead. A full disk
drops the uncommitted changes and says "no space left on device, nothing stored, library
unchanged".
"""

from __future__ import annotations

import contextlib
import errno
import gc
import glob
import io
import json
import os
import secrets
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np

from .errors import LibraryError, LibraryLockedError, ModelMismatchError

try:  # POSIX: reflink copies
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

FORMAT_VERSION = 1
CHUNK_ROWS = 4096
HASH_WIDTH = 64  # hex SHA-256
STRING_COLUMNS = ("subject_id", "image_id", "dataset", "modality", "view", "source")
COLUMNS = STRING_COLUMNS + ("content_hash", "added")
DEFAULT_LOCK_TIMEOUT = 30.0


@dataclass
class Duplicate:
    """An image that was not added because its pixels are already stored (or earlier in the
    same batch); ``existing_*`` name the entry it duplicates."""

    record: object
    content_hash: str
    existing_subject_id: str
    existing_image_id: str

    def to_dict(self) -> dict:
        return {
            "source": getattr(self.record, "source", ""),
            "subject_id": getattr(self.record, "subject_id", ""),
            "image_id": getattr(self.record, "image_id", ""),
            "content_hash": self.content_hash,
            "existing_subject_id": self.existing_subject_id,
            "existing_image_id": self.existing_image_id,
        }


@dataclass
class AddResult:
    """What one ``add`` call stored."""

    added: int = 0
    duplicates: List[Duplicate] = field(default_factory=list)


def _h5py():
    import h5py

    return h5py


def _vlen_str():
    return _h5py().string_dtype("utf-8")


def _fixed_str(width: int):
    return _h5py().string_dtype("utf-8", width)


def _to_str(values) -> np.ndarray:
    """Decode the UTF-8 bytes of a low-level point-selection read (see ``_read_rows``; whole
    columns are decoded by h5py's ``asstr``) into an object array of ``str``."""
    out = np.empty(len(values), dtype=object)
    out[:] = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    return out


_FICLONE = 0x40049409  # Linux ioctl: share the blocks of a file (btrfs, XFS); O(1)


def _copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst``: a reflink where the file system has them, else a full copy."""
    if fcntl is not None and hasattr(fcntl, "ioctl"):
        try:
            with open(src, "rb") as fin, open(dst, "wb") as fout:
                fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return
        except OSError:
            pass  # ext4, tmpfs, network file systems: fall back to copying
    shutil.copyfile(src, dst)


def _safe_text(value) -> str:
    """``value`` as a string that encodes to UTF-8 (file names that are not valid UTF-8
    arrive with surrogate escapes; they are stored with backslash escapes instead)."""
    text = "" if value is None else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _iso(unix_time: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(float(unix_time), tz=timezone.utc).isoformat(timespec="seconds")


def _fsync_path(path, directory=False) -> None:
    flags = os.O_RDONLY
    if directory:
        if os.name == "nt":  # directories cannot be fsynced on Windows
            return
        flags |= getattr(os, "O_DIRECTORY", 0)
    fd = os.open(str(path), flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _WriterLock:
    """Exclusive lock on ``<library>.lock`` (``filelock``: flock on POSIX, msvcrt on Windows).

    Robust to the lock file being deleted: the holder removes the file when it lets go (so
    none is left after a normal run, and a waiter that locked the removed file retries), and
    before each publish :meth:`verify` checks that the path is still the file it locked,
    re-taking it if it vanished and refusing to publish if another writer took it meanwhile.
    The holder writes its pid into the file for the message a waiting writer gets.
    """

    def __init__(self, library_path: Path, timeout: float):
        from filelock import FileLock, Timeout

        self.path = Path(str(library_path) + ".lock")
        self.library_path = library_path
        self._locks = []
        lock = FileLock(str(self.path), timeout=max(0.0, timeout), is_singleton=False,
                        thread_local=False)
        try:
            lock.acquire(poll_interval=0.05)
        except Timeout:
            holder = self._holder()
            who = f" (pid {holder})" if holder else ""
            raise LibraryLockedError(
                f"another process is writing to {library_path}{who}; try again when it "
                f"has finished (lock file {self.path})") from None
        self._locks.append(lock)
        self._identity = self._stat()
        self._write_pid()

    def _stat(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    def _write_pid(self) -> None:
        try:
            fd = os.open(str(self.path), os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        except OSError:
            pass  # the pid only improves a message

    def _holder(self) -> str:
        try:
            with open(self.path, "rb") as fh:
                return fh.read(32).decode("ascii", "replace").strip()
        except OSError:
            return ""

    def verify(self) -> None:
        """Raise ``LibraryLockedError`` unless this process still holds the lock on the path."""
        from filelock import FileLock, Timeout

        current = self._stat()
        if current is not None and current == self._identity:
            return
        if current is None:
            # Someone deleted the lock file; nobody else has taken the path yet: take it again.
            lock = FileLock(str(self.path), timeout=0, is_singleton=False, thread_local=False)
            try:
                lock.acquire()
            except Timeout:
                lock = None
            if lock is not None:
                self._locks.append(lock)
                self._identity = self._stat()
                self._write_pid()
                return
        holder = self._holder()
        raise LibraryLockedError(
            f"{self.library_path}: the lock file {self.path} was removed while this process was "
            f"writing and another writer{f' (pid {holder})' if holder else ''} has taken it; "
            f"changes since the last commit were not stored, the library is as that writer "
            f"leaves it")

    def release(self) -> None:
        if not self._locks:
            return
        # Remove the file while still holding it, so nothing is left behind; only our own.
        if self._identity is not None and self._stat() == self._identity:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        for lock in reversed(self._locks):
            try:
                lock.release(force=True)
            except Exception:  # noqa: BLE001 - releasing must not raise over the real error
                pass
        self._locks = []


def _identity(path: Path):
    """What tells one published version of a file from the next (each is a new inode)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@contextlib.contextmanager
def _quiet_dealloc_errors():
    """On a full disk, h5py objects freed during writes to (or the close of) a working copy
    fail to flush and each prints a traceback ("Exception ignored in ... __dealloc__").
    The copy is dropped and the error reported once as a clear line, so those prints are
    held back here; anything else written to stderr meanwhile is passed on."""
    previous_hook, previous_err = sys.unraisablehook, sys.stderr
    held = io.StringIO()

    def hook(unraisable):
        if not _is_no_space(unraisable.exc_value or Exception()):
            previous_hook(unraisable)

    sys.unraisablehook, sys.stderr = hook, held
    try:
        yield
    except BaseException:
        # Free the failed copy's h5py objects now, while their flush errors are held back.
        # Only on failure: a full collection costs ~0.2 s with torch loaded, once per batch.
        gc.collect()
        raise
    finally:
        sys.unraisablehook, sys.stderr = previous_hook, previous_err
        text = held.getvalue()
        if text and not _is_no_space(Exception(text)):
            previous_err.write(text)


def _is_no_space(exc: BaseException) -> bool:
    # h5py reports ENOSPC as RuntimeError/OSError text ("errno = 28"), the OS as OSError 28.
    return (getattr(exc, "errno", None) == errno.ENOSPC or "errno = 28" in str(exc)
            or "No space left on device" in str(exc))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError, ValueError):
        return True   # exists (another user's) or cannot tell: leave its file alone
    return True


class EmbeddingLibrary:
    """An open embedding library. Use :meth:`open` (a context manager)."""

    def __init__(self, path: Path, mode: str):
        self.path = Path(path)
        self.mode = mode
        self._h5 = None  # handle of the published file (read) or of the working copy (write)
        self._work: Optional[Path] = None  # working copy while there are uncommitted changes
        self._lock: Optional[_WriterLock] = None
        self._embeddings: Optional[np.ndarray] = None
        self._norms: Optional[np.ndarray] = None
        self._hash_index = None  # (sorted hashes, their rows)
        self._recent_hashes: dict = {}  # hash -> row, for rows added after the index was built
        self._subject_codes = None
        self._last_commit_at = time.monotonic()
        self.last_commit_seconds: Optional[float] = None  # what the last commit() took
        self._copy_seconds = 0.0
        self._commits = 0  # commits published by this session
        self._base = None  # identity of the published file the working copy was made from
        self.model_id = ""
        self.model_metadata: dict = {}
        self.embedding_dim = 0
        self.format_version = FORMAT_VERSION

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path, mode: str = "r", model=None, *, model_id: Optional[str] = None,
             model_metadata: Optional[dict] = None, embedding_dim: Optional[int] = None,
             lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> "EmbeddingLibrary":
        """Open the library at ``path``.

        ``mode="r"`` reads (no lock; the file must exist). ``mode="a"`` reads and writes, taking
        the writer lock (waiting up to ``lock_timeout`` seconds), and creates the file if it is
        missing; creating needs ``model`` (anything with ``model_id``, ``metadata`` and
        ``embedding_dim``) or ``model_id`` + ``embedding_dim`` (+ ``model_metadata``).
        With a model, a library made by a different model raises ``ModelMismatchError``.
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', not {mode!r}")
        if model is not None:
            model_id = model_id or str(model.model_id)
            if model_metadata is None:
                model_metadata = dict(getattr(model, "metadata", {}) or {})
            if embedding_dim is None:
                embedding_dim = int(model.embedding_dim)
        lib = cls(Path(path), mode)
        try:
            if mode == "a":
                try:
                    lib.path.parent.mkdir(parents=True, exist_ok=True)
                    lib._lock = _WriterLock(lib.path, lock_timeout)
                except LibraryLockedError:
                    raise
                except OSError as exc:
                    raise LibraryError(f"{lib.path}: cannot write here ({exc})") from exc
                lib._remove_stale_copies()
                if not lib.path.exists():
                    if not model_id or not embedding_dim:
                        raise LibraryError(
                            f"{lib.path}: no library there, and a model is needed to create one")
                    lib._create(model_id, model_metadata or {}, int(embedding_dim))
            elif not lib.path.exists():
                raise LibraryError(f"{lib.path}: no embedding library at this path")
            lib._open_published()
            if model_id and lib.model_id != model_id:
                raise ModelMismatchError(
                    f"{lib.path} holds embeddings of model {lib.model_id}, but the model given is "
                    f"{model_id}; use the model that built the library or a new library file")
        except BaseException:
            lib._abandon()
            raise
        return lib

    def _raise_if_no_space(self, exc: BaseException) -> None:
        if isinstance(exc, Exception) and _is_no_space(exc):
            since = " since the last commit" if self._commits else ""
            raise LibraryError(f"{self.path}: no space left on device, nothing stored{since}, "
                               "library unchanged") from None

    def _remove_stale_copies(self) -> None:
        # Working copies of writers that died before committing. A copy whose writer is alive
        # is never touched, even if the lock file was deleted under it.
        for stale in self.path.parent.glob(glob.escape(self.path.name) + ".tmp-*"):
            try:
                pid = int(stale.name[len(self.path.name) + len(".tmp-"):].split("-", 1)[0])
            except ValueError:
                continue
            if _pid_alive(pid):
                continue
            try:
                stale.unlink()
            except OSError:
                pass

    def _new_work_path(self) -> Path:
        return self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")

    def _create(self, model_id: str, metadata: dict, dim: int) -> None:
        h5py = _h5py()
        work = self._new_work_path()
        try:
            with h5py.File(work, "w", locking=False) as f:
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["model_id"] = str(model_id)
                f.attrs["model_metadata"] = json.dumps(metadata, default=str, sort_keys=True)
                f.attrs["embedding_dim"] = int(dim)
                f.create_dataset("embeddings", shape=(0, dim), maxshape=(None, dim),
                                 dtype="float32", chunks=(CHUNK_ROWS, dim))
                for name in STRING_COLUMNS:
                    f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_vlen_str(),
                                     chunks=(CHUNK_ROWS,))
                f.create_dataset("content_hash", shape=(0,), maxshape=(None,),
                                 dtype=_fixed_str(HASH_WIDTH), chunks=(CHUNK_ROWS,))
                f.create_dataset("added", shape=(0,), maxshape=(None,), dtype="float64",
                                 chunks=(CHUNK_ROWS,))
            self._publish(work)
        except BaseException as exc:
            work.unlink(missing_ok=True)
            self._raise_if_no_space(exc)
            raise

    def _open_published(self) -> None:
        h5py = _h5py()
        # h5py's default locking first, so a plain ``h5py.File(path)`` open in this process
        # and ours coexist (HDF5 refuses a second open with other locking flags); then the
        # other settings, for file systems without locks and handles opened otherwise.
        error = None
        for locking in (None, False, True):
            try:
                self._h5 = h5py.File(self.path, "r", locking=locking)
                break
            except OSError as exc:
                error = exc
                if "lock" not in str(exc).lower():
                    break
        if self._h5 is None:
            raise LibraryError(f"{self.path}: not a readable HDF5 file ({error})") from error
        self._read_header()

    def _read_header(self) -> None:
        f = self._h5
        attrs = f.attrs
        missing = [a for a in ("format_version", "model_id", "embedding_dim") if a not in attrs]
        missing += [c for c in ("embeddings",) + COLUMNS if c not in f]
        if missing:
            raise LibraryError(f"{self.path}: not an embedding library (missing "
                               f"{', '.join(missing)})")
        version = int(attrs["format_version"])
        if version > FORMAT_VERSION:
            raise LibraryError(f"{self.path}: library format version {version} is newer than this "
                               f"software understands ({FORMAT_VERSION}); update "
                               f"subject-fingerprint")
        self.format_version = version
        mid = attrs["model_id"]
        self.model_id = mid.decode() if isinstance(mid, bytes) else str(mid)
        raw = attrs.get("model_metadata", "{}")
        raw = raw.decode() if isinstance(raw, bytes) else str(raw)
        try:
            self.model_metadata = json.loads(raw) if raw else {}
        except ValueError as exc:
            raise LibraryError(f"{self.path}: model_metadata is not valid JSON ({exc})") from exc
        self.embedding_dim = int(attrs["embedding_dim"])
        n = f["embeddings"].shape[0]
        if f["embeddings"].ndim != 2 or f["embeddings"].shape[1] != self.embedding_dim:
            raise LibraryError(
                f"{self.path}: embeddings do not have shape (N, {self.embedding_dim})")
        bad = [c for c in COLUMNS if f[c].shape != (n,)]
        if bad:
            raise LibraryError(f"{self.path}: columns {', '.join(bad)} do not have {n} rows")

    # -- context manager / transaction -----------------------------------------------------

    def __enter__(self) -> "EmbeddingLibrary":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abandon()

    def __del__(self):
        # A session never closed: drop its uncommitted copy and free the lock.
        try:
            self._abandon()
        except Exception:
            pass

    def __len__(self) -> int:
        return int(self._h5["embeddings"].shape[0]) if self._h5 is not None else 0

    def __repr__(self) -> str:
        return f"EmbeddingLibrary({str(self.path)!r}, mode={self.mode!r}, entries={len(self)})"

    @property
    def closed(self) -> bool:
        return self._h5 is None

    def _check_open(self) -> None:
        if self._h5 is None:
            raise LibraryError(f"{self.path}: the library is closed")

    def _writable(self):
        """Handle on the working copy, making it on first use."""
        self._check_open()
        if self.mode != "a":
            raise LibraryError(f"{self.path}: opened read-only; open with mode='a' to change it")
        if self._work is None:
            work = self._new_work_path()
            self._h5.close()
            self._h5 = None
            started = time.monotonic()
            try:
                # What the copy starts from; publishing checks nobody replaced it meanwhile.
                self._base = _identity(self.path)
                _copy_file(self.path, work)
                self._copy_seconds = time.monotonic() - started
                self._h5 = _h5py().File(work, "r+", locking=False)
            except BaseException as exc:
                work.unlink(missing_ok=True)
                self._open_published()
                self._raise_if_no_space(exc)
                raise
            self._work = work
        return self._h5

    def _publish(self, work: Path) -> None:
        _fsync_path(work)
        if self._lock is not None:
            # Last moment before the replace: the lock must still be ours (it may be deleted),
            # and the library the file we copied (else another writer's rows would be lost).
            self._lock.verify()
            if _identity(self.path) != self._base:
                raise LibraryLockedError(
                    f"{self.path}: another writer published the library while this process was "
                    "writing (was the lock file deleted?); changes since the last commit were "
                    "not stored, the library holds that writer's version")
        try:
            os.replace(work, self.path)
        except PermissionError as exc:  # Windows: the library is open in another program
            raise LibraryError(f"{self.path}: cannot replace the library file ({exc}); close "
                               f"other programs that have it open and try again") from exc
        _fsync_path(self.path.parent, directory=True)
        self._base = _identity(self.path)

    @property
    def has_uncommitted_changes(self) -> bool:
        return self._work is not None

    def maybe_commit(self, max_overhead: float = 0.1) -> bool:
        """Commit if it is due: when the time since the last commit is long enough that
        committing (a copy of the whole file) costs at most ``max_overhead`` of the time.

        For long indexing runs into a large library: call it after each ``add``. With a 1M-entry
        library (about 2 s a commit here) and the default 0.1, that is a commit every ~20 s;
        small libraries commit after nearly every call. Returns whether it committed.
        """
        if self._work is None:
            return False
        cost = self.last_commit_seconds
        if cost is None:  # not measured yet: estimate from the file size (~0.5 GB/s copy)
            cost = 0.02 + self.path.stat().st_size / 5e8
        if time.monotonic() - self._last_commit_at >= cost / max(max_overhead, 1e-9):
            self.commit()
            return True
        return False

    def commit(self) -> None:
        """Publish the changes made so far (atomically); the session stays open.

        A full disk or a lost lock drops the changes since the last commit (the published
        library is untouched) and raises ``LibraryError`` saying so.
        """
        if self._work is None:
            return
        started = time.monotonic()
        work, self._work = self._work, None
        try:
            with _quiet_dealloc_errors():
                self._h5.flush()
                self._h5.close()
            self._h5 = None
            self._publish(work)
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)
            if self._h5 is not None:
                with _quiet_dealloc_errors():
                    try:
                        self._h5.close()
                    except Exception:  # noqa: BLE001 - the copy is dropped anyway
                        pass
                self._h5 = None
            work.unlink(missing_ok=True)
            self._invalidate()
            self._open_published()
            self._raise_if_no_space(exc)
            raise
        self._open_published()
        self._commits += 1
        self._last_commit_at = time.monotonic()
        # The copy is made when the first change after a commit comes; count it in too.
        self.last_commit_seconds = self._last_commit_at - started + self._copy_seconds

    def rollback(self) -> None:
        """Forget the changes made since the last commit."""
        if self._work is None:
            return
        with _quiet_dealloc_errors():
            try:
                self._h5.close()
            except Exception:  # noqa: BLE001 - the working copy is dropped anyway
                pass
        self._h5 = None
        self._work.unlink(missing_ok=True)
        self._work = None
        self._invalidate()
        self._open_published()

    def close(self) -> None:
        """Commit pending changes, release the writer lock and close the file."""
        try:
            if self._h5 is not None and self._work is not None:
                self.commit()
        finally:
            self._abandon()

    def _abandon(self) -> None:
        """Close without committing: pending changes are dropped, the lock released."""
        if self._h5 is not None:
            with _quiet_dealloc_errors():
                try:
                    self._h5.close()
                except Exception:
                    pass
            self._h5 = None
        if self._work is not None:
            self._work.unlink(missing_ok=True)
            self._work = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._invalidate()

    def _invalidate(self) -> None:
        self._embeddings = None
        self._norms = None
        self._hash_index = None
        self._recent_hashes = {}
        self._subject_codes = None

    # -- reading ---------------------------------------------------------------------------

    @property
    def embeddings(self) -> np.ndarray:
        """All embeddings, (N, D) float32, read once and kept (read-only array)."""
        self._check_open()
        if self._embeddings is None:
            arr = np.empty(self._h5["embeddings"].shape, dtype=np.float32)
            if len(arr):
                try:
                    self._h5["embeddings"].read_direct(arr)
                except OSError as exc:
                    raise LibraryError(f"{self.path}: cannot read the embeddings ({exc})") from exc
            arr.setflags(write=False)
            self._embeddings = arr
        return self._embeddings

    @property
    def squared_norms(self) -> np.ndarray:
        """Squared L2 norms of the embeddings (float32), cached for searches."""
        if self._norms is None:
            emb = self.embeddings
            self._norms = np.einsum("ij,ij->i", emb, emb) if len(emb) else np.zeros(0, np.float32)
        return self._norms

    def subject_codes(self):
        """``(codes, keys)``: for each entry an int index into ``keys``, the distinct
        ``(dataset, subject_id)`` pairs. Reads two whole string columns; cached."""
        if self._subject_codes is None:
            ds, sid = self.column("dataset"), self.column("subject_id")
            joined = np.array([f"{a}\x00{b}" for a, b in zip(ds, sid)], dtype=object)
            uniq, codes = (np.unique(joined, return_inverse=True) if len(joined)
                           else (np.empty(0, dtype=object), np.empty(0, dtype=np.int64)))
            keys = [tuple(u.split("\x00", 1)) for u in uniq.tolist()]
            self._subject_codes = (codes.astype(np.int64).reshape(-1), keys)
        return self._subject_codes

    def column(self, name: str, rows=None) -> np.ndarray:
        """One column: strings as an object array of ``str``, ``added`` as float64.

        ``rows`` (indices) reads only those rows, in the order given; only the HDF5 chunks
        holding them are touched.
        """
        self._check_open()
        if name not in COLUMNS:
            raise KeyError(f"unknown column {name!r}; columns are {', '.join(COLUMNS)}")
        dset = self._h5[name]
        try:
            if rows is None and name != "added":
                return dset.asstr()[()].astype(object) if len(dset) else np.empty(0, dtype=object)
            values = self._read_column(dset, rows)
        except OSError as exc:
            raise LibraryError(f"{self.path}: cannot read column {name} ({exc})") from exc
        if name == "added":
            return np.asarray(values, dtype=np.float64)
        return _to_str(values)

    def _read_column(self, dset, rows):
        if rows is None:
            values = dset[()] if len(dset) else np.empty(0, dtype=dset.dtype)
        else:
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            if len(rows) and (rows.min() < 0 or rows.max() >= len(dset)):
                raise IndexError(f"row index out of range for {len(dset)} entries")
            uniq, inverse = np.unique(rows, return_inverse=True)
            values = self._read_rows(dset, uniq)[inverse] if len(uniq) else \
                np.empty(0, dtype=dset.dtype)
        return values

    @staticmethod
    def _read_rows(dset, sorted_rows: np.ndarray) -> np.ndarray:
        """Rows ``sorted_rows`` (sorted, unique) of a 1-D dataset in one HDF5 read.

        A point selection costs about 20 us a row, where h5py's fancy indexing costs
        0.2-0.8 ms a row (measured on 1M variable-length strings).
        """
        h5s = _h5py().h5s
        m = len(sorted_rows)
        out = np.empty(m, dtype=dset.dtype)
        if m == 0:
            return out
        file_space = dset.id.get_space()
        file_space.select_elements(np.asarray(sorted_rows, dtype=np.uint64).reshape(-1, 1))
        dset.id.read(h5s.create_simple((m,)), file_space, out)
        return out

    def rows(self, indices, columns: Sequence[str] = COLUMNS) -> List[dict]:
        """Entries at ``indices`` as dicts (reading only those rows)."""
        data = {c: self.column(c, indices) for c in columns}
        return [{c: data[c][i] for c in columns} for i in range(len(np.atleast_1d(indices)))]

    @property
    def backends(self) -> List[str]:
        """Inference backends that made the stored embeddings (empty for older libraries)."""
        self._check_open()
        raw = self._h5.attrs.get("embedding_backends", "[]")
        raw = raw.decode() if isinstance(raw, bytes) else str(raw)
        try:
            names = json.loads(raw)
        except ValueError:
            return []
        return [str(n) for n in names] if isinstance(names, list) else []

    def info(self) -> dict:
        """Summary: path, entries, subjects, datasets with counts, model, sizes."""
        self._check_open()
        n = len(self)
        datasets: dict = {}
        subjects = 0
        if n:
            ds = self.column("dataset")
            sid = self.column("subject_id")
            names, counts = np.unique(ds.astype(str), return_counts=True)
            datasets = {str(a): int(b) for a, b in zip(names, counts)}
            subjects = len(set(zip(ds.tolist(), sid.tolist())))
        added = self.column("added") if n else np.zeros(0)
        return {
            "path": str(self.path),
            "entries": n,
            "subjects": subjects,
            "datasets": datasets,
            "model_id": self.model_id,
            "embedding_dim": self.embedding_dim,
            "embedding_backends": self.backends,
            "format_version": self.format_version,
            "file_size_bytes": self.path.stat().st_size if self.path.exists() else 0,
            "first_added": _iso(added.min()) if n else None,
            "last_added": _iso(added.max()) if n else None,
        }

    # -- writing ---------------------------------------------------------------------------

    def _lookup_hashes(self, hashes: List[bytes]) -> np.ndarray:
        """Row of each hash already stored, or -1 (sorted index built once per session)."""
        if self._hash_index is None:
            stored = self._h5["content_hash"][()] if len(self) else np.empty(0, dtype="S1")
            order = np.argsort(stored, kind="stable")
            self._hash_index = (stored[order], order)
        sorted_hashes, order = self._hash_index
        out = np.full(len(hashes), -1, dtype=np.int64)
        if len(sorted_hashes) and len(hashes):
            width = sorted_hashes.dtype.itemsize
            fits = np.array([0 < len(h) <= width for h in hashes], dtype=bool)
            keys = np.array([h if ok else b"" for h, ok in zip(hashes, fits)], dtype=f"S{width}")
            pos = np.searchsorted(sorted_hashes, keys)
            pos_c = np.minimum(pos, len(sorted_hashes) - 1)
            hit = fits & (pos < len(sorted_hashes)) & (sorted_hashes[pos_c] == keys)
            out[hit] = order[pos_c[hit]]
        if self._recent_hashes:
            for i, h in enumerate(hashes):
                if out[i] < 0 and h in self._recent_hashes:
                    out[i] = self._recent_hashes[h]
        return out

    def add(self, records: Sequence, content_hashes: Optional[Sequence[str]], embeddings,
            skip_duplicates: bool = True, backends: Sequence[str] = ()) -> AddResult:
        """Append entries; exact duplicates (same content hash as a stored entry or an earlier
        one in this call) are skipped and reported unless ``skip_duplicates=False``.
        ``backends`` (the inference backends that made the embeddings) join the library's
        :attr:`backends`, so that queries can embed the way the library did.

        The rows are published by ``commit()`` / ``close()``; a crash before that leaves the
        library as it was.
        """
        self._check_open()
        records = list(records)
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim == 1 and len(records) == 1:
            emb = emb[None, :]
        if emb.ndim != 2 or emb.shape[0] != len(records):
            raise LibraryError(f"{self.path}: {len(records)} records but embeddings of shape "
                               f"{emb.shape}")
        if emb.shape[1] != self.embedding_dim:
            raise ModelMismatchError(
                f"{self.path}: embeddings have {emb.shape[1]} dimensions, the library's model "
                f"({self.model_id}) makes {self.embedding_dim}")
        if not np.isfinite(emb).all():
            raise LibraryError(f"{self.path}: refusing to store non-finite embeddings")
        if content_hashes is None:
            content_hashes = [""] * len(records)
        hashes = [str(h or "") for h in content_hashes]
        if len(hashes) != len(records):
            raise LibraryError(f"{self.path}: {len(records)} records but {len(hashes)} hashes")
        enc = [_safe_text(h).encode("utf-8") for h in hashes]

        result = AddResult()
        keep = np.ones(len(records), dtype=bool)
        if skip_duplicates and records:
            existing = self._lookup_hashes(enc)
            dup_rows = np.flatnonzero(existing >= 0)
            owners = {}
            if len(dup_rows):
                ids = self.rows(existing[dup_rows], ("subject_id", "image_id"))
                owners = {int(i): (r["subject_id"], r["image_id"]) for i, r in zip(dup_rows, ids)}
            first_in_batch: dict = {}
            for i, (rec, h) in enumerate(zip(records, hashes)):
                if not h:
                    continue
                if i in owners:
                    keep[i] = False
                    result.duplicates.append(Duplicate(rec, h, *owners[i]))
                elif h in first_in_batch:
                    keep[i] = False
                    first = records[first_in_batch[h]]
                    result.duplicates.append(Duplicate(rec, h, str(first.subject_id),
                                                       str(first.image_id)))
                else:
                    first_in_batch[h] = i
        idx = np.flatnonzero(keep)
        if len(idx) == 0:
            return result

        # Everything is prepared before the file is touched, so that a bad value cannot leave
        # half-written rows behind.
        m = len(idx)
        texts = {name: np.array([_safe_text(getattr(records[i], name, "")) for i in idx],
                                dtype=object) for name in STRING_COLUMNS}
        new_hashes = [enc[i] for i in idx]
        new_emb = np.ascontiguousarray(emb[idx])
        f = self._writable()
        n0 = len(self)
        try:
            with _quiet_dealloc_errors():
                self._write_rows(f, n0, m, new_hashes, new_emb, texts)
                new = set(self.backends) | {str(b) for b in backends if b}
                if new != set(self.backends):
                    f.attrs["embedding_backends"] = json.dumps(sorted(new))
        except BaseException as exc:
            # The working copy may be half-changed: drop it (and this session's uncommitted
            # changes); the published library is untouched. Frames of the error hold dataset
            # handles: free them now, while the copy is being closed.
            f = None
            traceback.clear_frames(exc.__traceback__)
            self.rollback()
            self._raise_if_no_space(exc)
            raise
        # Rows changed: drop the cached matrix, keep the hash index up to date.
        self._embeddings = self._norms = self._subject_codes = None
        if self._hash_index is not None:
            for j, h in enumerate(new_hashes):
                if h:
                    self._recent_hashes.setdefault(h, n0 + j)
        result.added = m
        return result

    def _write_rows(self, f, n0: int, m: int, new_hashes, new_emb, texts) -> None:
        width = max(len(h) for h in new_hashes)
        if width > f["content_hash"].dtype.itemsize:
            self._widen_hashes(f, width)
        for name in ("embeddings",) + COLUMNS:
            f[name].resize(n0 + m, axis=0)
        f["embeddings"][n0:] = new_emb
        for name in STRING_COLUMNS:
            f[name][n0:] = texts[name]
        f["content_hash"][n0:] = np.array(new_hashes).astype(f["content_hash"].dtype)
        f["added"][n0:] = np.full(m, time.time())

    @staticmethod
    def _widen_hashes(f, width: int) -> None:
        old = f["content_hash"][()]
        del f["content_hash"]
        f.create_dataset("content_hash", data=old.astype(_fixed_str(width)), maxshape=(None,),
                         chunks=(CHUNK_ROWS,))

    def remove(self, subject_ids: Iterable[str] = (), image_ids: Iterable[str] = ()) -> int:
        """Remove every entry whose subject ID or image ID is listed; returns how many.

        The kept rows are written to a fresh, compact file that replaces the library at commit.
        """
        self._check_open()
        subjects, images = set(map(str, subject_ids)), set(map(str, image_ids))
        n = len(self)
        if n == 0 or not (subjects or images):
            return 0
        drop = np.zeros(n, dtype=bool)
        if subjects:
            drop |= np.isin(self.column("subject_id"), list(subjects))
        if images:
            drop |= np.isin(self.column("image_id"), list(images))
        removed = int(drop.sum())
        if removed == 0:
            return 0
        self._rewrite(np.flatnonzero(~drop))
        return removed

    def _rewrite(self, keep_rows: np.ndarray) -> None:
        """Replace the working state by a compact file holding only ``keep_rows``."""
        if self.mode != "a":
            raise LibraryError(f"{self.path}: opened read-only; open with mode='a' to change it")
        h5py = _h5py()
        src = self._h5
        if self._work is None:
            self._base = _identity(self.path)
        new = self._new_work_path()
        try:
            with _quiet_dealloc_errors(), h5py.File(new, "w", locking=False) as dst:
                for key, value in src.attrs.items():
                    dst.attrs[key] = value
                m = len(keep_rows)
                for name in ("embeddings",) + COLUMNS:
                    d = src[name]
                    out = dst.create_dataset(name, shape=(m,) + d.shape[1:],
                                             maxshape=(None,) + d.shape[1:], dtype=d.dtype,
                                             chunks=(CHUNK_ROWS,) + d.shape[1:])
                    # Copy in slabs so memory stays bounded for large libraries.
                    step = 1 << 18
                    done = 0
                    for lo in range(0, d.shape[0], step):
                        part = keep_rows[(keep_rows >= lo) & (keep_rows < lo + step)]
                        if len(part):
                            out[done:done + len(part)] = d[lo:lo + step][part - lo]
                            done += len(part)
        except BaseException as exc:
            new.unlink(missing_ok=True)
            self._raise_if_no_space(exc)
            raise
        src.close()
        self._h5 = None
        if self._work is not None:
            self._work.unlink(missing_ok=True)
        self._work = new
        self._h5 = h5py.File(new, "r+", locking=False)
        self._invalidate()


# -- merging -----------------------------------------------------------------------------------

def merge_libraries(sources: Sequence, into, skip_duplicates: bool = True,
                    lock_timeout: float = DEFAULT_LOCK_TIMEOUT, rows_per_step: int = 1 << 16):
    """Append every entry of the libraries ``sources`` (in order) to ``into``, in one write
    session: the target is replaced atomically at the end, or left as it was on any error.

    All libraries must come from the same model; the target is created with the first source's
    model if missing. Exact duplicates (same content hash) are skipped unless
    ``skip_duplicates=False``. Returns the ``AddResult`` summed over the sources.
    """
    from types import SimpleNamespace

    sources = [Path(s) for s in sources]
    if not sources:
        raise LibraryError("library merge: no source libraries given")
    first = EmbeddingLibrary.open(sources[0], "r")
    try:
        model = SimpleNamespace(model_id=first.model_id, metadata=first.model_metadata,
                                embedding_dim=first.embedding_dim)
    finally:
        first.close()
    total = AddResult()
    with EmbeddingLibrary.open(into, "a", model=model, lock_timeout=lock_timeout) as target:
        for src_path in sources:
            if src_path.resolve() == target.path.resolve():
                raise LibraryError(f"library merge: {src_path} is the target itself")
            with EmbeddingLibrary.open(src_path, "r", model=model) as src:
                for lo in range(0, len(src), rows_per_step):
                    rows = np.arange(lo, min(len(src), lo + rows_per_step))
                    cols = {c: src.column(c, rows) for c in STRING_COLUMNS + ("content_hash",)}
                    records = [SimpleNamespace(**{c: cols[c][i] for c in STRING_COLUMNS})
                               for i in range(len(rows))]
                    part = target.add(records, cols["content_hash"].tolist(),
                                      src.embeddings[lo:lo + len(rows)],
                                      skip_duplicates=skip_duplicates, backends=src.backends)
                    total.added += part.added
                    total.duplicates.extend(part.duplicates)
    return total

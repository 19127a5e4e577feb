"""Exceptions and the per-item failure record shared by every part of the engine.

Every error names the file (or library, or checkpoint) it is about and says why, so that a
message can be shown to a user as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

# Exit codes of every command: done; something was found or some items failed; an error
# stopped the command.
EXIT_OK, EXIT_FOUND, EXIT_ERROR = 0, 1, 2


class FingerprintError(Exception):
    """Base class of every error the engine raises on purpose."""


class ImageReadError(FingerprintError):
    """An image file (or DICOM series) could not be read or is not usable."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class CheckpointError(FingerprintError):
    """A model checkpoint is missing, damaged, tampered with or not ours."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ModelMismatchError(FingerprintError):
    """An image or a library does not fit the model (dimensionality, modality, model ID)."""


class LibraryError(FingerprintError):
    """An embedding library is unreadable, of an unknown format, or used wrongly."""


class LibraryLockedError(LibraryError):
    """Another process is writing to the same embedding library."""


@dataclass(frozen=True)
class Failure:
    """One item a batch skipped, with the reason, for the report at the end."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    @classmethod
    def from_exception(cls, path, exc: BaseException) -> "Failure":
        reason = getattr(exc, "reason", None)
        if not reason:
            # Our own errors carry a message meant for users; others need their type.
            reason = str(exc) if isinstance(exc, FingerprintError) else f"{type(exc).__name__}: {exc}"
        return cls(str(path), reason)

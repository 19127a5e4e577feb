"""Helpers of the SubjectFingerprint Slicer module, shared with FingerprintTraining (no torch import here)."""

import importlib
import sys
from typing import Sequence


def reloadLib(package: str, order: Sequence[str]) -> None:
    """Re-import the loaded submodules of ``package``, dependencies first (for the Reload button)."""
    for name in order:
        module = sys.modules.get(f"{package}.{name}")
        if module is not None:
            importlib.reload(module)

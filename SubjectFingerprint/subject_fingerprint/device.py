"""Choosing the compute device from a user's ``--device`` value."""

from __future__ import annotations

import re

_CUDA_SPEC = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(spec="auto"):
    """Return ``(torch.device, notice)`` for ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    ``notice`` is ``None`` or a sentence to show the user when the request could not be
    honoured (no CUDA, no such GPU) and the CPU is used instead; a run never fails just
    because a GPU is missing. Any other value raises ``ValueError``.
    """
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    text = str(spec if spec is not None else "auto").strip().lower()
    if text in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), None
    if text == "cpu":
        return torch.device("cpu"), None
    match = _CUDA_SPEC.match(text)
    if not match:
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        return torch.device("cpu"), "CUDA is not available; using the CPU"
    if match.group(1) is not None:
        index = int(match.group(1))
        count = torch.cuda.device_count()
        if index >= count:
            return torch.device("cpu"), (
                f"there is no GPU cuda:{index} (this machine has {count}); using the CPU")
        return torch.device("cuda", index), None
    return torch.device("cuda"), None

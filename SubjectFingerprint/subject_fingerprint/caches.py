"""Where dependencies keep their caches while a command runs.

matplotlib writes a font cache to ``~/.cache``/``~/.config`` (or ``/tmp``) and TorchInductor
compiles kernels into ``/tmp/torchinductor_<user>``; the project promises to write only where
the user says. So the command line points every such cache at ``$SUBJECT_FINGERPRINT_CACHE``
when it is set (kept between runs), else at a private folder made for the run in the system's
temporary folder and deleted when the command ends (or, if it was killed, by the next run).
Variables the user has set are kept.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

CACHE_VARIABLES = {
    "MPLCONFIGDIR": "matplotlib",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "TRITON_CACHE_DIR": "triton",
    "XDG_CACHE_HOME": "xdg-cache",
    "CUDA_CACHE_PATH": "cuda",
    "PYTORCH_KERNEL_CACHE_PATH": "torch-kernels",
}


_PREFIX = "subject-fingerprint-cache-"


def _remove_orphans() -> None:
    """Folders of runs that were killed (no atexit ran): named by pid, removed once it is gone."""
    tmp = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(tmp) if n.startswith(_PREFIX)]
    except OSError:
        return
    for name in names:
        try:
            pid = int(name[len(_PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
        except (ValueError, OSError, OverflowError):
            continue   # not ours, or alive under another user


def redirect_caches(environ=None) -> str:
    """Point the dependency caches at one folder (see module doc); returns that folder."""
    environ = os.environ if environ is None else environ
    wanted = [name for name in CACHE_VARIABLES if not environ.get(name)]
    root = environ.get("SUBJECT_FINGERPRINT_CACHE", "")
    if not wanted:
        return root
    if root:
        os.makedirs(root, exist_ok=True)
    else:
        _remove_orphans()
        root = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
        atexit.register(shutil.rmtree, root, True)
    for name in wanted:
        path = os.path.join(root, CACHE_VARIABLES[name])
        os.makedirs(path, exist_ok=True)
        environ[name] = path
    return root

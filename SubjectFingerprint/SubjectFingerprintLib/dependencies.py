"""Install what the engine needs, inside Slicer, on first use only.

Never called at import or in ``setup()``: the module must load (and its generic test pass)
in a Slicer without torch. torch comes from the PyTorch extension's ``PyTorchUtils`` (which
picks the right CUDA build and asks first); the rest is installed with Slicer's pip helper
after one confirmation that lists it. Slicer's own SimpleITK is never replaced.
"""

import importlib.util
import logging
from typing import List, Tuple

TORCH_REQUIREMENT = ">=2.2"
# (import name, pip requirement). SimpleITK ships with Slicer and is left alone.
PACKAGES: Tuple[Tuple[str, str], ...] = (
    ("monai", "monai>=1.3"),
    ("scipy", "scipy>=1.9"),
    ("h5py", "h5py>=3.8"),
    ("pydicom", "pydicom>=2.4"),
    ("PIL", "pillow>=9"),
    ("tqdm", "tqdm>=4.60"),
    ("psutil", "psutil>=5.9"),
    ("pylibjpeg", "pylibjpeg>=2"),
    ("libjpeg", "pylibjpeg-libjpeg>=2"),
    ("openjpeg", "pylibjpeg-openjpeg>=2"),
)
TRAINING_PACKAGES: Tuple[Tuple[str, str], ...] = (
    ("sklearn", "scikit-learn>=1.2"),
    ("matplotlib", "matplotlib>=3.6"),
    ("pytorch_metric_learning", "pytorch-metric-learning>=2.0"),
)


class DependencyError(RuntimeError):
    """The user declined an installation, or it failed."""


def missingPackages(training: bool = False) -> List[str]:
    """pip requirements whose import name is not importable now."""
    wanted = PACKAGES + (TRAINING_PACKAGES if training else ())
    return [req for name, req in wanted if importlib.util.find_spec(name) is None]


def torchAvailable() -> bool:
    return importlib.util.find_spec("torch") is not None


def ensureDependencies(training: bool = False, interactive: bool = True) -> None:
    """Make torch and the engine's packages importable, asking the user first.

    Raises ``DependencyError`` when the user says no or an install fails. Outside Slicer
    (plain Python, tests) it only checks and raises with the list of what is missing.
    """
    missing = missingPackages(training)
    needTorch = not torchAvailable()
    if not missing and not needTorch:
        return
    try:
        import slicer
    except ImportError:
        slicer = None
    if slicer is None or not hasattr(slicer, "app"):
        what = (["torch"] if needTorch else []) + missing
        raise DependencyError("missing Python packages: " + ", ".join(what) +
                              " (install them in this Python, e.g. with pip)")

    if needTorch:
        try:
            import PyTorchUtils
        except ImportError as exc:
            raise DependencyError("this module needs the PyTorch extension: install 'PyTorch' from the "
                                  "Extensions Manager, restart Slicer and try again") from exc
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torch = torchLogic.installTorch(askConfirmation=interactive, torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                raise DependencyError("PyTorch is required; it was not installed")

    if missing:
        message = ("SubjectFingerprint needs these Python packages, which are not installed yet:\n\n  "
                   + "\n  ".join(missing) + "\n\nInstall them now? This can take a few minutes.")
        if interactive and not slicer.app.testingEnabled():
            if not slicer.util.confirmOkCancelDisplay(message, "SubjectFingerprint: install packages"):
                raise DependencyError("installation declined; the module cannot run without: " + ", ".join(missing))
        logging.info("Installing %s", ", ".join(missing))
        slicer.util.pip_install(missing)
        importlib.invalidate_caches()
        still = missingPackages(training)
        if still:
            raise DependencyError("could not install: " + ", ".join(still) + "; see the Python console")


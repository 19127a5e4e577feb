"""Install what the modules need, inside Slicer, on first use only, as Slicer's packaging guide says.

Never called at import or in ``setup()``: the modules load (and their generic tests pass) in a
Slicer without torch. torch comes only through the PyTorch extension's ``PyTorchUtils`` (it
picks the CUDA build); its version is checked. The other packages are installed with pip after
one confirmation that lists everything, with the installed torch and SimpleITK pinned by a
constraints file (numpy too) so that no dependency can replace them (Slicer's SimpleITK has
Slicer's IO).
``slicer.packaging.pip_install`` is used where the Slicer has it (5.12+), else
``slicer.util.pip_install``. In testing mode nothing is installed.
"""

import importlib.util
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

REQUESTER = "SubjectFingerprint"
TORCH_MINIMUM = "2.3"  # torch.amp.GradScaler("cuda") and torch.amp.autocast("cuda") need 2.3
NEVER_INSTALL = ("torch", "SimpleITK", "numpy")  # the PyTorch extension's and Slicer's own: pinned


@dataclass(frozen=True)
class Package:
    """A package a module needs: what to import, its pip name and its minimum version."""

    importName: str
    distribution: str
    minimum: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}>={self.minimum}"


# What the SubjectFingerprint module's actions import (find, add, build a library, check
# datasets: the dedup report draws with matplotlib).
ENGINE_PACKAGES: Tuple[Package, ...] = (
    Package("monai", "monai", "1.3"),
    Package("scipy", "scipy", "1.9"),
    Package("h5py", "h5py", "3.8"),
    Package("pydicom", "pydicom", "2.4"),
    Package("PIL", "pillow", "9.0"),
    Package("tqdm", "tqdm", "4.60"),
    Package("psutil", "psutil", "5.9"),
    Package("filelock", "filelock", "3.13"),  # the library writer lock
    Package("matplotlib", "matplotlib", "3.6"),
    Package("pylibjpeg", "pylibjpeg", "2.0"),
    Package("libjpeg", "pylibjpeg-libjpeg", "2.1"),
    Package("openjpeg", "pylibjpeg-openjpeg", "2.3"),
)
# FingerprintTraining adds: splits and metrics (scikit-learn), evaluate --baselines (scikit-image).
TRAINING_PACKAGES: Tuple[Package, ...] = ENGINE_PACKAGES + (
    Package("sklearn", "scikit-learn", "1.2"),
    Package("skimage", "scikit-image", "0.21"),
    Package("pytorch_metric_learning", "pytorch-metric-learning", "2.0"),
)
# Shipped with Slicer: checked, never installed or replaced here.
SLICER_PACKAGES: Tuple[Package, ...] = (Package("SimpleITK", "SimpleITK", "2.2"), Package("numpy", "numpy", "1.23"))


class DependencyError(RuntimeError):
    """A package is missing or too old and was not installed (declined, testing mode, failure)."""


def versionTuple(version: str) -> Tuple[int, ...]:
    """The numeric release of a version string: "2.13.0+cpu" -> (2, 13, 0), "1.5rc1" -> (1, 5)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(version))
    if not match:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(p) for p in match.group(1).split("."))


def versionAtLeast(version: str, minimum: str) -> bool:
    have, need = versionTuple(version), versionTuple(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def installedVersion(package: Package) -> Optional[str]:
    """The installed version, "" when importable but without metadata, None when not installed."""
    if importlib.util.find_spec(package.importName) is None:
        return None
    from importlib import metadata

    try:
        return metadata.version(package.distribution)
    except metadata.PackageNotFoundError:
        return ""  # e.g. a package put on sys.path by hand: accepted, it cannot be checked


def problems(packages: Sequence[Package]) -> List[Tuple[Package, Optional[str]]]:
    """``(package, installed version or None)`` for each package missing or older than its minimum."""
    out = []
    for package in packages:
        version = installedVersion(package)
        if version is None or (version and not versionAtLeast(version, package.minimum)):
            out.append((package, version))
    return out


def describe(found: Sequence[Tuple[Package, Optional[str]]]) -> List[str]:
    return [package.requirement + ("" if version is None else f" (installed: {version})")
            for package, version in found]


def torchVersion() -> Optional[str]:
    """The installed torch's version without importing it, or None."""
    return installedVersion(Package("torch", "torch", TORCH_MINIMUM))


def torchProblem() -> Optional[str]:
    """None when torch is there and new enough, else what is wrong with it."""
    version = torchVersion()
    if version is None:
        return "torch is not installed"
    if version and not versionAtLeast(version, TORCH_MINIMUM):
        return (f"PyTorch {version} is installed; this module needs torch>={TORCH_MINIMUM}. Use the "
                f"'PyTorch Utils' module to install it with the version requirement >={TORCH_MINIMUM}, "
                "then restart Slicer")
    return None


def torchAvailable() -> bool:
    return torchVersion() is not None


def constraintsText() -> str:
    """pip constraints that keep the installed torch, SimpleITK and numpy exactly as they are."""
    lines = []
    for name in NEVER_INSTALL:
        version = installedVersion(Package(name, name, "0"))
        if version:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + ("\n" if lines else "")


def pipInstall(requirements: Sequence[str]) -> None:
    """pip install ``requirements`` with torch, SimpleITK and numpy pinned (slicer.packaging where it exists)."""
    import slicer

    try:
        import slicer.packaging as packaging  # Slicer 5.12+
    except ImportError:
        packaging = None

    handle, constraints = tempfile.mkstemp(prefix="subjectfingerprint-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w") as f:
            f.write(constraintsText())
        if packaging is not None and hasattr(packaging, "pip_install"):
            packaging.pip_install(list(requirements), constraints=constraints, requester=REQUESTER)
        else:  # Slicer 5.8 / 5.10
            slicer.util.pip_install(["-c", constraints, *requirements])
    finally:
        os.remove(constraints)


def ensureDependencies(training: bool = False, interactive: bool = True) -> None:
    """Make torch and the module's packages importable at their minimum versions.

    One confirmation lists everything that will be installed. Raises ``DependencyError`` when
    the user says no, in testing mode, outside Slicer's application (where it only reports),
    when Slicer's own SimpleITK is too old, or when an install fails.
    """
    packages = TRAINING_PACKAGES if training else ENGINE_PACKAGES
    found = problems(packages)
    torchIssue = torchProblem()
    slicerIssue = problems(SLICER_PACKAGES)
    if slicerIssue:
        raise DependencyError("this Slicer's " + ", ".join(describe(slicerIssue)) +
                              " is too old for this module; use Slicer 5.8 or later")
    if not found and torchIssue is None:
        return
    needTorch = torchIssue == "torch is not installed"
    if torchIssue and not needTorch:
        raise DependencyError(torchIssue)  # never replaced behind the user's back
    what = (["torch>=" + TORCH_MINIMUM + " (through the PyTorch extension)"] if needTorch else []) + describe(found)

    try:
        import slicer
    except ImportError:
        slicer = None
    if slicer is None or not hasattr(slicer, "app"):
        raise DependencyError("missing or too old Python packages: " + ", ".join(what) +
                              " (install them in this Python, e.g. with pip)")
    if slicer.app.testingEnabled():
        raise DependencyError("testing mode installs nothing; missing: " + ", ".join(what))
    torchLogic = None
    if needTorch:
        try:
            import PyTorchUtils
        except ImportError as exc:
            raise DependencyError("this module needs the PyTorch extension: install 'PyTorch' from the "
                                  "Extensions Manager, restart Slicer and try again") from exc
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if interactive:
        message = (REQUESTER + " needs these Python packages, which are missing or too old:\n\n  "
                   + "\n  ".join(what) + "\n\nInstall them now? This can take several minutes.")
        if not slicer.util.confirmOkCancelDisplay(message, REQUESTER + ": install packages"):
            raise DependencyError("installation declined; the module cannot run without: " + ", ".join(what))
    if torchLogic is not None:
        # Already confirmed above: PyTorchUtils must not ask a second time.
        if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=">=" + TORCH_MINIMUM) is None:
            raise DependencyError("PyTorch is required; it was not installed")
        issue = torchProblem()
        if issue:
            raise DependencyError(issue)
    if found:
        requirements = [package.requirement for package, _ in found
                        if package.distribution not in NEVER_INSTALL]  # (none are: a guard)
        logging.info("Installing %s", ", ".join(requirements))
        try:
            pipInstall(requirements)
        except Exception as exc:  # pip failed, e.g. a package that would need another torch
            raise DependencyError("pip could not install " + ", ".join(requirements) + f" ({exc}); torch, "
                                  "SimpleITK and numpy are kept at their installed versions, see the "
                                  "Python console") from exc
        importlib.invalidate_caches()
        still = problems(packages)
        if still:
            raise DependencyError("could not install: " + ", ".join(describe(still)) + "; see the Python console")

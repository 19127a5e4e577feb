"""Run the Slicer modules' Logic against the real MRML classes of the ``slicer-core`` wheel.

slicer-core has Slicer's MRML scene and node classes and ``slicer.util``, but no application,
no Qt and no scripted-module base classes. This harness adds only what the module files need
to import: a scene (``slicer.mrmlScene``), tiny stand-ins for the four ScriptedLoadableModule
base classes and for ``slicer.parameterNodeWrapper``. Nothing else is faked: volumes are read
by Slicer's own storage nodes into real vtkMRMLScalarVolumeNodes.
"""

import importlib
import sys
import types
from pathlib import Path

import slicer

REPO = Path(__file__).resolve().parents[2]
MODULE_DIRS = [REPO / "SubjectFingerprint", REPO / "FingerprintTraining"]
SCRIPTS_DIR = REPO / "SubjectFingerprint" / "Resources" / "Scripts"


class ScriptedLoadableModule:
    def __init__(self, parent=None):
        self.parent = parent if parent is not None else types.SimpleNamespace()


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        pass

    def getParameterNode(self):
        return None


class ScriptedLoadableModuleTest:
    pass


def parameterNodeWrapper(cls):
    """Stand-in: the wrapped class only gets its defaults (no MRML binding, no GUI)."""

    def __init__(self, node=None):
        for name in getattr(cls, "__annotations__", {}):
            setattr(self, name, getattr(cls, name, None))

    cls.__init__ = __init__
    return cls


class Choice:
    def __init__(self, choices):
        self.choices = choices


class WithinRange:
    def __init__(self, low, high):
        self.low, self.high = low, high


def install() -> None:
    """Add the stand-ins (once) and the module folders to ``sys.path``."""
    if "slicer.ScriptedLoadableModule" not in sys.modules:
        base = types.ModuleType("slicer.ScriptedLoadableModule")
        for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                    ScriptedLoadableModuleTest):
            setattr(base, cls.__name__, cls)
        sys.modules[base.__name__] = base
        slicer.ScriptedLoadableModule = base
    if "slicer.parameterNodeWrapper" not in sys.modules:
        pnw = types.ModuleType("slicer.parameterNodeWrapper")
        pnw.parameterNodeWrapper, pnw.Choice, pnw.WithinRange = parameterNodeWrapper, Choice, WithinRange
        sys.modules[pnw.__name__] = pnw
        slicer.parameterNodeWrapper = pnw
    for folder in MODULE_DIRS + [SCRIPTS_DIR]:
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    new_scene()


def new_scene():
    """A fresh, real MRML scene as ``slicer.mrmlScene`` (what Slicer's application provides)."""
    slicer.mrmlScene = slicer.vtkMRMLScene()
    return slicer.mrmlScene


def import_module(name: str):
    """Import (or re-import) a module file after ``install()``."""
    install()
    if name in sys.modules:
        return importlib.reload(sys.modules[name])
    return importlib.import_module(name)

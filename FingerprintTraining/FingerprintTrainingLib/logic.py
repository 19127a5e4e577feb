"""FingerprintTrainingLogic: train and evaluate in a separate process (the engine's command line
under PythonSlicer), from the panel, from scripts and in Slicer's batch mode
(``Slicer --no-main-window --python-script``). No torch or training import at module scope.
"""

import json
import os
from typing import Annotated, Callable, List, Optional, Sequence

from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from SubjectFingerprintLib.process import CANCELLED, OK, EngineRunnerMixin, failureMessage, runOutcome

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4
    def _(text):
        return text


@parameterNodeWrapper
class FingerprintTrainingParameterNode:
    """Training settings bound to the panel; saved with the scene, paths included."""

    dims: Annotated[str, Choice(["2", "3"])] = "2"
    depth: Annotated[str, Choice(["18", "34", "50", "101"])] = "50"
    steps: Annotated[int, WithinRange(1, 1000000)] = 2000
    batchSubjects: Annotated[int, WithinRange(2, 4096)] = 32
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    sourcePath: str = ""
    manifestPath: str = ""
    splitPath: str = ""
    outputPath: str = ""


class FingerprintTrainingLogic(EngineRunnerMixin, ScriptedLoadableModuleLogic):
    """Train and evaluate in a separate process; usable from scripts and batch mode.

    Example (batch mode)::

        import FingerprintTraining
        logic = FingerprintTraining.FingerprintTrainingLogic()
        run = logic.train("/data/cxr", "/runs/r1", split="/data/split.json", dims=2, depth=18, steps=500)
        print(logic.finishBackground(run))   # {'best': '/runs/r1/best.pt', ...}
    """

    commandModule = "fingerprint_training"  # train/evaluate are the training package's commands

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.process = None
        self.logCallback: Optional[Callable[[str], None]] = None

    def getParameterNode(self):
        return FingerprintTrainingParameterNode(super().getParameterNode())

    @staticmethod
    def ensureDependencies(interactive: bool = True) -> None:
        """torch through the PyTorch extension, then the training packages, on first use only."""
        from SubjectFingerprintLib.dependencies import ensureDependencies

        ensureDependencies(training=True, interactive=interactive)

    def train(self, source: str, outDir: str, split: Optional[str] = None, manifest: Optional[str] = None,
              dims: int = 2, depth: int = 50, steps: int = 2000, batchSubjects: int = 32, device: str = "auto",
              extraArguments: Sequence[str] = (), waitForCompletion: bool = True,
              onLog: Optional[Callable] = None, onProgress: Optional[Callable] = None):
        """Train a model on ``source`` (folder, manifest folder or DICOM export) into ``outDir``.

        ``extraArguments`` are passed on to ``fingerprint_training train`` (e.g. ``["--size", "64", "64"]``,
        ``["--resume"]``). Returns the BackgroundProcess; with ``waitForCompletion`` it blocks
        and raises on failure, and ``finishBackground(process)`` gives the run's summary.
        """
        if not source or not os.path.exists(source):
            raise ValueError(_("{path}: no such folder").format(path=source))
        if not outDir:
            raise ValueError(_("Choose an output folder for the run."))
        if int(dims) not in (2, 3):
            raise ValueError(_("dims must be 2 or 3"))
        arguments = ["train", source, "--out", outDir, "--dims", int(dims), "--depth", int(depth),
                     "--steps", int(steps), "--batch-subjects", int(batchSubjects), "--device", device]
        if split:
            arguments += ["--split", split]
        if manifest:
            arguments += ["--manifest", manifest]
        arguments += list(extraArguments)
        process = self._start(arguments, waitForCompletion, onLog, onProgress, kind="train", outDir=outDir)
        return process

    def evaluate(self, source: str, modelPath: str, split: str, outDir: str, manifest: Optional[str] = None,
                 device: str = "auto", extraArguments: Sequence[str] = (), waitForCompletion: bool = True,
                 onLog: Optional[Callable] = None, onProgress: Optional[Callable] = None):
        """Evaluate ``modelPath`` on the split's test subjects; writes metrics.json and results.md in ``outDir``."""
        if not modelPath or not os.path.isfile(modelPath):
            raise ValueError(_("{path}: no such checkpoint").format(path=modelPath))
        if not split or not os.path.isfile(split):
            raise ValueError(_("Evaluation needs a split file (train/val/test subjects)."))
        arguments = ["evaluate", source, "--model", modelPath, "--split", split, "--out", outDir, "--device", device]
        if manifest:
            arguments += ["--manifest", manifest]
        arguments += list(extraArguments)
        process = self._start(arguments, waitForCompletion, onLog, onProgress, kind="evaluate", outDir=outDir)
        return process

    @staticmethod
    def bestCheckpoint(outDir: str) -> str:
        """The run's best checkpoint (best.pt), else its last one (last.pt)."""
        for name in ("best.pt", "last.pt"):
            path = os.path.join(outDir, name)
            if os.path.isfile(path):
                return path
        raise ValueError(_("{path}: no checkpoint yet; train first").format(path=outDir))

    def finishBackground(self, process) -> dict:
        """Summary of a finished run (the JSON the tool printed, plus "message"); raises on failure."""
        from subject_fingerprint.errors import FingerprintError

        outcome = runOutcome(getattr(process, "kind", ""), process.returncode, process.cancelled, process.lines)
        if outcome == CANCELLED:
            return {"cancelled": True, "message": _("Cancelled.")}
        if outcome != OK:  # train and evaluate have no "done with warnings" exit code
            raise FingerprintError(_("the run failed (exit code {code}): {message}").format(
                code=process.returncode, message=failureMessage(process)))
        summary = _lastJsonObject(process.lines)
        kind = getattr(process, "kind", "")
        if kind == "evaluate":
            metrics = os.path.join(process.outDir, "metrics.json")
            summary.setdefault("metrics", metrics if os.path.isfile(metrics) else None)
        summary["message"] = _("Done; results in {path}").format(path=getattr(process, "outDir", ""))
        return summary


def _lastJsonObject(lines: List[str]) -> dict:
    """The last JSON object printed by the tool (it may span several lines)."""
    text = "\n".join(lines)
    end = text.rfind("}")
    while end >= 0:
        start = text.rfind("{", 0, end)
        while start >= 0:
            try:
                value = json.loads(text[start:end + 1])
                if isinstance(value, dict):
                    return value
            except ValueError:
                pass
            start = text.rfind("{", 0, start)
        end = text.rfind("}", 0, end)
    return {}

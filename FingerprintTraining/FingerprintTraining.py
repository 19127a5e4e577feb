"""FingerprintTraining: train and evaluate fingerprint models from Slicer, out of process.

Training runs in a separate ``PythonSlicer`` process (``python -m fingerprint_training train``),
so a crash or an out-of-memory cannot take Slicer down and Cancel is immediate (a kill).
The Logic is the scripting API: it works in Slicer's batch mode
(``Slicer --no-main-window --python-script ...``) and from ``PythonSlicer``.
No torch or training import at module scope.
"""

import json
import logging
import os
from typing import Annotated, Callable, List, Optional, Sequence

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin

# Standard library only: safe to import in a Slicer without torch.
from SubjectFingerprintLib.process import EngineRunnerMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4
    def _(text):
        return text

SETTINGS_PREFIX = "FingerprintTraining/"


class FingerprintTraining(ScriptedLoadableModule):
    """Module description."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Fingerprint Training")
        self.parent.categories = [_("Utilities")]
        self.parent.dependencies = ["SubjectFingerprint"]  # shares its process runner
        self.parent.contributors = ["SubjectFingerprint contributors"]
        self.parent.helpText = _(
            "Train a subject-fingerprint model (ResNet embedding, triplet loss with the paper's mining) on "
            "a folder of images grouped by subject, then evaluate it on held-out subjects. Training runs in "
            "a separate process: Slicer stays responsive and <b>Cancel</b> stops it at once. The run folder "
            "receives best.pt / last.pt checkpoints usable in the Subject Fingerprint module.")
        self.parent.acknowledgementText = _("Uses PyTorch and MONAI.")


@parameterNodeWrapper
class FingerprintTrainingParameterNode:
    """Training settings bound to the panel (paths live in the widgets and QSettings)."""

    dims: Annotated[str, Choice(["2", "3"])] = "2"
    depth: Annotated[str, Choice(["18", "34", "50", "101"])] = "50"
    steps: Annotated[int, WithinRange(1, 1000000)] = 2000
    batchSubjects: Annotated[int, WithinRange(2, 4096)] = 32
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"


class FingerprintTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """A small panel over FingerprintTrainingLogic: Train / Evaluate turn into Cancel while running."""

    PATH_WIDGETS = ("sourcePathLineEdit", "manifestPathLineEdit", "splitPathLineEdit", "outputPathLineEdit")

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = None
        self._timer = None

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FingerprintTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FingerprintTrainingLogic()

        settings = qt.QSettings()
        for name in self.PATH_WIDGETS:
            widget = getattr(self.ui, name)
            widget.currentPath = settings.value(SETTINGS_PREFIX + name, "")
            widget.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.evaluateButton.connect("clicked(bool)", self.onEvaluate)
        self.ui.progressBar.setVisible(False)
        self.ui.logTextEdit.maximumBlockCount = 5000  # a long run must not slow the panel down
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self._updateButtons()

    def cleanup(self) -> None:
        if self.logic is not None:
            self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = self.logic.getParameterNode()
        self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def onPathsChanged(self, _path=None) -> None:
        import qt

        settings = qt.QSettings()
        for name in self.PATH_WIDGETS:
            settings.setValue(SETTINGS_PREFIX + name, getattr(self.ui, name).currentPath)
        self._updateButtons()

    def _updateButtons(self) -> None:
        source = self.ui.sourcePathLineEdit.currentPath
        out = self.ui.outputPathLineEdit.currentPath
        split = self.ui.splitPathLineEdit.currentPath
        for button, ready in ((self.ui.trainButton, bool(source and out)),
                              (self.ui.evaluateButton, bool(source and out and split))):
            button.enabled = (self._running is not None and self._running[0] is button) or (
                ready and self._running is None)
        self.ui.evaluateButton.toolTip = (_("Evaluate the run's best checkpoint on the split's test subjects.")
                                          if split else _("Evaluation needs a split file."))

    def appendLog(self, text: str) -> None:
        """Append to the log box (bounded by its maximumBlockCount, set in setup)."""
        if not hasattr(self, "ui"):
            return
        self.ui.logTextEdit.appendPlainText(text)

    def _onProgress(self, done: int, total: int) -> None:
        self.ui.progressBar.setRange(0, max(total, 1))
        self.ui.progressBar.setValue(done)

    def _start(self, button, start: Callable) -> None:
        import qt

        if self._running is not None:
            if self._running[0] is button:
                self.appendLog(_("Cancelling..."))
                self.logic.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start."), waitCursor=True):
            self.logic.ensureDependencies()
            notice = self.logic.deviceNotice(self._parameterNode.device)
            self.ui.statusLabel.text = notice or ""
            if notice:
                self.appendLog(notice)
            process = start()
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.setRange(0, 0)
            self._running = (button, button.text, process)
            button.text = _("Cancel")
            self._timer = qt.QTimer()
            self._timer.setInterval(250)
            self._timer.connect("timeout()", self._poll)
            self._timer.start()
        self._updateButtons()

    def _poll(self) -> None:
        if self._running is None:
            return
        button, text, process = self._running
        if process.poll():
            return
        self._timer.stop()
        self._running = None
        button.text = text
        self.ui.progressBar.setVisible(False)
        with slicer.util.tryWithErrorDisplay(_("The run failed."), waitCursor=False):
            summary = self.logic.finishBackground(process)
            self.ui.statusLabel.text = summary.get("message", "")
            self.appendLog(json.dumps(summary, indent=1))
        self._updateButtons()

    def onTrain(self) -> None:
        p = self._parameterNode
        self._start(self.ui.trainButton, lambda: self.logic.train(
            self.ui.sourcePathLineEdit.currentPath, self.ui.outputPathLineEdit.currentPath,
            split=self.ui.splitPathLineEdit.currentPath or None, manifest=self.ui.manifestPathLineEdit.currentPath or None,
            dims=int(p.dims), depth=int(p.depth), steps=p.steps, batchSubjects=p.batchSubjects, device=p.device,
            waitForCompletion=False, onLog=self.appendLog, onProgress=self._onProgress))

    def onEvaluate(self) -> None:
        out = self.ui.outputPathLineEdit.currentPath
        self._start(self.ui.evaluateButton, lambda: self.logic.evaluate(
            self.ui.sourcePathLineEdit.currentPath, self.logic.bestCheckpoint(out),
            self.ui.splitPathLineEdit.currentPath, os.path.join(out, "evaluation"),
            manifest=self.ui.manifestPathLineEdit.currentPath or None, device=self._parameterNode.device,
            waitForCompletion=False, onLog=self.appendLog, onProgress=self._onProgress))


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

        if process.cancelled:
            return {"cancelled": True, "message": _("Cancelled.")}
        if process.returncode != 0:
            errors = [line for line in process.lines if line.startswith("error:")]
            message = errors[-1][len("error:"):].strip() if errors else (process.lines[-1] if process.lines else "")
            raise FingerprintError(_("the run failed (exit code {code}): {message}").format(
                code=process.returncode, message=message))
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


class FingerprintTrainingTest(ScriptedLoadableModuleTest):
    """Runs in a real Slicer: a few training steps on synthetic images (skipped without torch)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_TrainFewSteps()

    def test_TrainFewSteps(self):
        import importlib.util
        import tempfile

        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("monai") is None:
            self.delayDisplay("torch/MONAI not installed: training test skipped")
            return
        import numpy as np

        self.delayDisplay("Train a tiny model for a few steps")
        tmp = tempfile.mkdtemp()
        rng = np.random.default_rng(0)
        for s in range(4):
            base = rng.random((40, 40)) * 3000
            for v in range(2):
                os.makedirs(os.path.join(tmp, "images", f"s{s}"), exist_ok=True)
                node = slicer.util.addVolumeFromArray((base + rng.random((40, 40)) * 100)[np.newaxis].astype(np.int16))
                slicer.util.saveNode(node, os.path.join(tmp, "images", f"s{s}", f"{v}.nrrd"))
        logic = FingerprintTrainingLogic()
        process = logic.train(os.path.join(tmp, "images"), os.path.join(tmp, "run"), dims=2, depth=18, steps=2,
                              batchSubjects=2, device="cpu", extraArguments=["--size", "32", "32"])
        self.assertEqual(process.returncode, 0)
        self.assertTrue(os.path.isfile(logic.bestCheckpoint(os.path.join(tmp, "run"))))
        self.delayDisplay("Test passed")

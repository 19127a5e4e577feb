"""The FingerprintTraining panel: Train / Evaluate turn into Cancel while their run goes on."""

import json
import os

import slicer
from slicer.util import VTKObservationMixin

from FingerprintTrainingLib.logic import FingerprintTrainingLogic
from SubjectFingerprintLib.pathparameters import PathParametersWidgetMixin
from SubjectFingerprintLib.process import BackgroundRunWidgetMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4
    def _(text):
        return text

# Every widget of the .ui this code uses, with the class it expects (checked by test_slicer_static).
UI_WIDGETS = {
    "sourcePathLineEdit": "ctkPathLineEdit",
    "manifestPathLineEdit": "ctkPathLineEdit",
    "splitPathLineEdit": "ctkPathLineEdit",
    "outputPathLineEdit": "ctkPathLineEdit",
    "trainButton": "QPushButton",
    "evaluateButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "logTextEdit": "QPlainTextEdit",
}


class FingerprintTrainingPanel(BackgroundRunWidgetMixin, PathParametersWidgetMixin, VTKObservationMixin):
    """What the module's widget shows. ``isEntered()`` says whether the module is on screen."""

    SETTINGS_PREFIX = "FingerprintTraining/"
    # path line edit -> parameter (saved with the scene, remembered in QSettings)
    PATH_PARAMETERS = {"sourcePathLineEdit": "sourcePath", "manifestPathLineEdit": "manifestPath",
                       "splitPathLineEdit": "splitPath", "outputPathLineEdit": "outputPath"}

    def __init__(self, uiPath: str, isEntered=lambda: True) -> None:
        VTKObservationMixin.__init__(self)
        self.isEntered = isEntered
        self.uiWidget = slicer.util.loadUI(uiPath)
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        self.uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FingerprintTrainingLogic()
        self.logic.logCallback = self.appendLog
        self.ui.sourcePathLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.manifestPathLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.splitPathLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.outputPathLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.evaluateButton.connect("clicked(bool)", self.onEvaluate)
        self.ui.progressBar.setVisible(False)
        self.ui.logTextEdit.maximumBlockCount = 5000  # a long run must not slow the panel down
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    # -- lifecycle ------------------------------------------------------------------------------
    def cleanup(self) -> None:
        self.cleanupBackground()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.isEntered():
            self.initializeParameterNode()

    # -- state ------------------------------------------------------------------------------------
    def _updateButtons(self, caller=None, event=None) -> None:
        source = self.ui.sourcePathLineEdit.currentPath
        out = self.ui.outputPathLineEdit.currentPath
        split = self.ui.splitPathLineEdit.currentPath
        for button, ready in ((self.ui.trainButton, bool(source and out)),
                              (self.ui.evaluateButton, bool(source and out and split))):
            button.enabled = self.isRunButton(button) or (ready and not self.busy)
        self.ui.evaluateButton.toolTip = (_("Evaluate the run's best checkpoint on the split's test subjects.")
                                          if split else _("Evaluation needs a split file."))

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def _prepare(self) -> None:
        self.logic.ensureDependencies()
        self.ui.statusLabel.text = self.logic.deviceNotice(self._parameterNode.device) or ""

    def _showSummary(self, run, summary) -> None:
        self.appendLog(json.dumps({k: v for k, v in summary.items() if k != "message"}, indent=1))

    # -- runs ---------------------------------------------------------------------------------------
    def onTrain(self) -> None:
        p = self._parameterNode
        self.startBackground(self.ui.trainButton, lambda: self.logic.train(
            p.sourcePath, p.outputPath, split=p.splitPath or None, manifest=p.manifestPath or None,
            dims=int(p.dims), depth=int(p.depth), steps=p.steps, batchSubjects=p.batchSubjects, device=p.device,
            waitForCompletion=False, onLog=self.appendLog, onProgress=self.onProgress),
            onDone=self._showSummary, prepare=self._prepare)

    def onEvaluate(self) -> None:
        p = self._parameterNode
        self.startBackground(self.ui.evaluateButton, lambda: self.logic.evaluate(
            p.sourcePath, self.logic.bestCheckpoint(p.outputPath), p.splitPath,
            os.path.join(p.outputPath, "evaluation"), manifest=p.manifestPath or None, device=p.device,
            waitForCompletion=False, onLog=self.appendLog, onProgress=self.onProgress),
            onDone=self._showSummary, prepare=self._prepare)

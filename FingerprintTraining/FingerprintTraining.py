"""FingerprintTraining: train and evaluate fingerprint models from Slicer, out of process.

A thin module file over FingerprintTrainingLib (its Logic and panel) and the SubjectFingerprintLib
helpers both modules share. Training runs in a separate ``PythonSlicer`` process running the
engine's command line, so a crash or an out-of-memory cannot take Slicer down and Cancel is
immediate. No torch or training import at module scope.
"""

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)

from FingerprintTrainingLib.logic import FingerprintTrainingLogic, FingerprintTrainingParameterNode  # noqa: F401

try:
    from slicer.i18n import tr as _, translate
except ImportError:  # Slicer before 5.4
    def _(text):
        return text

    def translate(context, text):
        return text

DOCUMENTATION_URL = ("https://github.com/SubjectFingerprint/SlicerSubjectFingerprint"
                     "#fingerprinttraining-module-headless-training")


class FingerprintTraining(ScriptedLoadableModule):
    """Module description."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Fingerprint Training")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Utilities")]
        self.parent.dependencies = ["SubjectFingerprint"]  # shares its Lib (process runner, installer)
        self.parent.contributors = ["SubjectFingerprint developers (https://github.com/SubjectFingerprint)"]
        self.parent.helpText = _(
            "Train a subject-fingerprint model (ResNet embedding, triplet loss with the paper's mining) on "
            "a folder of images grouped by subject, then evaluate it on held-out subjects. Training runs in "
            "a separate process: Slicer stays responsive and <b>Cancel</b> stops it at once. The run folder "
            "receives best.pt / last.pt checkpoints usable in the Subject Fingerprint module.")
        self.parent.helpText += "<p>" + _('See the <a href="{url}">documentation</a>.').format(
            url=DOCUMENTATION_URL) + "</p>"
        self.parent.acknowledgementText = _(
            "Based on few-shot fingerprinting of medical images with deep metric learning. Uses PyTorch "
            "(through the PyTorch extension), MONAI, scikit-learn, scikit-image and matplotlib.")


class FingerprintTrainingWidget(ScriptedLoadableModuleWidget):
    """Hosts FingerprintTrainingLib's panel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.panel = None
        self.logic = None

    def setup(self) -> None:
        from FingerprintTrainingLib.widget import FingerprintTrainingPanel

        ScriptedLoadableModuleWidget.setup(self)
        self.panel = FingerprintTrainingPanel(self.resourcePath("UI/FingerprintTraining.ui"),
                                              isEntered=lambda: self.parent.isEntered)
        self.layout.addWidget(self.panel.uiWidget)
        self.logic = self.panel.logic

    def cleanup(self) -> None:
        if self.panel is not None:
            self.panel.cleanup()

    def enter(self) -> None:
        self.panel.enter()

    def exit(self) -> None:
        self.panel.exit()

    def onReload(self) -> None:
        from SubjectFingerprintLib import reloadLib

        reloadLib("FingerprintTrainingLib", ("logic", "widget", "selftest"))
        ScriptedLoadableModuleWidget.onReload(self)


class FingerprintTrainingTest(ScriptedLoadableModuleTest):
    """Runs FingerprintTrainingLib's tests in a real Slicer."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from FingerprintTrainingLib.selftest import TESTS

        for test in TESTS:
            self.setUp()
            self.delayDisplay(test.__doc__.splitlines()[0])
            test(self)
        self.delayDisplay("Test passed")

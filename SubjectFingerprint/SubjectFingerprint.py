"""SubjectFingerprint: find which subject an image belongs to, inside 3D Slicer.

A thin module file over SubjectFingerprintLib (as SlicerNNUNet is over its Lib): the module
description, a widget that hosts the Lib's panel, and a test that runs the Lib's tests. Nothing
here or in the Lib imports torch, MONAI or the engine at module scope, so the module loads in
a Slicer without PyTorch.
"""

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)

from SubjectFingerprintLib.logic import SubjectFingerprintLogic, SubjectFingerprintParameterNode  # noqa: F401 (scripts)

try:
    from slicer.i18n import tr as _, translate
except ImportError:  # Slicer before 5.4
    def _(text):
        return text

    def translate(context, text):
        return text

DOCUMENTATION_URL = "https://github.com/SubjectFingerprint/SlicerSubjectFingerprint#readme"


class SubjectFingerprint(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and help."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Subject Fingerprint")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Utilities")]
        self.parent.dependencies = []
        self.parent.contributors = ["SubjectFingerprint developers (https://github.com/SubjectFingerprint)"]
        self.parent.helpText = _(
            "Find which subject an X-ray or MRI belongs to. Select a volume, a fingerprint model and an "
            "embedding library, then <b>Find matches</b>: the library's subjects are ranked by how close "
            "their images are to the selected one, with a same-subject probability when the model is "
            "calibrated. Click a row to compare the candidate with the query side by side. "
            "<b>Add to library</b> stores the selected volume under a subject ID; "
            "<b>Build library from folder</b> indexes a folder or a DICOM export in the background; "
            "<b>Check datasets for shared subjects</b> compares two or more datasets and writes an HTML report.")
        self.parent.helpText += "<p>" + _('See the <a href="{url}">documentation</a>.').format(
            url=DOCUMENTATION_URL) + "</p>"
        self.parent.acknowledgementText = _(
            "Based on few-shot fingerprinting of medical images with deep metric learning (ResNet embeddings "
            "trained with triplet loss). Uses PyTorch (through the PyTorch extension), MONAI, pydicom, h5py "
            "and SimpleITK. Sample data: NIH Clinical Center ChestX-ray14 and public brain MRI (see "
            "Resources/SampleData/NOTICE.md).")
        if hasattr(slicer, "app"):  # the Sample Data module is there once Slicer has started
            slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Offer the bundled sample images in Slicer's Sample Data module."""
    from SubjectFingerprintLib.sampledata import registerSampleData as register

    register()


class SubjectFingerprintWidget(ScriptedLoadableModuleWidget):
    """Hosts SubjectFingerprintLib's panel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.panel = None
        self.logic = None

    def setup(self) -> None:
        from SubjectFingerprintLib.widget import SubjectFingerprintPanel

        ScriptedLoadableModuleWidget.setup(self)
        self.panel = SubjectFingerprintPanel(self.resourcePath("UI/SubjectFingerprint.ui"),
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
        """Reload the Lib too (Slicer's Reload only re-reads this file)."""
        from SubjectFingerprintLib import reloadLib

        reloadLib("SubjectFingerprintLib", ("process", "pathparameters", "dependencies", "volumes", "resultstable",
                                            "views", "sampledata", "logic", "widget", "selftest"))
        ScriptedLoadableModuleWidget.onReload(self)


class SubjectFingerprintTest(ScriptedLoadableModuleTest):
    """Runs SubjectFingerprintLib's tests in a real Slicer."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from SubjectFingerprintLib.selftest import TESTS

        for test in TESTS:
            self.setUp()
            self.delayDisplay(test.__doc__.splitlines()[0])
            test(self)
        self.delayDisplay("Test passed")

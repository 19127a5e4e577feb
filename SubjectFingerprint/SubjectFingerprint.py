"""SubjectFingerprint: find which subject an image belongs to, inside 3D Slicer.

The module file imports no torch, MONAI or engine code at module scope, so it loads (and its
generic test passes) in a Slicer without PyTorch. The engine (``subject_fingerprint``) is
imported inside the Logic's methods, after ``ensureDependencies`` has installed what is missing.
Long runs (building a library, checking datasets) go to a separate ``PythonSlicer`` process.
"""

import csv
import logging
import os
import time
from typing import Annotated, Callable, List, Optional, Sequence

import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
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

SETTINGS_PREFIX = "SubjectFingerprint/"
RESULTS_TABLE_NAME = "SubjectFingerprint matches"


#
# SubjectFingerprint
#


class SubjectFingerprint(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and help."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Subject Fingerprint")
        self.parent.categories = [_("Utilities")]
        self.parent.dependencies = []
        self.parent.contributors = ["SubjectFingerprint contributors"]
        self.parent.helpText = _(
            "Find which subject an X-ray or MRI belongs to. Select a volume, a fingerprint model and an "
            "embedding library, then <b>Find matches</b>: the library's subjects are ranked by how close "
            "their images are to the selected one, with a same-subject probability when the model is "
            "calibrated. Select a row to compare the candidate with the query side by side. "
            "<b>Add to library</b> stores the selected volume under a subject ID; "
            "<b>Build library from folder</b> indexes a folder or a DICOM export in the background; "
            "<b>Check datasets for shared subjects</b> compares two or more datasets and writes an HTML report.")
        self.parent.acknowledgementText = _(
            "Based on few-shot fingerprinting of medical images with deep metric learning (ResNet embeddings "
            "trained with triplet loss). Uses PyTorch and MONAI.")


#
# Parameter node
#


@parameterNodeWrapper
class SubjectFingerprintParameterNode:
    """What the panel edits. Paths are kept in the widgets and QSettings (remembered between sessions)."""

    inputVolume: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    candidates: Annotated[int, WithinRange(1, 1000)] = 10
    subjectId: str = ""
    dataset: str = ""


#
# Widget
#


class SubjectFingerprintWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: all work is delegated to SubjectFingerprintLogic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        self._running = None  # (button, original text) while a background run is active
        self._resultsTableNode = None
        self._queryVolumeNode = None
        self._lastReportFolder = ""

    # -- setup ------------------------------------------------------------------------
    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SubjectFingerprint.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SubjectFingerprintLogic()
        self.logic.logCallback = self.appendLog

        settings = qt.QSettings()
        self.ui.modelPathLineEdit.currentPath = settings.value(SETTINGS_PREFIX + "modelPath", "")
        self.ui.libraryPathLineEdit.currentPath = settings.value(SETTINGS_PREFIX + "libraryPath", "")
        self.ui.reportFolderLineEdit.currentPath = settings.value(SETTINGS_PREFIX + "reportFolder", "")
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.libraryPathLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.reportFolderLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.buildFolderLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.modelPathLineEdit.toolTip = _("Fingerprint model checkpoint (.pt). Empty: the bundled starter "
                                              "model, or the one named by $SUBJECT_FINGERPRINT_MODEL.")

        self.ui.findMatchesButton.connect("clicked(bool)", self.onFindMatches)
        self.ui.addToLibraryButton.connect("clicked(bool)", self.onAddToLibrary)
        self.ui.buildLibraryButton.connect("clicked(bool)", self.onBuildLibrary)
        self.ui.checkDatasetsButton.connect("clicked(bool)", self.onCheckDatasets)
        self.ui.addDatasetFolderButton.connect("clicked(bool)", self.onAddDatasetFolder)
        self.ui.addDatasetLibraryButton.connect("clicked(bool)", self.onAddDatasetLibrary)
        self.ui.removeDatasetButton.connect("clicked(bool)", self.onRemoveDataset)
        self.ui.openReportButton.connect("clicked(bool)", self.onOpenReport)
        self.ui.loadTopPairButton.connect("clicked(bool)", self.onLoadTopPair)
        self.ui.resultsTableView.connect("selectionChanged()", self.onResultSelected)
        self.ui.progressBar.setVisible(False)
        self.ui.logTextEdit.maximumBlockCount = 2000  # a long run must not slow the panel down

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self._updateButtons()

    def cleanup(self) -> None:
        if self.logic is not None:
            self.logic.cancel()
        self.removeObservers()

    def onReload(self) -> None:
        """Reload the Lib helpers too (Slicer's Reload only re-reads the module file)."""
        import importlib
        import sys

        for name in sorted(m for m in sys.modules if m.startswith("SubjectFingerprintLib.")):
            importlib.reload(sys.modules[name])
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._resultsTableNode = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._updateButtons()

    # -- state ------------------------------------------------------------------------
    def onPathsChanged(self, _path=None) -> None:
        import qt

        settings = qt.QSettings()
        settings.setValue(SETTINGS_PREFIX + "modelPath", self.ui.modelPathLineEdit.currentPath)
        settings.setValue(SETTINGS_PREFIX + "libraryPath", self.ui.libraryPathLineEdit.currentPath)
        settings.setValue(SETTINGS_PREFIX + "reportFolder", self.ui.reportFolderLineEdit.currentPath)
        self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        if not hasattr(self, "ui"):
            return
        busy = self._running is not None
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        library = self.ui.libraryPathLineEdit.currentPath
        subject = self._parameterNode.subjectId.strip() if self._parameterNode else ""
        self.ui.findMatchesButton.enabled = bool(volume and library and os.path.isfile(library)) and not busy
        self.ui.findMatchesButton.toolTip = (_("Rank the library's subjects for the selected volume.")
                                             if volume and library else _("Select a volume and an existing library file."))
        self.ui.addToLibraryButton.enabled = bool(volume and library and subject) and not busy
        self.ui.addToLibraryButton.toolTip = (_("Store the selected volume in the library under the subject ID.")
                                              if subject else _("Type a subject ID first."))
        for button, ready in ((self.ui.buildLibraryButton, bool(self.ui.buildFolderLineEdit.currentPath and library)),
                              (self.ui.checkDatasetsButton, self.ui.datasetsListWidget.count >= 2
                               and bool(self.ui.reportFolderLineEdit.currentPath))):
            if self._running and self._running[0] is button:
                button.enabled = True  # it is the Cancel button now
            else:
                button.enabled = ready and not busy
        hasReport = bool(self._lastReportFolder) and os.path.isfile(os.path.join(self._lastReportFolder, "index.html"))
        self.ui.openReportButton.enabled = hasReport
        self.ui.loadTopPairButton.enabled = hasReport

    def appendLog(self, text: str) -> None:
        """Append to the log box (bounded by its maximumBlockCount, set in setup)."""
        if not hasattr(self, "ui"):
            return
        # No processEvents() here: this runs inside the QTimer poll, and re-entering the event
        # loop could run the poll (and finishBackground) twice.
        self.ui.logTextEdit.appendPlainText(text)

    def _options(self) -> dict:
        return {"modelPath": self.ui.modelPathLineEdit.currentPath or None,
                "device": self._parameterNode.device}

    def _showDeviceNotice(self) -> None:
        notice = self.logic.deviceNotice(self._parameterNode.device)
        self.ui.statusLabel.text = notice or ""
        if notice:
            self.appendLog(notice)

    # -- find / add ---------------------------------------------------------------------
    def onFindMatches(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Finding matches failed."), waitCursor=True):
            self.logic.ensureDependencies()
            self._showDeviceNotice()
            volume = self._parameterNode.inputVolume
            started = time.time()
            rows = self.logic.findMatches(volume, self.ui.libraryPathLineEdit.currentPath,
                                          k=self._parameterNode.candidates, **self._options())
            self._queryVolumeNode = volume
            self._resultsTableNode = self.logic.showResultsInTable(rows, self._resultsTableNode)
            self.ui.resultsTableView.setMRMLTableNode(self._resultsTableNode)
            self.ui.resultsTableView.setColumnHidden(self.logic.resultColumnIndex("source"), True)
            self.ui.resultsTableView.resizeColumnsToContents()
            self.appendLog(_("{n} candidates for {name} in {s:.1f} s").format(
                n=len(rows), name=volume.GetName(), s=time.time() - started))

    def onResultSelected(self) -> None:
        if self._resultsTableNode is None:
            return
        selected = self.ui.resultsTableView.selectionModel().selectedRows()
        if not selected:
            return
        # The view sorts through a proxy model: map the selection back to the table's row.
        view = self.ui.resultsTableView
        tableRow = view.tableModel().mrmlTableRowIndex(view.sortFilterProxyModel().mapToSource(selected[0]))
        row = self.logic.rowsFromTable(self._resultsTableNode)[tableRow]
        with slicer.util.tryWithErrorDisplay(_("Could not load the candidate's image."), waitCursor=True):
            self.logic.loadCandidate(row, queryVolumeNode=self._queryVolumeNode)

    def onAddToLibrary(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Adding to the library failed."), waitCursor=True):
            self.logic.ensureDependencies()
            self._showDeviceNotice()
            volume = self._parameterNode.inputVolume
            added = self.logic.addVolumeToLibrary(volume, self._parameterNode.subjectId.strip(),
                                                  self.ui.libraryPathLineEdit.currentPath,
                                                  dataset=self._parameterNode.dataset.strip(), **self._options())
            message = (_("Added {name} to the library as subject {subject}.") if added else
                       _("{name} is already in the library (same pixels); nothing added.")).format(
                name=volume.GetName(), subject=self._parameterNode.subjectId.strip())
            self.appendLog(message)
            self.ui.statusLabel.text = message
        self._updateButtons()

    # -- background runs ----------------------------------------------------------------
    def _startBackground(self, button, start: Callable) -> None:
        """Run ``start(onLog, onProgress, onFinished)``; the button becomes Cancel meanwhile."""
        import qt

        if self._running is not None:
            if self._running[0] is button:
                self.appendLog(_("Cancelling..."))
                self.logic.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start."), waitCursor=True):
            self.logic.ensureDependencies()
            self._showDeviceNotice()
            process = start(self.appendLog, self._onProgress, lambda code, cancelled: None)
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.setRange(0, 0)  # busy until the first progress line
            self._running = (button, button.text, process)
            button.text = _("Cancel")
            self._timer = qt.QTimer()
            self._timer.setInterval(200)
            self._timer.connect("timeout()", self._poll)
            self._timer.start()
        self._updateButtons()

    def _onProgress(self, done: int, total: int) -> None:
        self.ui.progressBar.setRange(0, max(total, 1))
        self.ui.progressBar.setValue(done)

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
        with slicer.util.tryWithErrorDisplay(_("The background run failed."), waitCursor=False):
            summary = self.logic.finishBackground(process)
            self.ui.statusLabel.text = summary
            self.appendLog(summary)
            if getattr(process, "reportFolder", None) and not process.cancelled:
                self._lastReportFolder = process.reportFolder
                # A finished check opens its report and shows the most likely pair at once.
                self.onOpenReport()
                if self.logic.readSharedSubjects(self._lastReportFolder):
                    self.onLoadTopPair()
        self._updateButtons()

    def onBuildLibrary(self) -> None:
        folder = self.ui.buildFolderLineEdit.currentPath
        library = self.ui.libraryPathLineEdit.currentPath
        self._startBackground(self.ui.buildLibraryButton, lambda onLog, onProgress, onFinished: self.logic.buildLibrary(
            folder, library, dataset=self._parameterNode.dataset.strip(), waitForCompletion=False,
            onLog=onLog, onProgress=onProgress, **self._options()))

    def onAddDatasetFolder(self) -> None:
        import qt

        path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Dataset folder"))
        if path:
            self.ui.datasetsListWidget.addItem(path)
        self._updateButtons()

    def onAddDatasetLibrary(self) -> None:
        import qt

        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Embedding library"), "",
                                              "Embedding library (*.h5)")
        if path:
            self.ui.datasetsListWidget.addItem(path)
        self._updateButtons()

    def onRemoveDataset(self) -> None:
        for item in self.ui.datasetsListWidget.selectedItems():
            self.ui.datasetsListWidget.takeItem(self.ui.datasetsListWidget.row(item))
        self._updateButtons()

    def onCheckDatasets(self) -> None:
        paths = [self.ui.datasetsListWidget.item(i).text() for i in range(self.ui.datasetsListWidget.count)]
        outDir = self.ui.reportFolderLineEdit.currentPath
        self._startBackground(self.ui.checkDatasetsButton, lambda onLog, onProgress, onFinished: self.logic.checkDatasets(
            paths, outDir, waitForCompletion=False, onLog=onLog, onProgress=onProgress, **self._options()))

    def onOpenReport(self) -> None:
        import qt

        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(os.path.join(self._lastReportFolder, "index.html")))

    def onLoadTopPair(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not load the top pair."), waitCursor=True):
            self.logic.loadSharedPair(self._lastReportFolder, index=0)


#
# Logic
#


class SubjectFingerprintLogic(EngineRunnerMixin, ScriptedLoadableModuleLogic):
    """Everything the panel does, usable from scripts and batch mode.

    The GUI calls exactly these methods; see ``Resources/Scripts/batch_find_matches.py`` for a
    complete batch-mode example. Errors from the engine are ``FingerprintError`` subclasses
    whose message is meant for the user (wrong modality, empty library, other model, ...).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback: Optional[Callable[[str], None]] = None
        self.process = None  # the BackgroundProcess of the current long run, if any
        self._modelCache = {}

    def getParameterNode(self):
        return SubjectFingerprintParameterNode(super().getParameterNode())

    # -- model and dependencies -------------------------------------------------------------
    @staticmethod
    def moduleDir() -> str:
        return os.path.dirname(os.path.abspath(__file__))

    def ensureDependencies(self, training: bool = False, interactive: bool = True) -> None:
        """Install torch (through the PyTorch extension) and the engine's packages on first use."""
        from SubjectFingerprintLib.dependencies import ensureDependencies

        ensureDependencies(training=training, interactive=interactive)

    def defaultModelPath(self) -> str:
        """The engine's default model ($SUBJECT_FINGERPRINT_MODEL, else the bundled starter model
        beside the engine package: the module's Resources in a Slicer build, or the repository's)."""
        from subject_fingerprint.checkpoint import default_model_path

        return str(default_model_path())  # raises CheckpointError with a clear message if absent

    def resolveModelPath(self, modelPath: Optional[str] = None) -> str:
        return str(modelPath) if modelPath else self.defaultModelPath()

    def loadModel(self, modelPath: Optional[str] = None):
        """The FingerprintModel for ``modelPath`` (the starter model when empty), cached by file and date."""
        from subject_fingerprint.checkpoint import load_checkpoint

        path = self.resolveModelPath(modelPath)
        key = (os.path.abspath(path), os.path.getmtime(path) if os.path.exists(path) else 0)
        if key not in self._modelCache:
            self._modelCache = {key: load_checkpoint(path)}
        return self._modelCache[key]


    # -- find matches ------------------------------------------------------------------------
    def findMatches(self, volumeNode, libraryPath: str, modelPath: Optional[str] = None, k: int = 10,
                    device: str = "auto") -> List[dict]:
        """Rank the library's subjects for ``volumeNode`` (a vtkMRMLScalarVolumeNode).

        Returns one dict per candidate subject, closest first, with keys rank, subject, dataset,
        image (the subject's closest image), distance, probability (None for an uncalibrated
        model) and source (that image's file, for ``loadCandidate``).
        """
        from SubjectFingerprintLib.volumes import resultRows, volumeToLoadedImage
        from subject_fingerprint import lookup
        from subject_fingerprint.errors import LibraryError

        if volumeNode is None:
            raise ValueError(_("Select a volume to identify."))
        if not libraryPath or not os.path.isfile(libraryPath):
            raise LibraryError(_("{path}: no such library file; build or choose one first").format(path=libraryPath))
        model = self.loadModel(modelPath)
        loaded = volumeToLoadedImage(volumeNode)
        model.check_image(loaded)
        notice = self.deviceNotice(device)
        if notice:
            self.log(notice)
        results = lookup.query([loaded], libraryPath, model=model, k=int(k), device=device)
        return resultRows(results[0], sourceLookup=lambda s, i: self._librarySource(libraryPath, s, i))

    @staticmethod
    def _librarySource(libraryPath: str, subjectId: str, imageId: str) -> str:
        from subject_fingerprint.library import EmbeddingLibrary

        with EmbeddingLibrary.open(libraryPath, mode="r") as lib:
            subjects, images, sources = lib.column("subject_id"), lib.column("image_id"), lib.column("source")
        for s, i, src in zip(subjects, images, sources):
            if s == subjectId and i == imageId:
                return str(src)
        return ""

    @staticmethod
    def resultColumnIndex(name: str) -> int:
        from SubjectFingerprintLib.volumes import RESULT_COLUMNS

        return RESULT_COLUMNS.index(name)

    def showResultsInTable(self, rows: Sequence[dict], tableNode=None):
        """Put ``findMatches`` rows in a vtkMRMLTableNode (created when None) and return it."""
        from SubjectFingerprintLib.volumes import rowsToTable

        if tableNode is None:
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", RESULTS_TABLE_NAME)
        return rowsToTable(rows, tableNode)

    @staticmethod
    def rowsFromTable(tableNode) -> List[dict]:
        """The rows of a results table, as ``findMatches`` returned them."""
        from SubjectFingerprintLib.volumes import tableToRows

        return tableToRows(tableNode)

    # -- add to library ------------------------------------------------------------------------
    def addVolumeToLibrary(self, volumeNode, subjectId: str, libraryPath: str, modelPath: Optional[str] = None,
                           dataset: str = "", device: str = "auto") -> int:
        """Embed ``volumeNode`` and store it in the library under ``subjectId``.

        The library is created when missing. Returns 1, or 0 when the same pixels are
        already there. One image, so this runs in Slicer's process.
        """
        from SubjectFingerprintLib.volumes import volumeToLoadedImage
        from subject_fingerprint.embed import Embedder
        from subject_fingerprint.library import EmbeddingLibrary
        from subject_fingerprint.records import LoadedImage, pixel_hash

        if volumeNode is None:
            raise ValueError(_("Select a volume to add."))
        if not subjectId or not subjectId.strip():
            raise ValueError(_("Type the subject ID under which to store the volume."))
        if not libraryPath:
            raise ValueError(_("Choose a library file (.h5); it is created if it does not exist."))
        model = self.loadModel(modelPath)
        loaded = volumeToLoadedImage(volumeNode, subjectId=subjectId.strip(), dataset=dataset)
        model.check_image(loaded)
        contentHash = pixel_hash(loaded.array)
        loaded = LoadedImage(array=loaded.array, spacing=loaded.spacing, record=loaded.record, content_hash=contentHash)
        embedding = Embedder(model, device=device).embed_loaded([loaded])
        with EmbeddingLibrary.open(libraryPath, mode="a", model=model) as lib:
            result = lib.add([loaded.record], [contentHash], embedding)
        self.log(_("{path}: {n} image added").format(path=libraryPath, n=result.added))
        return int(result.added)

    # -- background runs -----------------------------------------------------------------------
    def buildLibrary(self, folder: str, libraryPath: str, modelPath: Optional[str] = None, dataset: str = "",
                     manifest: Optional[str] = None, device: str = "auto", waitForCompletion: bool = True,
                     onLog: Optional[Callable] = None, onProgress: Optional[Callable] = None):
        """Index every image under ``folder`` (a folder of subjects, a manifest folder or a DICOM export).

        Runs ``subject_fingerprint index --transactional`` in a separate process, so a
        cancelled or failed run leaves the library exactly as it was. With
        ``waitForCompletion`` (scripts) it blocks and raises on failure; otherwise it returns
        the BackgroundProcess at once and the caller polls it (the GUI does, from a QTimer).
        """
        if not folder or not os.path.exists(folder):
            raise ValueError(_("{path}: no such folder").format(path=folder))
        if not libraryPath:
            raise ValueError(_("Choose the library file (.h5) to build."))
        arguments = ["index", folder, "--library", libraryPath, "--model", self.resolveModelPath(modelPath),
                     "--device", device, "--transactional"]
        if dataset:
            arguments += ["--dataset", dataset]
        if manifest:
            arguments += ["--manifest", manifest]
        process = self._start(arguments, waitForCompletion, onLog, onProgress, kind="index", libraryPath=libraryPath)
        return process

    def checkDatasets(self, paths: Sequence[str], outDir: str, modelPath: Optional[str] = None,
                      device: str = "auto", threshold: Optional[float] = None, waitForCompletion: bool = True,
                      onLog: Optional[Callable] = None, onProgress: Optional[Callable] = None):
        """Look for subjects shared between two or more datasets (folders or libraries).

        Runs ``subject_fingerprint dedup`` in a separate process and writes ``outDir/index.html``,
        ``subjects.csv`` and ``summary.json``; read the pairs with ``readSharedSubjects(outDir)``.
        ``threshold`` (a distance) overrides the model's calibrated threshold; an uncalibrated
        model needs one.
        """
        paths = [str(p) for p in paths]
        if len(paths) < 2:
            raise ValueError(_("Choose at least two datasets to compare."))
        for path in paths:
            if not os.path.exists(path):
                raise ValueError(_("{path}: no such folder or library").format(path=path))
        if not outDir:
            raise ValueError(_("Choose a folder for the report."))
        arguments = ["dedup", *paths, "--out", outDir, "--model", self.resolveModelPath(modelPath), "--device", device]
        if threshold is not None:
            arguments += ["--threshold", float(threshold)]
        process = self._start(arguments, waitForCompletion, onLog, onProgress, kind="dedup", reportFolder=outDir)
        return process

    def finishBackground(self, process) -> str:
        """A one-line summary of a finished run; raises with the tool's own message on failure."""
        from subject_fingerprint.errors import FingerprintError

        if process.cancelled:
            return _("Cancelled; nothing was changed.")
        code = process.returncode
        kind = getattr(process, "kind", "")
        if code == 0 or (kind == "dedup" and code == 1):  # dedup exits 1 when it finds shared subjects
            if kind == "dedup":
                pairs = self.readSharedSubjects(process.reportFolder)
                return _("{n} shared subject pairs; report in {path}").format(
                    n=len(pairs), path=os.path.join(process.reportFolder, "index.html"))
            return _("Done.") if code == 0 else _("Done; some files could not be read (see the log).")
        if kind == "index" and code == 1:
            return _("Done; some files could not be read (see the log).")
        errors = [line for line in process.lines if line.startswith("error:")]
        message = errors[-1][len("error:"):].strip() if errors else (process.lines[-1] if process.lines else "")
        raise FingerprintError(_("the run failed (exit code {code}): {message}").format(code=code, message=message))


    @staticmethod
    def readSharedSubjects(outDir: str) -> List[dict]:
        """The rows of ``outDir/subjects.csv`` written by ``checkDatasets``, most likely first."""
        path = os.path.join(outDir, "subjects.csv")
        if not os.path.isfile(path):
            return []
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    # -- loading images and showing them side by side ----------------------------------------------
    @staticmethod
    def loadVolumeFile(path: str, name: Optional[str] = None):
        """Load an image file (or a DICOM series folder) as a scalar volume node.

        In Slicer this is ``slicer.util.loadVolume``; without Slicer's application (tests,
        slicer-core) the volume archetype reader is used. Anything they cannot read (a DICOM
        series folder, a file ITK cannot open) is read by the engine's reader instead.
        """
        path = str(path)
        node = None
        if os.path.isfile(path):
            if hasattr(slicer, "app"):
                try:
                    node = slicer.util.loadVolume(path, properties={"singleFile": True, "show": False})
                except Exception:  # loadVolume raises when no reader takes the file
                    node = None
            else:
                node = _readWithArchetype(path)
        if node is None:
            node = _readWithEngine(path)
        if name:
            node.SetName(name)
        return node

    def loadCandidate(self, row: dict, queryVolumeNode=None, showSideBySide: bool = True):
        """Load the candidate image of a results row and show it next to the query."""
        source = row.get("source") or ""
        if not source:
            raise ValueError(_("The library does not record where {image} came from.").format(image=row.get("image")))
        if not os.path.exists(source):
            raise ValueError(_("{path}: the candidate's file is not there any more").format(path=source))
        node = self.loadVolumeFile(source, name=f"candidate {row.get('rank')}: {row.get('subject')}")
        if showSideBySide:
            self.showSideBySide(queryVolumeNode, node)
        return node

    def loadSharedPair(self, outDir: str, index: int = 0):
        """Load the two images of the ``index``-th shared subject pair of a report, side by side."""
        pairs = self.readSharedSubjects(outDir)
        if index >= len(pairs):
            raise ValueError(_("The report lists no shared subjects."))
        pair = pairs[index]
        nodes = []
        for side in ("a", "b"):
            nodes.append(self.loadVolumeFile(pair[f"source_{side}"],
                                             name=f"{pair[f'dataset_{side}']} {pair[f'subject_{side}']}"))
        self.showSideBySide(*nodes)
        return tuple(nodes)

    @staticmethod
    def showSideBySide(leftNode, rightNode) -> None:
        """Side-by-side layout: ``leftNode`` in the red view, ``rightNode`` in the yellow one."""
        if not hasattr(slicer, "app") or slicer.app.layoutManager() is None:
            return  # batch mode or tests: nothing to show
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        for viewName, node in (("Red", leftNode), ("Yellow", rightNode)):
            if node is None:
                continue
            sliceWidget = layoutManager.sliceWidget(viewName)
            sliceWidget.mrmlSliceCompositeNode().SetBackgroundVolumeID(node.GetID())
            sliceWidget.mrmlSliceCompositeNode().SetLinkedControl(False)
            dims = node.GetImageData().GetDimensions()
            if 1 in dims:  # a single-slice image: look at it face on
                sliceWidget.mrmlSliceNode().SetOrientation(
                    {0: "Sagittal", 1: "Coronal", 2: "Axial"}[dims.index(1)])
            sliceWidget.sliceLogic().FitSliceToAll()


def _readWithArchetype(path: str):
    """Read a file with Slicer's volume archetype storage node into a new scalar volume node."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetSingleFile(True)
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                              slicer.mrmlScene.GenerateUniqueName(_stem(path)))
    if not storage.ReadData(node):
        slicer.mrmlScene.RemoveNode(node)
        return None
    slicer.mrmlScene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def _readWithEngine(path: str):
    """Read with the engine (DICOM series folders, X-ray DICOM with LUTs) into a new volume node."""
    import numpy as np
    from subject_fingerprint.io import read_image

    loaded = read_image(path)
    array = loaded.array if loaded.array.ndim == 3 else loaded.array[np.newaxis]
    spacing = tuple(loaded.spacing) if len(loaded.spacing) == 3 else (1.0,) + tuple(loaded.spacing)
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                              slicer.mrmlScene.GenerateUniqueName(_stem(path)))
    # (z, y, x) in LPS: IJK axes are x, y, z; RAS flips the first two.
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 0, -spacing[2])
    matrix.SetElement(1, 1, -spacing[1])
    matrix.SetElement(2, 2, spacing[0])
    node.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, dtype=np.float32))
    node.SetAttribute("SubjectFingerprint.source", path)
    return node


def _stem(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    for ext in (".nii.gz", ".seg.nrrd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0] or name


#
# Test (runs in a real Slicer: Slicer --testing, or the Reload and Test button)
#


class SubjectFingerprintTest(ScriptedLoadableModuleTest):
    """Checks the Logic in a running Slicer; the engine parts are skipped when torch is missing."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_VolumeConversion()
        self.setUp()
        self.test_FindMatchesAndTable()

    def test_VolumeConversion(self):
        """A single-slice volume becomes a 2D image; a 3D one keeps (z, y, x)."""
        import numpy as np
        from SubjectFingerprintLib.volumes import volumeArrayToLps

        self.delayDisplay("Volume node to engine image")
        array = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
        ras = np.diag([-1.0, -1.0, 2.0])  # LPS-aligned voxels, 2 mm slices
        out, spacing = volumeArrayToLps(array, np.diag([-1.0, -1.0, 1.0]) @ ras)
        self.assertEqual(out.shape, (2, 3, 4))
        self.assertEqual(spacing, (2.0, 1.0, 1.0))
        self.assertTrue(np.array_equal(out, array))
        self.delayDisplay("Test passed")

    def test_FindMatchesAndTable(self):
        """Index a few synthetic images with a tiny model, then find one of them again."""
        import importlib.util
        import tempfile

        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("monai") is None:
            self.delayDisplay("torch/MONAI not installed: engine test skipped")
            return
        import numpy as np
        from subject_fingerprint import lookup
        from subject_fingerprint.checkpoint import FingerprintModel, save_checkpoint
        from subject_fingerprint.preprocess import Preprocessing

        self.delayDisplay("Find matches with a tiny model")
        tmp = tempfile.mkdtemp()
        model = FingerprintModel.create(2, depth=18, embedding_dim=32,
                                        preprocessing=Preprocessing(spatial_dims=2, size=(32, 32)))
        modelPath = os.path.join(tmp, "tiny.pt")
        save_checkpoint(model, modelPath)
        rng = np.random.default_rng(0)
        for subject in ("s1", "s2", "s3"):
            os.makedirs(os.path.join(tmp, "lib", subject))
            array = (rng.random((48, 40)) * 4000).astype(np.int16)[np.newaxis]
            node = slicer.util.addVolumeFromArray(array, name=subject)
            slicer.util.saveNode(node, os.path.join(tmp, "lib", subject, "img.nrrd"))
        libraryPath = os.path.join(tmp, "lib.h5")
        lookup.index([os.path.join(tmp, "lib")], libraryPath, model=modelPath, progress=False)
        query = slicer.util.loadVolume(os.path.join(tmp, "lib", "s2", "img.nrrd"))
        logic = SubjectFingerprintLogic()
        rows = logic.findMatches(query, libraryPath, modelPath=modelPath, k=3, device="cpu")
        self.assertEqual(rows[0]["subject"], "s2")
        self.assertLess(rows[0]["distance"], 1e-3)
        table = logic.showResultsInTable(rows)
        self.assertEqual(table.GetNumberOfRows(), 3)
        logic.loadCandidate(rows[1], queryVolumeNode=query)
        self.delayDisplay("Test passed")

"""The SubjectFingerprint panel: the .ui, the parameter node, and the Logic's runs off the main thread."""

import os

import slicer
from slicer.util import VTKObservationMixin

from SubjectFingerprintLib.logic import SubjectFingerprintLogic
from SubjectFingerprintLib.pathparameters import PathParametersWidgetMixin
from SubjectFingerprintLib.process import BackgroundRunWidgetMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4
    def _(text):
        return text

# Every widget of the .ui this code uses, with the class it expects (checked by test_slicer_static).
UI_WIDGETS = {
    "inputVolumeSelector": "qMRMLNodeComboBox",
    "modelPathLineEdit": "ctkPathLineEdit",
    "libraryPathLineEdit": "ctkPathLineEdit",
    "buildFolderLineEdit": "ctkPathLineEdit",
    "reportFolderLineEdit": "ctkPathLineEdit",
    "findMatchesButton": "QPushButton",
    "addToLibraryButton": "QPushButton",
    "buildLibraryButton": "QPushButton",
    "checkDatasetsButton": "QPushButton",
    "addDatasetFolderButton": "QPushButton",
    "addDatasetLibraryButton": "QPushButton",
    "removeDatasetButton": "QPushButton",
    "openReportButton": "QPushButton",
    "loadTopPairButton": "QPushButton",
    "datasetsListWidget": "QListWidget",
    "resultsTableView": "qMRMLTableView",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "logTextEdit": "QPlainTextEdit",
}


class SubjectFingerprintPanel(BackgroundRunWidgetMixin, PathParametersWidgetMixin, VTKObservationMixin):
    """What the module's widget shows. ``isEntered()`` says whether the module is on screen."""

    SETTINGS_PREFIX = "SubjectFingerprint/"
    # Paths kept in the parameter node (saved with the scene) and remembered in QSettings.
    PATH_PARAMETERS = {"modelPathLineEdit": "modelPath", "libraryPathLineEdit": "libraryPath"}

    def __init__(self, uiPath: str, isEntered=lambda: True) -> None:
        VTKObservationMixin.__init__(self)
        import qt

        self.isEntered = isEntered
        self._resultsTableNode = None
        self._queryVolumeNode = None
        self._lastReportFolder = ""

        self.uiWidget = slicer.util.loadUI(uiPath)
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        self.uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SubjectFingerprintLogic()
        self.logic.logCallback = self.appendLog

        settings = qt.QSettings()
        self.ui.reportFolderLineEdit.currentPath = settings.value(self.SETTINGS_PREFIX + "reportFolder", "")
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.libraryPathLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.reportFolderLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.buildFolderLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.modelPathLineEdit.toolTip = _(
            "Fingerprint model checkpoint (.pt). Empty: $SUBJECT_FINGERPRINT_MODEL when set, else the "
            "bundled starter model.")
        self.ui.findMatchesButton.connect("clicked(bool)", self.onFindMatches)
        self.ui.addToLibraryButton.connect("clicked(bool)", self.onAddToLibrary)
        self.ui.buildLibraryButton.connect("clicked(bool)", self.onBuildLibrary)
        self.ui.checkDatasetsButton.connect("clicked(bool)", self.onCheckDatasets)
        self.ui.addDatasetFolderButton.connect("clicked(bool)", self.onAddDatasetFolder)
        self.ui.addDatasetLibraryButton.connect("clicked(bool)", self.onAddDatasetLibrary)
        self.ui.removeDatasetButton.connect("clicked(bool)", self.onRemoveDataset)
        self.ui.openReportButton.connect("clicked(bool)", self.onOpenReport)
        self.ui.loadTopPairButton.connect("clicked(bool)", self.onLoadTopPair)
        from SubjectFingerprintLib.resultstable import configureResultsView

        configureResultsView(self.ui.resultsTableView)
        self.ui.resultsTableView.connect("selectionChanged()", self.onResultSelected)
        self.ui.progressBar.setVisible(False)
        self.ui.logTextEdit.maximumBlockCount = 2000  # a long run must not slow the panel down

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    # -- lifecycle (called by the module's widget) -------------------------------------------------
    def cleanup(self) -> None:
        self.cleanupBackground()  # stops the poll timer too: Reload must not leave it running
        self.logic.closeLibrary()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._resultsTableNode = None
        self._queryVolumeNode = None
        self.ui.resultsTableView.setMRMLTableNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.isEntered():
            self.initializeParameterNode()

    def _initializeExtraParameters(self, node) -> None:
        """No input volume yet: the scene's first scalar volume."""
        if not node.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                node.inputVolume = first

    # -- state --------------------------------------------------------------------------------------
    def _savePathSettings(self, settings) -> None:
        """The report folder is remembered too (it is no parameter: a scene does not restore it)."""
        settings.setValue(self.SETTINGS_PREFIX + "reportFolder", self.ui.reportFolderLineEdit.currentPath)

    def _updateButtons(self, caller=None, event=None) -> None:
        busy = self.busy
        p = self._parameterNode
        volume = p.inputVolume if p else None
        library = self.ui.libraryPathLineEdit.currentPath
        subject = p.subjectId.strip() if p else ""
        for button, ready, tip in (
                (self.ui.findMatchesButton, bool(volume and library and os.path.isfile(library)),
                 _("Rank the library's subjects for the selected volume.") if volume and library
                 else _("Select a volume and an existing library file.")),
                (self.ui.addToLibraryButton, bool(volume and library and subject),
                 _("Store the selected volume in the library under the subject ID.") if subject
                 else _("Type a subject ID first.")),
                (self.ui.buildLibraryButton, bool(self.ui.buildFolderLineEdit.currentPath and library), None),
                (self.ui.checkDatasetsButton, self.ui.datasetsListWidget.count >= 2
                 and bool(self.ui.reportFolderLineEdit.currentPath), None)):
            button.enabled = self.isRunButton(button) or (ready and not busy)  # the run's button is Cancel
            if tip:
                button.toolTip = tip
        hasReport = bool(self._lastReportFolder) and os.path.isfile(os.path.join(self._lastReportFolder, "index.html"))
        self.ui.openReportButton.enabled = hasReport
        self.ui.loadTopPairButton.enabled = hasReport and not busy

    def appendLog(self, text: str) -> None:
        """Append to the log box (bounded by its maximumBlockCount). No processEvents() here: this
        runs inside the QTimer poll, and re-entering the event loop could poll twice."""
        self.ui.logTextEdit.appendPlainText(text)

    def _options(self) -> dict:
        return {"modelPath": self.ui.modelPathLineEdit.currentPath or None, "device": self._parameterNode.device}

    def _prepare(self) -> None:
        self.logic.ensureDependencies()
        notice = self.logic.deviceNotice(self._parameterNode.device)
        self.ui.statusLabel.text = notice or ""

    # -- find / add (worker thread) ------------------------------------------------------------------
    def onFindMatches(self) -> None:
        volume = self._parameterNode.inputVolume
        library = self.ui.libraryPathLineEdit.currentPath
        k = self._parameterNode.candidates

        def done(run, summary):
            self._queryVolumeNode = volume
            self._resultsTableNode = self.logic.showResultsInTable(run.result, self._resultsTableNode)
            view = self.ui.resultsTableView
            view.setMRMLTableNode(self._resultsTableNode)
            view.setColumnHidden(self.logic.resultColumnIndex("source"), True)
            view.resizeColumnsToContents()

        self.startBackground(self.ui.findMatchesButton, lambda: self.logic.findMatches(
            volume, library, k=k, waitForCompletion=False, **self._options()), onDone=done, prepare=self._prepare)

    def onResultSelected(self) -> None:
        from SubjectFingerprintLib.resultstable import clickedTableRow

        if self._resultsTableNode is None:
            return
        tableRow = clickedTableRow(self.ui.resultsTableView, self._resultsTableNode)
        if tableRow is None:
            return
        row = self.logic.rowsFromTable(self._resultsTableNode)[tableRow]
        try:
            self.logic.loadCandidate(row, queryVolumeNode=self._queryVolumeNode)
        except Exception as exc:
            self.showError(_("Could not load the candidate's image."), exc)

    def onAddToLibrary(self) -> None:
        p = self._parameterNode
        volume, subject = p.inputVolume, p.subjectId.strip()
        self.startBackground(self.ui.addToLibraryButton, lambda: self.logic.addVolumeToLibrary(
            volume, subject, self.ui.libraryPathLineEdit.currentPath, dataset=p.dataset.strip(),
            waitForCompletion=False, **self._options()), prepare=self._prepare)

    # -- build / check (separate process) --------------------------------------------------------
    def onBuildLibrary(self) -> None:
        folder = self.ui.buildFolderLineEdit.currentPath
        library = self.ui.libraryPathLineEdit.currentPath
        self.startBackground(self.ui.buildLibraryButton, lambda: self.logic.buildLibrary(
            folder, library, dataset=self._parameterNode.dataset.strip(), waitForCompletion=False,
            onLog=self.appendLog, onProgress=self.onProgress, **self._options()), prepare=self._prepare)

    def onCheckDatasets(self) -> None:
        paths = [self.ui.datasetsListWidget.item(i).text() for i in range(self.ui.datasetsListWidget.count)]
        outDir = self.ui.reportFolderLineEdit.currentPath

        def done(run, summary):
            self._lastReportFolder = run.reportFolder
            self.onOpenReport()  # a finished check opens its report and shows the most likely pair
            if self.logic.readSharedSubjects(self._lastReportFolder):
                self.onLoadTopPair()

        self.startBackground(self.ui.checkDatasetsButton, lambda: self.logic.checkDatasets(
            paths, outDir, waitForCompletion=False, onLog=self.appendLog, onProgress=self.onProgress,
            **self._options()), onDone=done, prepare=self._prepare)

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

    def onOpenReport(self) -> None:
        import qt

        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(os.path.join(self._lastReportFolder, "index.html")))

    def onLoadTopPair(self) -> None:
        try:
            self.logic.loadSharedPair(self._lastReportFolder, index=0)
        except Exception as exc:
            self.showError(_("Could not load the top pair."), exc)

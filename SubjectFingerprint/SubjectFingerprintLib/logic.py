"""SubjectFingerprintLogic: everything the panel does, usable from scripts and Slicer's batch mode.

No torch or engine import at module scope. Anything that can take more than a moment runs
off the main thread: building a library and checking datasets in a separate process (the
engine's command line under PythonSlicer), finding matches and adding one image on a worker
thread, with the model and the opened library kept between clicks.
"""

import csv
import os
from typing import Annotated, Callable, List, Optional, Sequence

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from SubjectFingerprintLib.process import (CANCELLED, OK, WARNINGS, EngineRunnerMixin, failureMessage,
                                           runOutcome)

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4
    def _(text):
        return text

RESULTS_TABLE_NAME = "SubjectFingerprint matches"
MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@parameterNodeWrapper
class SubjectFingerprintParameterNode:
    """What the panel edits; saved with the scene (paths included, so a saved scene restores them)."""

    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: str = ""
    libraryPath: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    candidates: Annotated[int, WithinRange(1, 1000)] = 10
    subjectId: str = ""
    dataset: str = ""


class SubjectFingerprintLogic(EngineRunnerMixin, ScriptedLoadableModuleLogic):
    """Find, add, build, check. Errors from the engine are ``FingerprintError`` subclasses whose
    message is meant for the user (wrong modality, empty library, other model, ...).

    See ``Resources/Scripts/batch_find_matches.py`` for a complete batch-mode example.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback: Optional[Callable[[str], None]] = None
        self.process = None  # the current run (BackgroundProcess or BackgroundTask), if any
        self._modelCache = {}
        self._libraryCache = None  # (key, open EmbeddingLibrary)

    def getParameterNode(self):
        return SubjectFingerprintParameterNode(super().getParameterNode())

    # -- model, library and dependencies ----------------------------------------------------------
    @staticmethod
    def moduleDir() -> str:
        return MODULE_DIR

    @staticmethod
    def ensureDependencies(training: bool = False, interactive: bool = True) -> None:
        """Install torch (through the PyTorch extension) and the module's packages on first use."""
        from SubjectFingerprintLib.dependencies import ensureDependencies

        ensureDependencies(training=training, interactive=interactive)

    def defaultModelPath(self) -> str:
        """``$SUBJECT_FINGERPRINT_MODEL`` when set, else the starter model shipped in this module's
        Resources, else the engine's own lookup (the same precedence as the engine's)."""
        from subject_fingerprint.checkpoint import ENV_MODEL, STARTER_MODEL_NAME, default_model_path

        shipped = os.path.join(self.moduleDir(), "Resources", "Models", STARTER_MODEL_NAME)
        if not os.environ.get(ENV_MODEL) and os.path.isfile(shipped):
            return shipped
        return str(default_model_path())  # raises CheckpointError with a clear message if absent

    def resolveModelPath(self, modelPath: Optional[str] = None) -> str:
        return str(modelPath) if modelPath else self.defaultModelPath()

    def loadModel(self, modelPath: Optional[str] = None):
        """The FingerprintModel for ``modelPath`` (the default model when empty), cached by file and date."""
        from subject_fingerprint.checkpoint import load_checkpoint

        path = self.resolveModelPath(modelPath)
        key = (os.path.abspath(path), os.path.getmtime(path) if os.path.exists(path) else 0)
        if key not in self._modelCache:
            self._modelCache = {key: load_checkpoint(path)}
        return self._modelCache[key]

    def openLibrary(self, libraryPath: str, model):
        """The library opened for reading, kept open between lookups until the file changes."""
        from subject_fingerprint.errors import LibraryError
        from subject_fingerprint.library import EmbeddingLibrary

        if not libraryPath or not os.path.isfile(libraryPath):
            raise LibraryError(_("{path}: no such library file; build or choose one first").format(path=libraryPath))
        stat = os.stat(libraryPath)
        key = (os.path.abspath(libraryPath), stat.st_mtime_ns, stat.st_size, str(model.model_id))
        if self._libraryCache is None or self._libraryCache[0] != key:
            self.closeLibrary()
            self._libraryCache = (key, EmbeddingLibrary.open(libraryPath, mode="r", model=model))
        library = self._libraryCache[1]
        if len(library) == 0:
            raise LibraryError(_("{path}: the library is empty; index some images first").format(path=libraryPath))
        return library

    def closeLibrary(self) -> None:
        """Close the kept library (before this Logic writes it, and on scene close)."""
        if self._libraryCache is not None:
            try:
                self._libraryCache[1].close()
            finally:
                self._libraryCache = None

    # -- find matches -------------------------------------------------------------------------------
    def findMatches(self, volumeNode, libraryPath: str, modelPath: Optional[str] = None, k: int = 10,
                    device: str = "auto", waitForCompletion: bool = True, onLog: Optional[Callable] = None):
        """Rank the library's subjects for ``volumeNode``.

        Returns one dict per candidate subject, closest first, with keys rank, subject, dataset,
        image (the subject's closest image), distance, probability (None for an uncalibrated
        model) and source (that image's file, for ``loadCandidate``). Without
        ``waitForCompletion`` it returns the running BackgroundTask at once; its ``result``
        holds the rows when it has finished.
        """
        from SubjectFingerprintLib.volumes import volumeToLoadedImage

        if volumeNode is None:
            raise ValueError(_("Select a volume to identify."))
        loaded = volumeToLoadedImage(volumeNode)  # MRML access: main thread only
        notice = self.deviceNotice(device)
        if notice:
            self.log(notice)

        def work(task):
            from SubjectFingerprintLib.resultstable import resultRows
            from subject_fingerprint.embed import Embedder
            from subject_fingerprint.lookup import library_backend
            from subject_fingerprint.search import rank

            model = self.loadModel(modelPath)
            model.check_image(loaded)
            library = self.openLibrary(libraryPath, model)
            backend = library_backend(library, device)
            embedding = Embedder(model, device=device, backend=backend).embed_loaded([loaded])
            return resultRows(rank(library, embedding, k=int(k), calibration=model.calibration)[0])

        return self._startTask(work, "find", waitForCompletion, onLog, queryName=volumeNode.GetName())

    @staticmethod
    def resultColumnIndex(name: str) -> int:
        from SubjectFingerprintLib.resultstable import RESULT_COLUMNS

        return RESULT_COLUMNS.index(name)

    def showResultsInTable(self, rows: Sequence[dict], tableNode=None):
        """Put ``findMatches`` rows in a vtkMRMLTableNode (created when None) and return it."""
        from SubjectFingerprintLib.resultstable import rowsToTable

        if tableNode is None:
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", RESULTS_TABLE_NAME)
        return rowsToTable(rows, tableNode)

    @staticmethod
    def rowsFromTable(tableNode) -> List[dict]:
        """The rows of a results table, as ``findMatches`` returned them."""
        from SubjectFingerprintLib.resultstable import tableToRows

        return tableToRows(tableNode)

    # -- add to library ---------------------------------------------------------------------------
    def addVolumeToLibrary(self, volumeNode, subjectId: str, libraryPath: str, modelPath: Optional[str] = None,
                           dataset: str = "", device: str = "auto", waitForCompletion: bool = True,
                           onLog: Optional[Callable] = None):
        """Embed ``volumeNode`` and store it in the library under ``subjectId`` (created when missing).

        Returns 1, or 0 when the same pixels are already there (a BackgroundTask whose ``result``
        is that number without ``waitForCompletion``). The library is copied and locked by the
        engine's writer; that happens on the worker thread, never on Slicer's main thread.
        """
        from SubjectFingerprintLib.volumes import volumeToLoadedImage

        if volumeNode is None:
            raise ValueError(_("Select a volume to add."))
        if not subjectId or not subjectId.strip():
            raise ValueError(_("Type the subject ID under which to store the volume."))
        if not libraryPath:
            raise ValueError(_("Choose a library file (.h5); it is created if it does not exist."))
        loaded = volumeToLoadedImage(volumeNode, subjectId=subjectId.strip(), dataset=dataset)
        self.closeLibrary()  # our reader must not hold the file the writer replaces

        def work(task):
            from subject_fingerprint.embed import Embedder
            from subject_fingerprint.library import EmbeddingLibrary
            from subject_fingerprint.lookup import library_backend

            model = self.loadModel(modelPath)
            model.check_image(loaded)
            with EmbeddingLibrary.open(libraryPath, mode="a", model=model) as lib:
                embedder = Embedder(model, device=device, backend=library_backend(lib, device))
                embedding = embedder.embed_loaded([loaded])
                result = lib.add([loaded.record], [loaded.content_hash], embedding,
                                 backends=[embedder.backend])
            task.log(_("{path}: {n} image added").format(path=libraryPath, n=result.added))
            return int(result.added)

        return self._startTask(work, "add", waitForCompletion, onLog, libraryPath=libraryPath)

    # -- runs in a separate process ---------------------------------------------------------------
    def buildLibrary(self, folder: str, libraryPath: str, modelPath: Optional[str] = None, dataset: str = "",
                     manifest: Optional[str] = None, device: str = "auto", waitForCompletion: bool = True,
                     onLog: Optional[Callable] = None, onProgress: Optional[Callable] = None,
                     batchSize: Optional[int] = None):
        """Index every image under ``folder`` (a folder of subjects, a manifest folder or a DICOM export).

        ``batchSize`` images are decoded, embedded and reported together (default: the
        engine's, one CPU pass: 64 at 64 px); smaller batches report progress more often.

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
        if batchSize:
            arguments += ["--batch-size", str(int(batchSize))]
        self.closeLibrary()
        return self._start(arguments, waitForCompletion, onLog, onProgress, kind="index", libraryPath=libraryPath)

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
        return self._start(arguments, waitForCompletion, onLog, onProgress, kind="dedup", reportFolder=outDir)

    def finishBackground(self, process) -> str:
        """A one-line summary of a finished run; raises with the tool's own message on failure."""
        from subject_fingerprint.errors import FingerprintError

        kind = getattr(process, "kind", "")
        outcome = runOutcome(kind, process.returncode, process.cancelled, process.lines)
        if outcome == CANCELLED:
            return _("Cancelled; nothing was changed.")
        if outcome not in (OK, WARNINGS):
            if getattr(process, "error", None) is not None:
                raise process.error  # a worker thread's own exception, type and message kept
            raise FingerprintError(_("the run failed (exit code {code}): {message}").format(
                code=process.returncode, message=failureMessage(process)))
        if kind == "find":
            return _("{n} candidates for {name}").format(n=len(process.result), name=process.queryName)
        if kind == "add":
            return (_("Added to the library.") if process.result else
                    _("Already in the library (same pixels); nothing added."))
        if kind == "dedup":
            report = os.path.join(process.reportFolder, "index.html")
            if not os.path.isfile(report) or not os.path.isfile(os.path.join(process.reportFolder, "subjects.csv")):
                raise FingerprintError(_("the check ended without writing its report in {path}").format(
                    path=process.reportFolder))
            pairs = self.readSharedSubjects(process.reportFolder)
            return _("{n} shared subject pairs; report in {path}").format(n=len(pairs), path=report)
        return _("Done.") if outcome == OK else _("Done; some files could not be read (see the log).")

    @staticmethod
    def readSharedSubjects(outDir: str) -> List[dict]:
        """The rows of ``outDir/subjects.csv`` written by ``checkDatasets``, most likely first."""
        path = os.path.join(outDir, "subjects.csv")
        if not os.path.isfile(path):
            return []
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    # -- loading images and showing them side by side ------------------------------------------------
    @staticmethod
    def loadVolumeFile(path: str, name: Optional[str] = None):
        """Load an image file or DICOM series folder as a volume node (once: a second call reuses it)."""
        from SubjectFingerprintLib.volumes import loadVolumeFile

        return loadVolumeFile(path, name=name)

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
        nodes = [self.loadVolumeFile(pair[f"source_{side}"],
                                     name=f"{pair[f'dataset_{side}']} {pair[f'subject_{side}']}")
                 for side in ("a", "b")]
        self.showSideBySide(*nodes)
        return tuple(nodes)

    @staticmethod
    def showSideBySide(leftNode, rightNode) -> None:
        from SubjectFingerprintLib.views import showSideBySide

        showSideBySide(leftNode, rightNode)

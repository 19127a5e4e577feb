"""The panels' path parameters (PathParametersWidgetMixin): a new scene gets the paths used last
time, edits reach the parameter node and QSettings, a changed node reaches the line edits, and
each panel's extras (the first volume, the report folder) are kept."""

import sys
import types

import pytest

slicer = pytest.importorskip("slicer")
import slicer_harness  # noqa: E402

PREFIX = "Test/"
PATHS = {"aPathLineEdit": "aPath", "bPathLineEdit": "bPath"}


class Settings:
    """qt.QSettings: one store for every instance, as the application's settings are."""

    store = {}

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value


class LineEdit:
    """ctkPathLineEdit: setting currentPath emits currentPathChanged(QString) at once."""

    def __init__(self, path=""):
        self._path, self.slots = path, []

    def connect(self, signal, slot):
        assert signal == "currentPathChanged(QString)"
        self.slots.append(slot)

    @property
    def currentPath(self):
        return self._path

    @currentPath.setter
    def currentPath(self, path):
        if path != self._path:
            self._path = path
            for slot in self.slots:
                slot(path)


class ParameterNode:
    """A parameterNodeWrapper: setting a parameter invokes the ModifiedEvent observers."""

    def __init__(self, **values):
        object.__setattr__(self, "observers", {})
        object.__setattr__(self, "gui", None)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        for callback in list(self.observers.values()):
            callback(self, "ModifiedEvent")

    def AddObserver(self, event, callback, priority=0.0):
        tag = len(self.observers) + 1
        self.observers[tag] = callback
        return tag

    def RemoveObserver(self, tag):
        del self.observers[tag]

    def connectGui(self, ui):
        object.__setattr__(self, "gui", ui)
        return "tag"

    def disconnectGui(self, tag):
        assert tag == "tag"
        object.__setattr__(self, "gui", None)


@pytest.fixture
def qt(monkeypatch):
    slicer_harness.install()
    Settings.store = {}
    module = types.ModuleType("qt")
    module.QSettings = Settings
    monkeypatch.setitem(sys.modules, "qt", module)
    return module


def make_panel(cls, node, ui, prefix=None, paths=None):
    """A panel without its .ui (no Qt here): the mixin's part of it, wired as the panels wire it."""
    from slicer.util import VTKObservationMixin

    panel = cls.__new__(cls)
    VTKObservationMixin.__init__(panel)
    if prefix is not None:
        panel.SETTINGS_PREFIX, panel.PATH_PARAMETERS = prefix, paths
    panel.logic = types.SimpleNamespace(getParameterNode=lambda: node)
    panel.ui = ui
    panel.updates = 0

    def update():
        panel.updates += 1
    panel._updateButtons = update
    for name in panel.PATH_PARAMETERS:
        getattr(ui, name).connect("currentPathChanged(QString)", panel.onPathsChanged)
    return panel


@pytest.fixture
def mixin(qt):
    from SubjectFingerprintLib.pathparameters import PathParametersWidgetMixin
    from slicer.util import VTKObservationMixin

    class Panel(PathParametersWidgetMixin, VTKObservationMixin):
        SETTINGS_PREFIX, PATH_PARAMETERS = PREFIX, PATHS

    return Panel


def _started_panel(mixin, node):
    """A panel with line edits for aPath and bPath, its parameter node initialised."""
    ui = types.SimpleNamespace(aPathLineEdit=LineEdit(), bPathLineEdit=LineEdit())
    panel = make_panel(mixin, node, ui)
    panel.initializeParameterNode()
    return ui, panel


def test_a_new_scene_gets_the_paths_used_last_time(mixin):
    Settings.store = {PREFIX + "aPath": "/last/a.pt", PREFIX + "bPath": "/last/b.h5"}
    node = ParameterNode(aPath="/scene/a.pt", bPath="")
    ui, panel = _started_panel(mixin, node)
    assert (node.aPath, node.bPath) == ("/scene/a.pt", "/last/b.h5")  # only the empty one is filled
    assert (ui.aPathLineEdit.currentPath, ui.bPathLineEdit.currentPath) == ("/scene/a.pt", "/last/b.h5")
    assert node.gui is ui and len(node.observers) == 1 and panel.updates
    assert Settings.store == {PREFIX + "aPath": "/scene/a.pt", PREFIX + "bPath": "/last/b.h5"}


def test_edits_reach_the_node_and_the_settings(mixin):
    node = ParameterNode(aPath="", bPath="")
    ui, panel = _started_panel(mixin, node)
    ui.bPathLineEdit.currentPath = "/new/b.h5"
    assert node.bPath == "/new/b.h5" and Settings.store[PREFIX + "bPath"] == "/new/b.h5"

    node.aPath = "/from/script.pt"  # a changed node reaches its line edit
    assert ui.aPathLineEdit.currentPath == "/from/script.pt"
    assert Settings.store[PREFIX + "aPath"] == "/from/script.pt"


def test_a_loaded_scene_shows_all_its_paths(mixin):
    node = ParameterNode(aPath="/old/a.pt", bPath="/old/b.h5")
    ui, panel = _started_panel(mixin, node)
    object.__setattr__(node, "aPath", "/saved/a.pt")  # the scene's node is copied in, then one Modified
    object.__setattr__(node, "bPath", "/saved/b.h5")
    panel.onParameterNodeModified(node, "ModifiedEvent")
    assert (node.aPath, node.bPath) == ("/saved/a.pt", "/saved/b.h5")
    assert (ui.aPathLineEdit.currentPath, ui.bPathLineEdit.currentPath) == ("/saved/a.pt", "/saved/b.h5")
    assert Settings.store == {PREFIX + "aPath": "/saved/a.pt", PREFIX + "bPath": "/saved/b.h5"}


def test_without_a_node_edits_are_still_remembered(mixin):
    node = ParameterNode(aPath="", bPath="")
    ui, panel = _started_panel(mixin, node)
    panel.setParameterNode(None)  # module left / scene closing
    assert node.gui is None and node.observers == {}
    ui.aPathLineEdit.currentPath = "/typed/a.pt"
    assert node.aPath == "" and Settings.store[PREFIX + "aPath"] == "/typed/a.pt"


def test_subject_fingerprint_panel_selects_a_volume_and_remembers_the_report_folder(qt):
    from SubjectFingerprintLib.widget import SubjectFingerprintPanel

    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    node = ParameterNode(modelPath="", libraryPath="", inputVolume=None)
    ui = types.SimpleNamespace(modelPathLineEdit=LineEdit(), libraryPathLineEdit=LineEdit(),
                               reportFolderLineEdit=LineEdit("/reports"))
    panel = make_panel(SubjectFingerprintPanel, node, ui)
    panel.initializeParameterNode()
    assert node.inputVolume is volume
    ui.libraryPathLineEdit.currentPath = "/lib.h5"
    assert Settings.store == {"SubjectFingerprint/modelPath": "", "SubjectFingerprint/libraryPath": "/lib.h5",
                              "SubjectFingerprint/reportFolder": "/reports"}


def test_training_panel_keeps_its_four_paths(qt):
    from FingerprintTrainingLib.widget import FingerprintTrainingPanel

    Settings.store = {"FingerprintTraining/splitPath": "/split.json"}
    node = ParameterNode(sourcePath="", manifestPath="", splitPath="", outputPath="")
    ui = types.SimpleNamespace(**{name: LineEdit() for name in FingerprintTrainingPanel.PATH_PARAMETERS})
    panel = make_panel(FingerprintTrainingPanel, node, ui)
    panel.initializeParameterNode()
    assert node.splitPath == "/split.json" == ui.splitPathLineEdit.currentPath
    ui.outputPathLineEdit.currentPath = "/runs/1"
    assert node.outputPath == "/runs/1" and Settings.store["FingerprintTraining/outputPath"] == "/runs/1"

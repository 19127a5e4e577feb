"""Static checks of the Slicer extension: .ui files, widget names used by the code, CMake lists."""

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = {
    # module: (its engine package folder, name of the package)
    "SubjectFingerprint": "subject_fingerprint",
    "FingerprintTraining": "fingerprint_training",
}


def cmake_list(module: str, variable: str):
    text = (REPO / module / "CMakeLists.txt").read_text()
    match = re.search(r"set\(" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set in {module}/CMakeLists.txt"
    return {item.replace("${MODULE_NAME}", module) for item in match.group(1).split()}


@pytest.mark.parametrize("module", MODULES)
def test_ui_parses_and_has_a_qmrmlwidget_top(module):
    root = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"


def widget_names(module):
    root = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()
    return {w.get("name"): w for w in root.iter("widget")}


# Signals of the widget classes the panels use, as declared in Slicer 5.8.1, 5.10.0 and main
# (Libs/MRML/Widgets/qMRMLTableView.h, qMRMLNodeComboBox.h), CTK (ctkPathLineEdit.h) and Qt 5.15.
SIGNALS = {
    "QPushButton": {"clicked()", "clicked(bool)", "toggled(bool)", "pressed()", "released()"},
    "ctkPathLineEdit": {"currentPathChanged(QString)", "validInputChanged(bool)"},
    "qMRMLTableView": {"selectionChanged()", "mrmlSceneChanged(vtkMRMLScene*)"},
    "qMRMLNodeComboBox": {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)",
                          "currentNodeIDChanged(QString)", "nodeAdded(vtkMRMLNode*)"},
    "QListWidget": {"itemSelectionChanged()", "currentRowChanged(int)"},
}
# The background-run mixin (SubjectFingerprintLib/process.py) uses these in both panels.
MIXIN_WIDGETS = {"progressBar": "QProgressBar", "statusLabel": "QLabel"}


def panel_source(module):
    return REPO / module / f"{module}Lib" / "widget.py"


def panel_constant(module, name):
    """A literal assigned at the panel file's top level or in one of its classes' bodies."""
    tree = ast.parse(panel_source(module).read_text())
    bodies = [tree.body] + [n.body for n in tree.body if isinstance(n, ast.ClassDef)]
    for node in (n for body in bodies for n in body):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not defined in {panel_source(module)}")


def ui_uses(module):
    """(names used as self.ui.<name>, [(name, signal) for each self.ui.<name>.connect("signal", ...)])."""
    tree = ast.parse(panel_source(module).read_text())
    used, connects = set(), []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            used.add(node.attr)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                and isinstance(node.func.value, ast.Attribute) and isinstance(node.func.value.value, ast.Attribute)
                and node.func.value.value.attr == "ui"):
            assert isinstance(node.args[0], ast.Constant), "connect() with a signal that is not a literal"
            connects.append((node.func.value.attr, node.args[0].value))
    return used, connects


@pytest.mark.parametrize("module", MODULES)
def test_every_ui_name_used_by_the_panel_exists_with_its_class(module):
    declared = dict(panel_constant(module, "UI_WIDGETS"))
    used, _ = ui_uses(module)
    assert used, "the panel uses no self.ui names?"
    assert used - set(declared) == set(), f"used but not declared in UI_WIDGETS: {sorted(used - set(declared))}"
    assert set(panel_constant(module, "PATH_PARAMETERS")) <= set(declared)
    declared.update(MIXIN_WIDGETS)
    in_ui = widget_names(module)
    for name, cls in declared.items():
        assert name in in_ui, f"{name} is used by {module}Lib/widget.py but not in the .ui"
        assert in_ui[name].get("class") == cls, f"{name}: the .ui has {in_ui[name].get('class')}, the code expects {cls}"


@pytest.mark.parametrize("module", MODULES)
def test_every_connected_signal_exists_for_the_widget_class(module):
    declared = panel_constant(module, "UI_WIDGETS")
    _, connects = ui_uses(module)
    assert connects
    for name, signal in connects:
        cls = declared[name]
        assert signal in SIGNALS.get(cls, set()), f"{name} ({cls}) has no signal {signal} in Slicer 5.8+"


def test_the_result_view_uses_nothing_python_cannot_call():
    """qMRMLTableModel.mrmlTableRowIndex is neither a slot nor Q_INVOKABLE, so PythonQt does not
    expose it; selectedRows() lists only fully selected rows."""
    for path in (REPO / "SubjectFingerprint").rglob("*.py"):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        assert ".mrmlTableRowIndex(" not in code, path
        assert ".selectedRows()" not in code, path


@pytest.mark.parametrize("module", MODULES)
def test_parameter_names_in_ui_match_the_parameter_node(module):
    tree = ast.parse((REPO / module / f"{module}Lib" / "logic.py").read_text())
    wrapped = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
               and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in n.decorator_list)]
    assert len(wrapped) == 1
    fields = {s.target.id for s in wrapped[0].body if isinstance(s, ast.AnnAssign)}
    bound = set()
    for w in widget_names(module).values():
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound.add(p.find("string").text)
    assert bound and bound <= fields, f"unknown parameter names in the .ui: {bound - fields}"
    # the paths are parameters too (a saved scene restores them), kept in sync by the panel
    assert set(panel_constant(module, "PATH_PARAMETERS").values()) <= fields


@pytest.mark.parametrize("module", MODULES)
def test_module_file_is_thin(module):
    """The module file holds the module class, a widget hosting the Lib's panel and a test: no Logic."""
    path = REPO / module / f"{module}.py"
    tree = ast.parse(path.read_text())
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    assert classes == [module, f"{module}Widget", f"{module}Test"]
    assert len(path.read_text().splitlines()) < 130


@pytest.mark.parametrize("module", MODULES)
def test_categories_use_the_core_module_translation_context(module):
    text = (REPO / module / f"{module}.py").read_text()
    assert 'categories = [translate("qSlicerAbstractCoreModule", "Utilities")]' in text
    assert "DOCUMENTATION_URL" in text and "acknowledgementText" in text and "contributors" in text


def test_one_background_run_widget_mixin():
    text = "\n".join(p.read_text() for p in REPO.glob("*/*Lib/*.py"))
    assert text.count("class BackgroundRunWidgetMixin") == 1
    assert "QTimer()" in (REPO / "SubjectFingerprint" / "SubjectFingerprintLib" / "process.py").read_text()
    for module in MODULES:
        assert "qt.QTimer" not in panel_source(module).read_text()
        assert "BackgroundRunWidgetMixin" in panel_source(module).read_text()


def test_one_path_parameters_widget_mixin():
    """The parameter-node plumbing lives in SubjectFingerprintLib/pathparameters.py only."""
    text = "\n".join(p.read_text() for p in REPO.glob("*/*Lib/*.py"))
    assert text.count("class PathParametersWidgetMixin") == 1
    for module in MODULES:
        source = panel_source(module).read_text()
        assert "PathParametersWidgetMixin" in source
        for method in ("initializeParameterNode", "setParameterNode", "onParameterNodeModified", "onPathsChanged"):
            assert f"def {method}(" not in source, f"{module}Lib/widget.py defines {method} again"


def test_vector_volumes_are_offered_in_the_volume_selector():
    combo = widget_names("SubjectFingerprint")["inputVolumeSelector"]
    props = {p.get("name"): p for p in combo.findall("property")}
    assert props["showChildNodeTypes"].find("bool").text == "true"
    assert [s.text for s in props["hideChildNodeTypes"].iter("string")] == ["vtkMRMLLabelMapVolumeNode"]


@pytest.mark.parametrize("module,package", MODULES.items())
def test_every_python_file_is_listed_in_cmake(module, package):
    folder = REPO / module
    on_disk = {p.relative_to(folder).as_posix() for p in folder.glob("*.py")}
    on_disk |= {p.relative_to(folder).as_posix() for p in (folder / f"{module}Lib").glob("*.py")}
    on_disk |= {p.relative_to(folder).as_posix() for p in (folder / package).rglob("*.py")}
    listed = cmake_list(module, "MODULE_PYTHON_SCRIPTS")
    assert on_disk - listed == set(), f"not in {module}/CMakeLists.txt: {sorted(on_disk - listed)}"
    assert listed - on_disk == set(), f"listed but missing: {sorted(listed - on_disk)}"


@pytest.mark.parametrize("module,package", MODULES.items())
def test_every_resource_is_listed_in_cmake(module, package):
    folder = REPO / module
    on_disk = {p.relative_to(folder).as_posix() for p in (folder / "Resources").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    # package data that is not Python (templates, py.typed, ...)
    on_disk |= {p.relative_to(folder).as_posix() for p in (folder / package).rglob("*")
                if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    listed = cmake_list(module, "MODULE_PYTHON_RESOURCES")
    assert on_disk - listed == set(), f"not in {module}/CMakeLists.txt: {sorted(on_disk - listed)}"
    assert listed - on_disk == set(), f"listed but missing: {sorted(listed - on_disk)}"


def test_top_level_cmake_is_an_extension():
    text = (REPO / "CMakeLists.txt").read_text()
    assert "project(SubjectFingerprint)" in text
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(r"set\(" + key + r" \"[^\"]+\"\)", text), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    for module in MODULES:
        assert f"add_subdirectory({module})" in text
        module_text = (REPO / module / "CMakeLists.txt").read_text()
        assert "WITH_GENERIC_TESTS" in module_text
        assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module_text
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text
    from PIL import Image

    assert Image.open(REPO / "Resources" / "SubjectFingerprint.png").size == (128, 128)
    # EXTENSION_SCREENSHOTURLS names a file that exists (rendered by Resources/Screenshots/render_panel.py)
    shot = re.search(r'EXTENSION_SCREENSHOTURLS "[^"]*/main/(Resources/[^"]+)"', text).group(1)
    assert Image.open(REPO / shot).size[0] >= 400


@pytest.mark.parametrize("module", MODULES)
def test_module_file_imports_nothing_heavy_at_module_scope(module):
    """A Slicer without torch must import the module: no torch/monai/engine import at file scope."""
    heavy = {"torch", "monai", "subject_fingerprint", "fingerprint_training", "h5py", "pydicom", "numpy"}
    files = [REPO / module / f"{module}.py"] + sorted((REPO / module / f"{module}Lib").glob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            top = {n.split(".")[0] for n in names}
            allowed_numpy = path.name == "volumes.py"  # numpy ships with Slicer
            bad = top & (heavy - ({"numpy"} if allowed_numpy else set()))
            assert not bad, f"{path.name} imports {bad} at module scope"


@pytest.mark.parametrize("module", MODULES)
def test_reload_reloads_every_lib_file(module):
    """The Reload button re-imports every Lib file (Slicer's own Reload only re-reads the module file)."""
    tree = ast.parse((REPO / module / f"{module}.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "reloadLib"]
    assert len(calls) == 1
    package, order = ast.literal_eval(calls[0].args[0]), ast.literal_eval(calls[0].args[1])
    assert package == f"{module}Lib"
    on_disk = {p.stem for p in (REPO / module / package).glob("*.py")} - {"__init__"}
    assert set(order) == on_disk

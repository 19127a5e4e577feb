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


@pytest.mark.parametrize("module", MODULES)
def test_every_ui_name_used_by_the_widget_exists(module):
    tree = ast.parse((REPO / module / f"{module}.py").read_text())
    used = set()
    for node in ast.walk(tree):
        # self.ui.<name>
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            used.add(node.attr)
    assert used, "the widget uses no self.ui names?"
    missing = used - set(widget_names(module))
    assert not missing, f"used by {module}.py but not in the .ui: {sorted(missing)}"


@pytest.mark.parametrize("module", MODULES)
def test_parameter_names_in_ui_match_the_parameter_node(module):
    tree = ast.parse((REPO / module / f"{module}.py").read_text())
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

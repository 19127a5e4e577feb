"""Render the SubjectFingerprint panel from its .ui into Resources/Screenshot01.png, without Slicer.

Qt for Python (PySide6 from PyPI) loads the .ui with Slicer's and CTK's custom widgets replaced
by the nearest plain Qt widget (ctkCollapsibleButton -> QGroupBox, ctkPathLineEdit -> QLineEdit,
qMRMLNodeComboBox -> QComboBox, qMRMLTableView -> QTableWidget, qMRMLWidget -> QWidget), so
the layout is the module's own but the look is plain Qt, not Slicer's. The results table is
filled by a real lookup: the bundled starter model, a library of the bundled chest X-rays, and
one of them as the query. Runs headless (QT_QPA_PLATFORM=offscreen, or under Xvfb):

    pip install --target runs/pyside6 PySide6-Essentials     # or: pip install ".[screenshot]"
    PYTHONPATH=runs/pyside6:SubjectFingerprint QT_QPA_PLATFORM=offscreen python Resources/Screenshots/render_panel.py
"""

import os
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UI = REPO / "SubjectFingerprint" / "Resources" / "UI" / "SubjectFingerprint.ui"
OUT = REPO / "Resources" / "Screenshot01.png"
PLACEHOLDERS = {"qMRMLWidget": "QWidget", "ctkCollapsibleButton": "QGroupBox", "ctkPathLineEdit": "QLineEdit",
                "qMRMLNodeComboBox": "QComboBox", "qMRMLTableView": "QTableWidget"}
# Properties only Slicer's widgets have; plain Qt would warn about them.
SLICER_ONLY = {"nodeTypes", "showChildNodeTypes", "hideChildNodeTypes", "addEnabled", "removeEnabled",
               "noneEnabled", "filters", "nameFilters", "collapsed", "SlicerParameterName", "showHidden",
               "renameEnabled", "editEnabled", "selectNodeUponCreation", "noneDisplay", "sizeAdjustPolicy"}


def plain_qt_ui() -> bytes:
    root = ET.parse(UI).getroot()
    for tag in ("customwidgets", "connections"):  # Slicer's classes and their MRML signals
        for element in root.findall(tag):
            root.remove(element)
    for widget in root.iter("widget"):
        cls = widget.get("class")
        if cls in PLACEHOLDERS:
            widget.set("class", PLACEHOLDERS[cls])
            if cls == "ctkCollapsibleButton":
                for prop in widget.findall("property"):
                    if prop.get("name") == "text":
                        prop.set("name", "title")
        for prop in list(widget.findall("property")):
            if prop.get("name") in SLICER_ONLY:
                widget.remove(prop)
    return ET.tostring(root)


def real_lookup():
    """A real lookup with the bundled starter model: one bundled chest X-ray against a library of
    the other bundled ones (the query itself left out, so its subject must be found by its other images)."""
    import shutil

    from subject_fingerprint import lookup

    images = REPO / "Resources" / "SampleData" / "cxr"
    work = Path(tempfile.mkdtemp())
    shutil.copytree(images, work / "cxr")
    query = work / "query.png"
    (work / "cxr" / "images" / "nih47__00000047_003.png").rename(query)
    manifest = work / "cxr" / "manifest.csv"
    manifest.write_text("".join(line for line in manifest.read_text().splitlines(True)
                                if "nih47__00000047_003.png" not in line))
    library = work / "cxr.h5"
    lookup.index([work / "cxr"], library, dataset="sample-cxr", progress=False, device="cpu")
    result = lookup.query([str(query)], library, k=5, device="cpu")[0]
    shutil.rmtree(work)
    return Path("nih47__00000047_003.png"), result.subjects


def main() -> int:
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import (QApplication, QComboBox, QLabel, QLineEdit, QProgressBar, QTableWidget,
                                   QTableWidgetItem, QWidget)

    app = QApplication.instance() or QApplication(sys.argv)
    data = QByteArray(plain_qt_ui())
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    panel = QUiLoader().load(buffer)
    query, subjects = real_lookup()
    panel.findChild(QComboBox, "inputVolumeSelector").addItem(query.stem)
    panel.findChild(QLineEdit, "libraryPathLineEdit").setText("~/fingerprints/sample-cxr.h5")
    panel.findChild(QLabel, "statusLabel").setText(f"{len(subjects)} candidates for {query.stem}")
    table = panel.findChild(QTableWidget, "resultsTableView")
    headers = ["Rank", "Subject", "Dataset", "Image", "Distance", "Same-subject probability"]
    table.setColumnCount(len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.setRowCount(len(subjects))
    for r, m in enumerate(subjects):
        values = [m.rank, m.subject_id, m.dataset, m.image_id, f"{m.distance:.4f}",
                  "" if m.probability is None else f"{m.probability:.3f}"]
        for c, value in enumerate(values):
            table.setItem(r, c, QTableWidgetItem(str(value)))
    table.resizeColumnsToContents()
    panel.findChild(QProgressBar, "progressBar").setVisible(False)
    for name in ("findMatchesButton", "addToLibraryButton"):
        panel.findChild(QWidget, name).setEnabled(name == "findMatchesButton")
    panel.resize(640, 900)
    panel.show()
    app.processEvents()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(OUT)):
        print(f"could not write {OUT}", file=sys.stderr)
        return 1
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.exit(main())

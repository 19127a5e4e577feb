"""Which table row a click on the results view means (defect: clicking a row did nothing).

The view is a stand-in with only what PythonQt exposes of qMRMLTableView (currentIndex,
isSortingEnabled, sortFilterProxyModel, and a tableModel without mrmlTableRowIndex); the
table is a real vtkMRMLTableNode filled by the module.
"""

import types

import pytest

slicer = pytest.importorskip("slicer")
import slicer_harness  # noqa: E402

ROWS = [{"rank": r, "subject": f"s{r}", "dataset": "d", "image": f"i{r}", "distance": 0.1 * r,
         "probability": None, "source": f"/data/s{r}.png"} for r in (1, 2, 3)]


class Index:
    def __init__(self, row, valid=True):
        self._row, self._valid = row, valid

    def row(self):
        return self._row

    def isValid(self):
        return self._valid


class Proxy:
    """A sorted proxy: view row r shows source row order[r]."""

    def __init__(self, order):
        self.order = order

    def mapToSource(self, index):
        return Index(self.order[index.row()])


class View:
    def __init__(self, current, sorting=False, order=(0, 1, 2)):
        self.current, self.sorting, self.proxy = current, sorting, Proxy(order)

    def currentIndex(self):
        return self.current

    def isSortingEnabled(self):
        return self.sorting

    def sortFilterProxyModel(self):
        return self.proxy

    def selectionModel(self):  # a click selects one cell: no row is "fully selected"
        return types.SimpleNamespace(selectedRows=lambda: [])


@pytest.fixture()
def table():
    slicer_harness.install()
    slicer_harness.new_scene()
    from SubjectFingerprintLib.resultstable import rowsToTable

    return rowsToTable(ROWS, slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode"))


def test_a_click_on_any_cell_gives_its_row(table):
    from SubjectFingerprintLib.resultstable import clickedTableRow, tableToRows

    for row in range(3):
        assert clickedTableRow(View(Index(row)), table) == row
    assert tableToRows(table)[clickedTableRow(View(Index(2)), table)]["subject"] == "s3"


def test_sorted_view_maps_through_the_proxy_only_when_sorting_is_on(table):
    from SubjectFingerprintLib.resultstable import clickedTableRow

    assert clickedTableRow(View(Index(0), sorting=True, order=(2, 1, 0)), table) == 2
    assert clickedTableRow(View(Index(0), sorting=False, order=(2, 1, 0)), table) == 0


def test_no_current_index_or_header_row_gives_none(table):
    from SubjectFingerprintLib.resultstable import clickedTableRow, modelRowToTableRow

    assert clickedTableRow(View(Index(0, valid=False)), table) is None
    assert clickedTableRow(View(Index(7)), table) is None
    # Without column titles as header, qMRMLTableModel shows the names in model row 0.
    table.SetUseColumnTitleAsColumnHeader(False)
    assert modelRowToTableRow(0, table) is None
    assert modelRowToTableRow(1, table) == 0


def test_the_view_is_set_to_select_whole_rows(monkeypatch):
    """configureResultsView sets SelectRows and SingleSelection (the view never did)."""
    from SubjectFingerprintLib import resultstable

    fake_qt = types.SimpleNamespace(QAbstractItemView=types.SimpleNamespace(SelectRows="rows", SingleSelection="one"))
    monkeypatch.setitem(__import__("sys").modules, "qt", fake_qt)
    calls = {}
    view = types.SimpleNamespace(setSelectionBehavior=lambda v: calls.setdefault("behaviour", v),
                                 setSelectionMode=lambda v: calls.setdefault("mode", v))
    resultstable.configureResultsView(view)
    assert calls == {"behaviour": "rows", "mode": "one"}


def test_rows_carry_the_source_from_the_ranking():
    """resultRows takes each subject's file from SubjectMatch (no library column is read again)."""
    from SubjectFingerprintLib.resultstable import resultRows
    from subject_fingerprint.search import QueryResult, SubjectMatch

    result = QueryResult(subjects=[SubjectMatch(1, "s1", "d", 0.5, None, "img1", "/data/s1/img1.png")])
    assert resultRows(result)[0]["source"] == "/data/s1/img1.png"

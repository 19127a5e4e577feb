"""The results table: findMatches rows <-> a vtkMRMLTableNode, and which row the user clicked.

``qMRMLTableModel.mrmlTableRowIndex`` is not exposed to Python (it is neither a slot nor
Q_INVOKABLE in Slicer 5.8 to current), and ``selectedRows()`` only lists fully selected
rows, so the clicked row is read from the view's current index and mapped here with the
same rule qMRMLTableModel uses.
"""

from typing import List, Optional, Sequence

RESULT_COLUMNS = ("rank", "subject", "dataset", "image", "distance", "probability", "source")
HIDDEN_COLUMNS = ("source",)
COLUMN_TITLES = {"rank": "Rank", "subject": "Subject", "dataset": "Dataset", "image": "Image",
                 "distance": "Distance", "probability": "Same-subject probability", "source": "Source"}


def resultRows(result) -> List[dict]:
    """One dict per candidate subject of a ``QueryResult``, closest first.

    The image shown for a subject is its closest image; its file comes with the match
    (``SubjectMatch.source``), so no library column is read again here.
    """
    rows = []
    for match in result.subjects:
        rows.append({"rank": int(match.rank), "subject": match.subject_id, "dataset": match.dataset,
                     "image": match.image_id, "distance": float(match.distance),
                     "probability": None if match.probability is None else float(match.probability),
                     "source": getattr(match, "source", "") or ""})
    return rows


def rowsToTable(rows: Sequence[dict], tableNode):
    """Fill ``tableNode`` (a vtkMRMLTableNode) with typed columns; returns it.

    A missing probability (uncalibrated model) is stored as NaN and shown as such.
    """
    import vtk

    wasModifying = tableNode.StartModify()
    try:
        tableNode.RemoveAllColumns()
        table = tableNode.GetTable()
        kinds = {"rank": vtk.vtkIntArray, "distance": vtk.vtkDoubleArray, "probability": vtk.vtkDoubleArray}
        arrays = {}
        for name in RESULT_COLUMNS:
            array = kinds.get(name, vtk.vtkStringArray)()
            array.SetName(name)
            arrays[name] = array
        for row in rows:
            for name, array in arrays.items():
                value = row.get(name)
                if name == "probability" and value is None:
                    value = float("nan")
                if isinstance(array, vtk.vtkStringArray):
                    array.InsertNextValue("" if value is None else str(value))
                else:
                    array.InsertNextValue(value)
        for name in RESULT_COLUMNS:
            table.AddColumn(arrays[name])
        # Column titles are the view's header (otherwise the first row would be shown as header).
        tableNode.SetUseColumnTitleAsColumnHeader(True)
        for name, title in COLUMN_TITLES.items():
            tableNode.SetColumnTitle(name, title)
        tableNode.SetLocked(True)
        table.Modified()
    finally:
        tableNode.EndModify(wasModifying)
    return tableNode


def tableToRows(tableNode) -> List[dict]:
    """The rows of a results table as dicts (inverse of ``rowsToTable``)."""
    table = tableNode.GetTable()
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for name in RESULT_COLUMNS:
            column = table.GetColumnByName(name)
            if column is None:
                continue
            value = column.GetValue(r)
            if name == "rank":
                value = int(value)
            elif name in ("distance", "probability"):
                value = float(value)
                if name == "probability" and value != value:
                    value = None
            row[name] = value
        rows.append(row)
    return rows


def modelRowToTableRow(modelRow: int, tableNode) -> Optional[int]:
    """qMRMLTableModel::mrmlTableRowIndex for a non-transposed view; None outside the table.

    With column titles as the header every model row is a table row; otherwise the model's
    first row shows the column names.
    """
    if tableNode is None or modelRow is None or modelRow < 0:
        return None
    row = modelRow if tableNode.GetUseColumnTitleAsColumnHeader() else modelRow - 1
    return row if 0 <= row < tableNode.GetNumberOfRows() else None


def configureResultsView(view) -> None:
    """Whole-row, single selection, so that a click anywhere in a row selects that candidate."""
    import qt

    view.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
    view.setSelectionMode(qt.QAbstractItemView.SingleSelection)


def clickedTableRow(view, tableNode) -> Optional[int]:
    """The table row of the view's current index (through the sort proxy only when sorting is on)."""
    index = view.currentIndex()
    if index is None or not index.isValid():
        return None
    if view.isSortingEnabled():
        index = view.sortFilterProxyModel().mapToSource(index)
    return modelRowToTableRow(index.row(), tableNode)

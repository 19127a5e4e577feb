"""Between Slicer volume/table nodes and the engine's images and results.

The engine's arrays are (rows, cols) for 2D and (z, y, x) in LPS for 3D, the layout its
own readers produce, so a volume loaded in Slicer embeds like the same file read by the engine.
numpy is the only non-Slicer import; the engine's ``records`` module is imported lazily.
"""

import os
from typing import List, Optional, Sequence

import numpy as np

RESULT_COLUMNS = ("rank", "subject", "dataset", "image", "distance", "probability", "source")
HIDDEN_COLUMNS = ("source",)
COLUMN_TITLES = {"rank": "Rank", "subject": "Subject", "dataset": "Dataset", "image": "Image",
                 "distance": "Distance", "probability": "Same-subject probability", "source": "Source"}


def ijkToLpsMatrix(volumeNode) -> np.ndarray:
    """The 3x3 direction*spacing matrix of the volume, in LPS (Slicer stores RAS)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    ras = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    return np.diag([-1.0, -1.0, 1.0]) @ ras


def volumeArrayToLps(array_kji: np.ndarray, ijkToLps: np.ndarray):
    """Reorder a Slicer (k, j, i) array to (z, y, x) with x along L, y along P, z along S.

    Each voxel axis goes to the LPS axis it is closest to (as ITK's DICOMOrient does);
    returns ``(array_zyx, spacing_zyx)``.
    """
    arr_ijk = np.asarray(array_kji).transpose(2, 1, 0)
    columns = ijkToLps.T  # row a = direction*spacing of voxel axis a
    target = [int(np.argmax(np.abs(c))) for c in columns]
    if sorted(target) != [0, 1, 2]:
        raise ValueError("the volume's axes are not a rotation of LPS (degenerate IJK to RAS matrix)")
    perm = [target.index(t) for t in range(3)]  # voxel axis that becomes x, y, z
    arr_xyz = arr_ijk.transpose(perm)
    spacing_xyz = []
    for t, a in enumerate(perm):
        if columns[a][t] < 0:
            arr_xyz = np.flip(arr_xyz, axis=t)
        spacing_xyz.append(float(np.linalg.norm(columns[a])))
    return np.ascontiguousarray(arr_xyz.transpose(2, 1, 0)), tuple(reversed(spacing_xyz))


def volumeSourcePath(volumeNode) -> str:
    """The file the volume was loaded from, or "" for a volume made in the scene."""
    storage = volumeNode.GetStorageNode() if volumeNode is not None else None
    return (storage.GetFileName() or "") if storage is not None else ""


def volumeModality(volumeNode) -> str:
    """The volume's DICOM modality, so that the model can refuse an image of the wrong kind.

    Looked up, in order: a "DICOM.Modality" attribute, Slicer's DICOM database (volumes loaded
    by the DICOM module carry their instance UIDs), the header of the file it was loaded from.
    "" when unknown (NRRD, NIfTI, PNG): the model then accepts it.
    """
    for attribute in ("DICOM.Modality", "Modality"):
        value = volumeNode.GetAttribute(attribute)
        if value:
            return value
    uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
    try:
        import slicer

        database = getattr(slicer, "dicomDatabase", None)
        if uids and database:
            value = database.fileValue(database.fileForInstance(uids[0]), "0008,0060")
            if value:
                return value
    except Exception:  # no database or an unknown instance: fall through
        pass
    path = volumeSourcePath(volumeNode)
    if path and os.path.isfile(path) and not path.lower().endswith((".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha",
                                                                    ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff")):
        try:
            import pydicom

            return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality", ""))
        except Exception:  # not DICOM, or no pydicom
            pass
    return ""


def volumeToLoadedImage(volumeNode, subjectId: str = "", imageId: str = "", modality: Optional[str] = None,
                        dataset: str = ""):
    """A scalar volume node as the engine's ``LoadedImage``.

    A volume with one slice becomes a 2D image (rows, cols); anything else a 3D (z, y, x)
    volume in LPS. Multi-component (RGB) volumes are averaged to grey.
    """
    import slicer
    from subject_fingerprint.records import ImageRecord, LoadedImage

    if volumeNode is None or volumeNode.GetImageData() is None:
        raise ValueError("select a volume that has image data")
    array = slicer.util.arrayFromVolume(volumeNode)
    if array.ndim == 4:  # (k, j, i, components)
        array = array.mean(axis=-1)
    array, spacing = volumeArrayToLps(array, ijkToLpsMatrix(volumeNode))
    singleton = [axis for axis, n in enumerate(array.shape) if n == 1]
    if singleton and array.ndim == 3 and min(array.shape) == 1:
        axis = singleton[0]
        array = np.squeeze(array, axis=axis)
        spacing = tuple(s for a, s in enumerate(spacing) if a != axis)
    source = volumeSourcePath(volumeNode) or volumeNode.GetName()
    record = ImageRecord(source=source, subject_id=subjectId,
                         image_id=imageId or os.path.basename(source) or volumeNode.GetName(),
                         modality=volumeModality(volumeNode) if modality is None else modality,
                         dataset=dataset)
    return LoadedImage(array=array.astype(np.float32, copy=False), spacing=tuple(spacing), record=record)


def resultRows(result, sourceLookup=None) -> List[dict]:
    """One dict per candidate subject of a ``QueryResult``, closest first.

    The image shown for a subject is its closest image; its file path comes from the
    result's image list, or ``sourceLookup(subject_id, image_id)`` when not listed there.
    """
    sources = {(m.subject_id, m.image_id): m.source for m in result.images}
    rows = []
    for match in result.subjects:
        source = sources.get((match.subject_id, match.image_id))
        if source is None and sourceLookup is not None:
            source = sourceLookup(match.subject_id, match.image_id)
        rows.append({"rank": int(match.rank), "subject": match.subject_id, "dataset": match.dataset,
                     "image": match.image_id, "distance": float(match.distance),
                     "probability": None if match.probability is None else float(match.probability),
                     "source": source or ""})
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

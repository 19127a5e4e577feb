"""Volume I/O between Slicer and the engine: volume nodes to engine images and files to nodes.

A volume node goes to the engine as ``sitkUtils.PullVolumeFromSlicer`` would give it (a
SimpleITK image with the node's spacing, origin and direction in LPS) and then through the
engine's own ``to_array``, so a volume loaded in Slicer embeds exactly like the same file read
by the engine. Images the engine reads (DICOM folders, X-ray DICOM with LUTs) come back as
volume nodes with display nodes and their full geometry, as ``slicer.util.addVolumeFromArray``
makes them. numpy is the only non-Slicer import at module scope.
"""

import os
from typing import Optional

import numpy as np

SOURCE_ATTRIBUTE = "SubjectFingerprint.source"
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])
# Weights the engine's raster and volume readers use for colour images.
_LUMINANCE = np.array([0.299, 0.587, 0.114])


def _matrix3(vtkMatrix) -> np.ndarray:
    return np.array([[vtkMatrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volumeNodeToSitkImage(volumeNode):
    """The node's voxels as a 3D SimpleITK image in LPS (what ``PullVolumeFromSlicer`` gives).

    Vector volumes (RGB) become grey with the engine's luminance weights.
    """
    import SimpleITK as sitk
    import slicer
    import vtk

    if volumeNode is None or volumeNode.GetImageData() is None:
        raise ValueError("select a volume that has image data")
    array = slicer.util.arrayFromVolume(volumeNode)  # (k, j, i) or (k, j, i, components)
    if array.ndim == 4:
        array = array[..., :3] @ _LUMINANCE[: array.shape[-1]] if array.shape[-1] >= 3 else array[..., 0]
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    ijkToLps = _RAS_FROM_LPS @ _matrix3(matrix)[:3, :]
    columns = ijkToLps[:, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"{volumeNode.GetName()}: degenerate IJK to RAS matrix (zero spacing)")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in ijkToLps[:, 3]])
    image.SetDirection([float(v) for v in (columns / spacing).ravel()])
    return image


def volumeToArray(volumeNode):
    """``(array, spacing)`` in the engine's layout: (rows, cols) for one slice, else (z, y, x) LPS."""
    from subject_fingerprint.io.volumes import to_array

    return to_array(volumeNodeToSitkImage(volumeNode), volumeNode.GetName())


def volumeSourcePath(volumeNode) -> str:
    """The file the volume was loaded from, or "" for a volume made in the scene."""
    if volumeNode is None:
        return ""
    attribute = volumeNode.GetAttribute(SOURCE_ATTRIBUTE)
    if attribute:
        return attribute
    storage = volumeNode.GetStorageNode()
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
    """A volume node as the engine's ``LoadedImage`` (see ``volumeToArray``)."""
    from subject_fingerprint.records import ImageRecord, LoadedImage

    array, spacing = volumeToArray(volumeNode)
    source = volumeSourcePath(volumeNode) or volumeNode.GetName()
    record = ImageRecord(source=source, subject_id=subjectId,
                         image_id=imageId or os.path.basename(source) or volumeNode.GetName(),
                         modality=volumeModality(volumeNode) if modality is None else modality,
                         dataset=dataset)
    return LoadedImage(array=array.astype(np.float32, copy=False), spacing=tuple(spacing), record=record)


# -- files to volume nodes ---------------------------------------------------------------------

def sitkImageToVolumeNode(image, name: str = ""):
    """A SimpleITK image (2D or 3D, LPS world) as a new scalar volume node with display nodes."""
    import SimpleITK as sitk
    import slicer

    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    spacing = np.array(image.GetSpacing(), float)
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    ijkToRAS = np.eye(4)
    ijkToRAS[:3, :3] = _RAS_FROM_LPS @ direction @ np.diag(spacing)
    ijkToRAS[:3, 3] = _RAS_FROM_LPS @ np.array(image.GetOrigin(), float)
    array = sitk.GetArrayFromImage(image)
    return slicer.util.addVolumeFromArray(np.ascontiguousarray(array), ijkToRAS=ijkToRAS, name=name)


def _engineSitkImage(path: str):
    """What the engine reads at ``path`` as a SimpleITK image with as much geometry as it has."""
    import SimpleITK as sitk
    from subject_fingerprint.io import dicom, read_image

    if os.path.isdir(path):
        return dicom.read_series(dicom.series_files_in_folder(path))
    if dicom.is_dicom_file(path):
        info = dicom.header_info(path)
        if info.frames > 1 and info.enhanced and info.modality in dicom.VOLUME_MODALITIES:
            return dicom.read_enhanced(path)
        if info.is_slice:
            return dicom.read_series([path])
    loaded = read_image(path)  # projections, rasters, anything else: LPS-aligned pixels
    image = sitk.GetImageFromArray(np.ascontiguousarray(loaded.array, dtype=np.float32))
    image.SetSpacing([float(s) for s in reversed(loaded.spacing)])
    return image


def readWithEngine(path: str, name: str = ""):
    """Read ``path`` (file or DICOM series folder) with the engine into a new volume node."""
    node = sitkImageToVolumeNode(_engineSitkImage(str(path)), name or stem(path))
    node.SetAttribute(SOURCE_ATTRIBUTE, str(path))
    return node


def readWithArchetype(path: str, name: str = ""):
    """Read a file with Slicer's volume archetype storage node (no application needed)."""
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetSingleFile(True)
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                              slicer.mrmlScene.GenerateUniqueName(name or stem(path)))
    if not storage.ReadData(node):
        slicer.mrmlScene.RemoveNode(node)
        return None
    slicer.mrmlScene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def findLoadedVolume(path: str):
    """A volume node already loaded from ``path`` by ``loadVolumeFile``, or None."""
    import slicer

    path = os.path.abspath(str(path))
    for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
        if node.GetAttribute(SOURCE_ATTRIBUTE) == path:
            return node
    return None


def loadVolumeFile(path: str, name: Optional[str] = None, reuse: bool = True):
    """Load an image file (or a DICOM series folder) as a volume node with display nodes.

    In Slicer this is ``slicer.util.loadVolume``; without Slicer's application (batch tests,
    slicer-core) the archetype reader. What they cannot read (DICOM series folders, X-ray DICOM
    with LUTs, files ITK cannot open) is read by the engine. With ``reuse`` a file loaded
    before is not loaded again: its node is returned.
    """
    import slicer

    path = os.path.abspath(str(path))
    node = findLoadedVolume(path) if reuse else None
    if node is not None:
        return node
    if os.path.isfile(path):
        if hasattr(slicer, "app"):
            try:
                node = slicer.util.loadVolume(path, properties={"singleFile": True, "show": False})
            except Exception:  # loadVolume raises when no reader takes the file
                node = None
        else:
            node = readWithArchetype(path)
    if node is None:
        node = readWithEngine(path)
    node.SetAttribute(SOURCE_ATTRIBUTE, path)
    if name:
        node.SetName(name)
    return node


def stem(path: str) -> str:
    name = os.path.basename(os.path.normpath(str(path)))
    for ext in (".nii.gz", ".seg.nrrd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0] or name

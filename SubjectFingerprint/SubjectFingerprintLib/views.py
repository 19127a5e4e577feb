"""Showing two volumes side by side in the Red and Yellow slice views, in the same plane."""

from typing import Optional

# RAS axis a slice is perpendicular to -> Slicer's name for that plane.
_PLANE_OF_NORMAL = {0: "Sagittal", 1: "Coronal", 2: "Axial"}


def singleSlicePlane(volumeNode) -> Optional[str]:
    """The plane a one-slice volume lies in (from its IJK to RAS directions), else None."""
    import numpy as np
    import vtk

    image = volumeNode.GetImageData() if volumeNode is not None else None
    if image is None:
        return None
    dims = image.GetDimensions()
    if 1 not in dims or sorted(dims)[1] == 1:
        return None  # a volume, or a line: no one plane
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    axis = dims.index(1)
    column = np.array([matrix.GetElement(r, axis) for r in range(3)])
    return _PLANE_OF_NORMAL[int(np.argmax(np.abs(column)))]


def sideBySideOrientation(leftNode, rightNode) -> str:
    """One orientation for both views: the plane of a one-slice image (X-ray), else axial."""
    for node in (leftNode, rightNode):
        plane = singleSlicePlane(node)
        if plane:
            return plane
    return "Axial"


def showSideBySide(leftNode, rightNode) -> None:
    """``leftNode`` in the Red view, ``rightNode`` in the Yellow one, same plane, each filling its view."""
    import slicer

    if not hasattr(slicer, "app") or slicer.app.layoutManager() is None:
        return  # batch mode or tests: nothing to show
    layoutManager = slicer.app.layoutManager()
    layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    orientation = sideBySideOrientation(leftNode, rightNode)
    for viewName, node in (("Red", leftNode), ("Yellow", rightNode)):
        if node is None:
            continue
        sliceWidget = layoutManager.sliceWidget(viewName)
        composite = sliceWidget.mrmlSliceCompositeNode()
        composite.SetLinkedControl(False)
        composite.SetBackgroundVolumeID(node.GetID())
        sliceNode = sliceWidget.mrmlSliceNode()
        sliceNode.SetOrientation(orientation)
        sliceNode.RotateToVolumePlane(node)  # oblique or flipped volumes: face on, not resampled
        sliceWidget.sliceLogic().FitSliceToBackground()

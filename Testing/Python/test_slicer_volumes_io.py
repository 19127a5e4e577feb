"""Volume I/O between Slicer and the engine, against real MRML nodes (slicer-core).

Nodes made from what the engine reads get display nodes and keep origin and direction; a
volume loaded in Slicer gives the engine's array of the same file (2D and 3D, oblique too);
a candidate clicked twice is loaded once; side-by-side views get one plane.
"""

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")
import slicer_harness  # noqa: E402


@pytest.fixture(autouse=True)
def scene():
    slicer_harness.install()
    return slicer_harness.new_scene()


def ijk_to_ras(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_dicom_series_folder_gets_a_display_node_origin_and_direction(tmp_path):
    from dicom_factory import write_mr_series
    from SubjectFingerprintLib.volumes import loadVolumeFile

    volume = (np.random.default_rng(0).random((4, 6, 5)) * 1000).astype(np.int16)
    c, s = np.cos(0.3), np.sin(0.3)
    direction = [[c, -s, 0], [s, c, 0], [0, 0, 1]]  # rotated about S, columns = x, y, z in LPS
    write_mr_series(tmp_path / "series", volume, spacing=(3.0, 0.8, 0.7), direction=direction,
                    origin=(10.0, -20.0, 30.0))
    node = loadVolumeFile(str(tmp_path / "series"))  # a folder: read by the engine
    assert node.GetDisplayNode() is not None
    matrix = ijk_to_ras(node)
    assert np.allclose(matrix[:3, 3], [-10.0, 20.0, 30.0])  # LPS origin -> RAS
    lps_columns = np.diag([-1.0, -1.0, 1.0]) @ matrix[:3, :3]
    assert np.allclose(lps_columns, np.array(direction) @ np.diag([0.7, 0.8, 3.0]), atol=1e-6)
    assert np.allclose(node.GetSpacing(), (0.7, 0.8, 3.0))


def test_dicom_xray_read_by_the_engine_is_displayable(tmp_path):
    from dicom_factory import write_xray
    from SubjectFingerprintLib.volumes import readWithEngine, volumeToArray
    from subject_fingerprint.io import read_image

    pixels = (np.random.default_rng(1).random((20, 16)) * 4000).astype(np.uint16)
    path = write_xray(tmp_path / "cr.dcm", pixels, window=(2000, 3000))
    node = readWithEngine(str(path))
    assert node.GetDisplayNode() is not None
    array, spacing = volumeToArray(node)
    assert np.allclose(array, read_image(str(path)).array)


@pytest.mark.parametrize("shape,ijk_to_ras", [
    ((1, 12, 10), np.diag([-0.5, -0.5, 1.0, 1.0])),                          # a 2D image, LPS-aligned
    ((6, 12, 10), np.array([[1, 0, 0, 5], [0, 0.5, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1.0]])),  # RAS-aligned 3D
    ((5, 8, 7), np.array([[0, 0, -2.0, 1], [0.9, 0, 0, 2], [0, 1.1, 0, 3], [0, 0, 0, 1.0]])),  # permuted axes
])
def test_volume_in_slicer_gives_the_engines_array_of_the_same_file(tmp_path, shape, ijk_to_ras):
    """sitkUtils.PullVolumeFromSlicer's equivalent, then the engine's own to_array."""
    from SubjectFingerprintLib.volumes import loadVolumeFile, volumeToArray, volumeToLoadedImage
    from subject_fingerprint.io import read_image

    array = np.random.default_rng(0).random(shape).astype(np.float32)
    node = slicer.util.addVolumeFromArray(array, ijkToRAS=ijk_to_ras)
    path = tmp_path / "saved.nrrd"
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    reloaded = loadVolumeFile(str(path))
    engine = read_image(str(path))
    for n in (node, reloaded):
        mine, spacing = volumeToArray(n)
        assert mine.shape == engine.array.shape
        assert np.allclose(mine, engine.array)
        assert np.allclose(spacing, engine.spacing)
    assert volumeToLoadedImage(reloaded).record.source == str(path)


def test_png_loaded_in_slicer_gives_the_engines_2d_array(tmp_path):
    from SubjectFingerprintLib.volumes import loadVolumeFile, volumeToArray
    from subject_fingerprint.io import read_image

    array = (np.random.default_rng(2).random((30, 24)) * 255).astype(np.uint8)
    path = tmp_path / "x.png"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    node = loadVolumeFile(str(path))
    assert node.GetDisplayNode() is not None
    mine, _ = volumeToArray(node)
    assert mine.shape == (30, 24)
    assert np.array_equal(mine, read_image(str(path)).array)


def test_vector_volume_becomes_grey_like_the_engine(tmp_path):
    from SubjectFingerprintLib.volumes import volumeToArray

    rgb = np.random.default_rng(3).random((1, 6, 5, 3)).astype(np.float32)
    node = slicer.util.addVolumeFromArray(rgb, nodeClassName="vtkMRMLVectorVolumeNode")
    mine, _ = volumeToArray(node)
    expected = 0.299 * rgb[0, ..., 0] + 0.587 * rgb[0, ..., 1] + 0.114 * rgb[0, ..., 2]
    # identity IJK to RAS: in LPS both in-plane axes are reversed
    assert mine.shape == (6, 5) and np.allclose(mine, expected[::-1, ::-1])


def test_a_candidate_is_loaded_once(tmp_path):
    from SubjectFingerprintLib.volumes import loadVolumeFile

    path = tmp_path / "c.png"
    # Not constant: the engine refuses blank images.
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(64, dtype=np.uint8).reshape(8, 8)), str(path))
    first = loadVolumeFile(str(path), name="candidate 1")
    again = loadVolumeFile(str(path), name="candidate 1")
    assert again is first
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1


def test_side_by_side_uses_one_plane_for_both():
    from SubjectFingerprintLib.views import sideBySideOrientation, singleSlicePlane

    xray = slicer.util.addVolumeFromArray(np.zeros((1, 10, 8)))       # a one-slice image: axial plane
    coronal = slicer.util.addVolumeFromArray(np.zeros((10, 1, 8)))    # j has one voxel: coronal
    head = slicer.util.addVolumeFromArray(np.zeros((6, 10, 8)))
    assert singleSlicePlane(xray) == "Axial" and singleSlicePlane(coronal) == "Coronal"
    assert singleSlicePlane(head) is None
    assert sideBySideOrientation(head, coronal) == "Coronal"
    assert sideBySideOrientation(head, head) == "Axial"
    assert sideBySideOrientation(xray, head) == "Axial"


def test_show_side_by_side_sets_one_orientation_rotates_to_each_volume_and_fits(monkeypatch):
    """Red axial with Yellow sagittal was the old behaviour; both views now share the plane."""
    import types

    from SubjectFingerprintLib.views import showSideBySide

    calls = []

    class SliceNode:
        def __init__(self, view):
            self.view = view

        def SetOrientation(self, name):
            calls.append((self.view, "orientation", name))

        def RotateToVolumePlane(self, node):
            calls.append((self.view, "rotate", node.GetID()))

    class SliceWidget:
        def __init__(self, view):
            self.view, self.node = view, SliceNode(view)
            self.composite = types.SimpleNamespace(
                SetLinkedControl=lambda on: None,
                SetBackgroundVolumeID=lambda i: calls.append((view, "background", i)))

        def mrmlSliceCompositeNode(self):
            return self.composite

        def mrmlSliceNode(self):
            return self.node

        def sliceLogic(self):
            return types.SimpleNamespace(FitSliceToBackground=lambda: calls.append((self.view, "fit", None)))

    widgets = {name: SliceWidget(name) for name in ("Red", "Yellow")}
    layout = types.SimpleNamespace(setLayout=lambda n: calls.append(("layout", n, None)),
                                   sliceWidget=lambda name: widgets[name])
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(layoutManager=lambda: layout), raising=False)
    if not hasattr(slicer, "vtkMRMLLayoutNode"):
        pytest.skip("no vtkMRMLLayoutNode in this slicer-core")
    query = slicer.util.addVolumeFromArray(np.zeros((6, 10, 8)))
    candidate = slicer.util.addVolumeFromArray(np.zeros((10, 8, 1)))  # one voxel along i: sagittal
    showSideBySide(query, candidate)
    orientations = {c[2] for c in calls if c[1] == "orientation"}
    assert orientations == {"Sagittal"}
    assert ("Red", "rotate", query.GetID()) in calls and ("Yellow", "rotate", candidate.GetID()) in calls
    assert ("Red", "fit", None) in calls and ("Yellow", "fit", None) in calls

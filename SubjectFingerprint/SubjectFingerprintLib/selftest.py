"""The tests the module's SubjectFingerprintTest runs in a real Slicer (Reload and Test, ctest).

The same checks run under pytest against slicer-core (Testing/Python/test_slicer_*.py); these
add what only a full Slicer has: slicer.util.loadVolume, the layout and the slice views.
The engine parts are skipped when torch or MONAI is not installed.
"""

import importlib.util
import os
import tempfile


def engineInstalled() -> bool:
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("monai") is not None


def test_VolumeIO(case) -> None:
    """A saved volume loaded by Slicer gives the engine's array of the same file (2D and 3D)."""
    import numpy as np
    import slicer

    from SubjectFingerprintLib.volumes import volumeToArray

    if not engineInstalled():
        case.delayDisplay("torch/MONAI not installed: volume I/O test skipped")
        return
    from subject_fingerprint.io import read_image

    tmp = tempfile.mkdtemp()
    for shape in ((1, 12, 10), (6, 12, 10)):
        array = np.random.default_rng(0).random(shape).astype(np.float32)
        node = slicer.util.addVolumeFromArray(array, ijkToRAS=np.diag([-1.0, 0.5, 2.0, 1.0]))
        path = os.path.join(tmp, f"v{shape[0]}.nrrd")
        slicer.util.saveNode(node, path)
        loaded = slicer.util.loadVolume(path)
        mine, spacing = volumeToArray(loaded)
        engine = read_image(path)
        case.assertEqual(mine.shape, engine.array.shape)
        case.assertTrue(np.allclose(mine, engine.array))
        case.assertIsNotNone(loaded.GetDisplayNode())


def test_FindMatchesAndSideBySide(case) -> None:
    """Index a few synthetic images with a tiny model, find one again, show the candidate."""
    import numpy as np
    import slicer

    from SubjectFingerprintLib.logic import SubjectFingerprintLogic

    if not engineInstalled():
        case.delayDisplay("torch/MONAI not installed: engine test skipped")
        return
    from subject_fingerprint import lookup
    from subject_fingerprint.checkpoint import FingerprintModel, save_checkpoint
    from subject_fingerprint.preprocess import Preprocessing

    tmp = tempfile.mkdtemp()
    model = FingerprintModel.create(2, depth=18, embedding_dim=32,
                                    preprocessing=Preprocessing(spatial_dims=2, size=(32, 32)))
    modelPath = os.path.join(tmp, "tiny.pt")
    save_checkpoint(model, modelPath)
    rng = np.random.default_rng(0)
    for subject in ("s1", "s2", "s3"):
        os.makedirs(os.path.join(tmp, "lib", subject))
        node = slicer.util.addVolumeFromArray((rng.random((48, 40)) * 4000).astype(np.int16)[np.newaxis], name=subject)
        slicer.util.saveNode(node, os.path.join(tmp, "lib", subject, "img.nrrd"))
    libraryPath = os.path.join(tmp, "lib.h5")
    lookup.index([os.path.join(tmp, "lib")], libraryPath, model=modelPath, progress=False)
    query = slicer.util.loadVolume(os.path.join(tmp, "lib", "s2", "img.nrrd"))
    logic = SubjectFingerprintLogic()
    rows = logic.findMatches(query, libraryPath, modelPath=modelPath, k=3, device="cpu")
    case.assertEqual(rows[0]["subject"], "s2")
    case.assertLess(rows[0]["distance"], 1e-3)
    case.assertEqual(logic.showResultsInTable(rows).GetNumberOfRows(), 3)
    candidate = logic.loadCandidate(rows[1], queryVolumeNode=query)
    case.assertIs(logic.loadCandidate(rows[1], queryVolumeNode=query), candidate)  # not loaded twice
    layoutManager = slicer.app.layoutManager()
    if layoutManager is not None:
        red = layoutManager.sliceWidget("Red").mrmlSliceNode()
        yellow = layoutManager.sliceWidget("Yellow").mrmlSliceNode()
        case.assertEqual(red.GetOrientation(), yellow.GetOrientation())


TESTS = (test_VolumeIO, test_FindMatchesAndSideBySide)

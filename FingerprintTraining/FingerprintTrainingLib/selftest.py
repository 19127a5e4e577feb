"""The tests the module's FingerprintTrainingTest runs in a real Slicer (skipped without torch/MONAI)."""

import importlib.util
import os
import tempfile


def test_TrainFewSteps(case) -> None:
    """Train a tiny model for a few steps in a separate process."""
    import numpy as np
    import slicer

    from FingerprintTrainingLib.logic import FingerprintTrainingLogic

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("monai") is None:
        case.delayDisplay("torch/MONAI not installed: training test skipped")
        return
    tmp = tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    for s in range(4):
        base = rng.random((40, 40)) * 3000
        for v in range(2):
            os.makedirs(os.path.join(tmp, "images", f"s{s}"), exist_ok=True)
            node = slicer.util.addVolumeFromArray((base + rng.random((40, 40)) * 100)[np.newaxis].astype(np.int16))
            slicer.util.saveNode(node, os.path.join(tmp, "images", f"s{s}", f"{v}.nrrd"))
    logic = FingerprintTrainingLogic()
    process = logic.train(os.path.join(tmp, "images"), os.path.join(tmp, "run"), dims=2, depth=18, steps=2,
                          batchSubjects=2, device="cpu", extraArguments=["--size", "32", "32"])
    case.assertEqual(process.returncode, 0)
    case.assertTrue(os.path.isfile(logic.bestCheckpoint(os.path.join(tmp, "run"))))


TESTS = (test_TrainFewSteps,)

"""FingerprintTraining Logic: out-of-process training with progress, summary and Cancel."""

import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")
import slicer_harness  # noqa: E402


@pytest.fixture(scope="module")
def ft():
    slicer_harness.install()
    return slicer_harness.import_module("FingerprintTraining")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "images"
    rng = np.random.default_rng(0)
    for s in range(4):
        base = rng.random((40, 40)) * 200
        for v in range(2):
            (root / f"s{s}").mkdir(parents=True, exist_ok=True)
            array = np.clip(base + rng.random((40, 40)) * 20, 0, 255).astype(np.uint8)
            sitk.WriteImage(sitk.GetImageFromArray(array), str(root / f"s{s}" / f"{v}.png"))
    return root


@pytest.mark.slow
def test_train_out_of_process_gives_a_checkpoint_and_summary(ft, images, tmp_path):
    from subject_fingerprint.checkpoint import load_checkpoint

    logic = ft.FingerprintTrainingLogic()
    progress, log = [], []
    run = tmp_path / "run"
    process = logic.train(str(images), str(run), dims=2, depth=18, steps=1, batchSubjects=2, device="cpu",
                          extraArguments=["--size", "32", "32"], onLog=log.append,
                          onProgress=lambda d, t: progress.append((d, t)))
    assert process.returncode == 0, process.output
    summary = logic.finishBackground(process)
    assert summary["steps_done"] == 1
    assert summary["best"] == logic.bestCheckpoint(str(run))
    model = load_checkpoint(summary["best"])
    assert model.spatial_dims == 2 and model.embedding_dim == 128
    assert (1, 1) in progress  # tqdm's step counter reached the end
    assert any("training" in line for line in log)


@pytest.mark.slow
def test_cancel_kills_training_at_once(ft, images, tmp_path):
    logic = ft.FingerprintTrainingLogic()
    process = logic.train(str(images), str(tmp_path / "run"), dims=2, depth=18, steps=10000, batchSubjects=2,
                          device="cpu", extraArguments=["--size", "32", "32"], waitForCompletion=False)
    deadline = time.monotonic() + 60
    while process.poll() and not any("training" in line for line in process.lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.running, process.output
    started = time.monotonic()
    logic.cancel()
    while process.poll():
        time.sleep(0.05)
    assert time.monotonic() - started < 10
    assert logic.finishBackground(process)["cancelled"] is True
    assert process.returncode != 0


def test_bad_arguments_fail_with_a_clear_message(ft, images, tmp_path):
    logic = ft.FingerprintTrainingLogic()
    with pytest.raises(ValueError, match="no such folder"):
        logic.train(str(tmp_path / "nothing"), str(tmp_path / "run"))
    with pytest.raises(ValueError, match="no checkpoint"):
        logic.bestCheckpoint(str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        logic.evaluate(str(images), __file__, str(tmp_path / "missing.json"), str(tmp_path / "ev"))

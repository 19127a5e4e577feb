"""SubjectFingerprint Logic against a real MRML scene (slicer-core), with a tiny model.

Volumes are read from NRRD, NIfTI, PNG and DICOM files by Slicer's own volume archetype
storage node into real vtkMRMLScalarVolumeNodes; results go into a real vtkMRMLTableNode.
"""

import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")
import slicer_harness  # noqa: E402

N_SUBJECTS = 4


@pytest.fixture(scope="module")
def sf():
    slicer_harness.install()
    return slicer_harness.import_module("SubjectFingerprint")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny 2D model, a folder of PNGs (two per subject) and a library of them."""
    import torch

    from subject_fingerprint import lookup
    from subject_fingerprint.checkpoint import FingerprintModel, save_checkpoint
    from subject_fingerprint.preprocess import Preprocessing

    torch.manual_seed(0)
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    model = FingerprintModel.create(2, depth=18, embedding_dim=32,
                                    preprocessing=Preprocessing(spatial_dims=2, size=(32, 32)))
    model_path = root / "tiny.pt"
    save_checkpoint(model, model_path)
    rng = np.random.default_rng(1)
    images = root / "images"
    arrays = {}
    for s in range(N_SUBJECTS):
        base = rng.random((40, 36)) * 200
        for v in range(2):
            array = np.clip(base + rng.random((40, 36)) * 30 * v, 0, 255).astype(np.uint8)
            path = images / f"subj{s}" / f"view{v}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
            arrays[(f"subj{s}", v)] = array
    library = root / "lib.h5"
    report = lookup.index([images], library, model=str(model_path), dataset="train", progress=False, device="cpu")
    assert report.added == 2 * N_SUBJECTS
    return {"root": root, "model": str(model_path), "images": images, "library": library, "arrays": arrays}


def load(sf, path):
    node = sf.SubjectFingerprintLogic.loadVolumeFile(str(path))
    assert node is not None and node.IsA("vtkMRMLScalarVolumeNode")
    return node


def write_as(tmp_path, array, kind):
    """Write a 2D array as a one-slice NRRD / NIfTI, or a PNG, with SimpleITK."""
    image = sitk.GetImageFromArray(array.astype(np.float32 if kind != "png" else np.uint8))
    path = tmp_path / {"nrrd": "q.nrrd", "nifti": "q.nii.gz", "png": "q.png"}[kind]
    sitk.WriteImage(image, str(path))
    return path


def test_find_matches_from_library_file_ranks_own_subject_first(sf, tiny):
    slicer_harness.new_scene()
    node = load(sf, tiny["images"] / "subj2" / "view1.png")
    logic = sf.SubjectFingerprintLogic()
    rows = logic.findMatches(node, str(tiny["library"]), modelPath=tiny["model"], k=3, device="cpu")
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["subject"] == "subj2"
    assert rows[0]["distance"] < 1e-3
    assert rows[1]["distance"] > rows[0]["distance"]
    assert rows[0]["dataset"] == "train"
    assert Path(rows[0]["source"]).is_file()
    assert all(r["probability"] is None for r in rows)  # the tiny model is not calibrated


@pytest.mark.parametrize("kind", ["nrrd", "nifti", "png"])
def test_volume_formats_read_as_the_engine_reads_them(sf, tiny, tmp_path, kind):
    """The same pixels written as NRRD, NIfTI or PNG are found again at ~0 distance."""
    slicer_harness.new_scene()
    array = tiny["arrays"][("subj1", 0)]
    node = load(sf, write_as(tmp_path, array, kind))
    from SubjectFingerprintLib.volumes import volumeToLoadedImage

    loaded = volumeToLoadedImage(node)
    assert loaded.array.shape == array.shape
    assert np.array_equal(loaded.array, array.astype(np.float32))
    rows = sf.SubjectFingerprintLogic().findMatches(node, str(tiny["library"]), modelPath=tiny["model"],
                                                    k=2, device="cpu")
    assert rows[0]["subject"] == "subj1" and rows[0]["distance"] < 1e-3


def test_dicom_xray_volume(sf, tiny, tmp_path):
    from dicom_factory import write_xray

    slicer_harness.new_scene()
    array = tiny["arrays"][("subj3", 1)]
    path = write_xray(tmp_path / "xray.dcm", array.astype(np.uint16), patient_id="P9")
    node = load(sf, path)
    assert node.GetImageData().GetDimensions()[2] == 1
    rows = sf.SubjectFingerprintLogic().findMatches(node, str(tiny["library"]), modelPath=tiny["model"],
                                                    k=2, device="cpu")
    assert rows[0]["subject"] == "subj3" and rows[0]["distance"] < 1e-2


def test_lps_reorientation_of_a_flipped_volume(sf):
    """A volume node with flipped/permuted axes comes back as the same (z, y, x) LPS array."""
    from SubjectFingerprintLib.volumes import volumeToArray

    slicer_harness.new_scene()
    rng = np.random.default_rng(0)
    zyx = rng.random((3, 4, 5)).astype(np.float32)
    # store it with i along -x... : array (k, j, i) = (x, z, y) reversed in x
    kji = np.flip(zyx, axis=2).transpose(2, 0, 1)  # k = x (flipped), j = z, i = y
    ijk_to_lps = np.zeros((3, 3))
    ijk_to_lps[1, 0] = 0.5    # i -> y (P), 0.5 mm
    ijk_to_lps[2, 1] = 2.0    # j -> z (S), 2 mm
    ijk_to_lps[0, 2] = -1.0   # k -> -x (R), 1 mm
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ ijk_to_lps
    node = slicer.util.addVolumeFromArray(np.ascontiguousarray(kji), ijkToRAS=ijk_to_ras)
    out, spacing = volumeToArray(node)
    assert np.array_equal(out, zyx)
    assert np.allclose(spacing, (2.0, 0.5, 1.0))


def test_results_table_is_a_real_table_node(sf, tiny):
    slicer_harness.new_scene()
    node = load(sf, tiny["images"] / "subj0" / "view0.png")
    logic = sf.SubjectFingerprintLogic()
    rows = logic.findMatches(node, str(tiny["library"]), modelPath=tiny["model"], k=N_SUBJECTS, device="cpu")
    table = logic.showResultsInTable(rows)
    assert table.IsA("vtkMRMLTableNode") and slicer.mrmlScene.GetNodeByID(table.GetID()) is table
    names = [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]
    assert names == ["rank", "subject", "dataset", "image", "distance", "probability", "source"]
    assert table.GetUseColumnTitleAsColumnHeader()
    assert table.GetColumnTitle("probability") == "Same-subject probability"
    assert logic.resultColumnIndex("source") == names.index("source")
    assert table.GetNumberOfRows() == N_SUBJECTS
    assert table.GetTable().GetColumnByName("distance").IsA("vtkDoubleArray")
    back = logic.rowsFromTable(table)
    assert [r["subject"] for r in back] == [r["subject"] for r in rows]
    assert back[0]["source"] == rows[0]["source"]
    # re-using the node replaces its rows
    logic.showResultsInTable(rows[:2], table)
    assert table.GetNumberOfRows() == 2
    # loading a candidate from its row gives a volume with the candidate's pixels
    candidate = logic.loadCandidate(back[1], queryVolumeNode=node)
    subject = back[1]["subject"]
    view = int(Path(back[1]["source"]).stem[-1])
    assert np.array_equal(slicer.util.arrayFromVolume(candidate)[0], tiny["arrays"][(subject, view)])


def test_add_volume_to_library(sf, tiny, tmp_path):
    import shutil

    from subject_fingerprint.library import EmbeddingLibrary

    slicer_harness.new_scene()
    library = tmp_path / "lib.h5"
    shutil.copy(tiny["library"], library)
    rng = np.random.default_rng(7)
    path = write_as(tmp_path, (rng.random((40, 36)) * 255), "png")
    node = load(sf, path)
    logic = sf.SubjectFingerprintLogic()
    assert logic.addVolumeToLibrary(node, "newbie", str(library), modelPath=tiny["model"], dataset="clinic",
                                    device="cpu") == 1
    with EmbeddingLibrary.open(library) as lib:
        assert len(lib) == 2 * N_SUBJECTS + 1
        assert "newbie" in set(lib.column("subject_id"))
    # the same pixels again: a duplicate, nothing added
    assert logic.addVolumeToLibrary(node, "newbie", str(library), modelPath=tiny["model"], device="cpu") == 0
    rows = logic.findMatches(node, str(library), modelPath=tiny["model"], k=1, device="cpu")
    assert rows[0]["subject"] == "newbie" and rows[0]["dataset"] == "clinic"
    with pytest.raises(ValueError):
        logic.addVolumeToLibrary(node, "  ", str(library), modelPath=tiny["model"])


def test_3d_volume_with_2d_model_gives_the_models_message(sf, tiny, tmp_path):
    from subject_fingerprint.errors import ModelMismatchError

    slicer_harness.new_scene()
    path = tmp_path / "head.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((8, 20, 20)).astype(np.float32)), str(path))
    node = load(sf, path)
    with pytest.raises(ModelMismatchError, match="2D images"):
        sf.SubjectFingerprintLogic().findMatches(node, str(tiny["library"]), modelPath=tiny["model"], device="cpu")


def test_clear_errors_for_missing_library_empty_library_and_other_model(sf, tiny, tmp_path):
    from subject_fingerprint.checkpoint import FingerprintModel, save_checkpoint
    from subject_fingerprint.errors import FingerprintError, LibraryError, ModelMismatchError
    from subject_fingerprint.library import EmbeddingLibrary
    from subject_fingerprint.preprocess import Preprocessing

    slicer_harness.new_scene()
    node = load(sf, tiny["images"] / "subj0" / "view0.png")
    logic = sf.SubjectFingerprintLogic()
    with pytest.raises(LibraryError, match="no such library"):
        logic.findMatches(node, str(tmp_path / "nope.h5"), modelPath=tiny["model"])
    model = logic.loadModel(tiny["model"])
    empty = tmp_path / "empty.h5"
    with EmbeddingLibrary.open(empty, mode="a", model=model):
        pass
    with pytest.raises(LibraryError, match="empty"):
        logic.findMatches(node, str(empty), modelPath=tiny["model"], device="cpu")
    other = FingerprintModel.create(2, depth=18, embedding_dim=32,
                                    preprocessing=Preprocessing(spatial_dims=2, size=(32, 32)))
    other_path = tmp_path / "other.pt"
    save_checkpoint(other, other_path)
    with pytest.raises(ModelMismatchError):
        logic.findMatches(node, str(tiny["library"]), modelPath=str(other_path), device="cpu")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    with pytest.raises(FingerprintError, match="garbage.png"):
        logic.loadVolumeFile(str(garbage))


def test_background_build_library_and_cancel_leaves_library_unchanged(sf, tiny, tmp_path):
    from subject_fingerprint.library import EmbeddingLibrary

    logic = sf.SubjectFingerprintLogic()
    library = tmp_path / "built.h5"
    progress = []
    process = logic.buildLibrary(str(tiny["images"]), str(library), modelPath=tiny["model"], dataset="built",
                                 device="cpu", onProgress=lambda d, t: progress.append((d, t)))
    assert process.returncode == 0, process.output
    with EmbeddingLibrary.open(library) as lib:
        assert len(lib) == 2 * N_SUBJECTS
        assert set(lib.column("dataset")) == {"built"}

    # a second, larger run into a copy, cancelled while running: the file's bytes are unchanged
    big = tmp_path / "big"
    rng = np.random.default_rng(3)
    for s in range(40):
        for v in range(4):
            p = big / f"b{s}" / f"{v}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.GetImageFromArray((rng.random((40, 36)) * 255).astype(np.uint8)), str(p))
    before = library.read_bytes()
    # Batches of 16: the first progress line comes long before the run could finish (by
    # default the tiny model's whole folder is one batch).
    process = logic.buildLibrary(str(big), str(library), modelPath=tiny["model"], device="cpu",
                                 waitForCompletion=False, batchSize=16)
    deadline = time.monotonic() + 60
    while process.poll() and not any("/160" in line for line in process.lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    logic.cancel()
    while process.poll():
        time.sleep(0.05)
    assert process.cancelled
    assert "Cancelled" in logic.finishBackground(process)
    assert library.read_bytes() == before


def test_background_failure_raises_the_tools_message(sf, tiny, tmp_path):
    from subject_fingerprint.errors import FingerprintError

    logic = sf.SubjectFingerprintLogic()
    bad_model = tmp_path / "bad.pt"
    bad_model.write_bytes(b"not a checkpoint")
    with pytest.raises(FingerprintError, match="exit code 2"):
        logic.buildLibrary(str(tiny["images"]), str(tmp_path / "x.h5"), modelPath=str(bad_model), device="cpu")


def test_batch_mode_script_end_to_end(sf, tiny, tmp_path):
    """Resources/Scripts/batch_find_matches.py: a folder of NRRD/PNG files -> a CSV of candidates."""
    import csv

    slicer_harness.new_scene()
    batch = slicer_harness.import_module("batch_find_matches")
    folder = tmp_path / "queries"
    folder.mkdir()
    expected = {}
    for i, (subject, view) in enumerate([("subj0", 1), ("subj3", 0), ("subj1", 1)]):
        array = tiny["arrays"][(subject, view)]
        if i % 2:
            name = f"q{i}.png"
            sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / name))
        else:
            name = f"q{i}.nrrd"
            sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.float32)), str(folder / name))
        expected[name] = subject
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "out.csv"
    code = batch.main(["--", str(folder), str(tiny["library"]), str(out), "--model", tiny["model"], "-k", "2",
                       "--device", "cpu"])
    assert code == 1  # broken.png failed, the rest went through
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["query"] for r in rows} == set(expected) | {"broken.png"}
    for name, subject in expected.items():
        mine = [r for r in rows if r["query"] == name]
        assert [r["rank"] for r in mine] == ["1", "2"]
        assert mine[0]["subject"] == subject and float(mine[0]["distance"]) < 1e-3
    assert [r for r in rows if r["query"] == "broken.png"][0]["error"]
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0  # nodes removed
    assert batch.main([str(tmp_path / "nothing"), str(tiny["library"]), str(out)]) == 2


def test_check_datasets_in_background_then_load_the_top_pair(sf, tiny, tmp_path):
    """Two dataset folders sharing one subject (under other IDs): the report names the pair."""
    import shutil

    from subject_fingerprint.errors import FingerprintError

    slicer_harness.new_scene()
    a, b = tmp_path / "siteA", tmp_path / "siteB"
    for s in range(3):
        shutil.copytree(tiny["images"] / f"subj{s}", a / f"A{s}")
    shutil.copytree(tiny["images"] / "subj2", b / "B-pseudo")  # subject 2 again, new pseudonym
    shutil.copytree(tiny["images"] / "subj3", b / "B3")
    logic = sf.SubjectFingerprintLogic()
    with pytest.raises(FingerprintError, match="calibration"):  # the tiny model is not calibrated
        logic.checkDatasets([str(a), str(b)], str(tmp_path / "r0"), modelPath=tiny["model"], device="cpu")
    out = tmp_path / "report"
    process = logic.checkDatasets([str(a), str(b)], str(out), modelPath=tiny["model"], device="cpu",
                                  threshold=1e-3)
    assert "shared subject pairs" in logic.finishBackground(process)
    assert (out / "index.html").is_file()
    pairs = logic.readSharedSubjects(str(out))
    assert [(p["subject_a"], p["subject_b"]) for p in pairs] == [("A2", "B-pseudo")]
    left, right = logic.loadSharedPair(str(out))
    assert np.array_equal(slicer.util.arrayFromVolume(left), slicer.util.arrayFromVolume(right))
    with pytest.raises(ValueError, match="at least two"):
        logic.checkDatasets([str(a)], str(out))


def test_build_library_with_an_unreadable_file_finishes_and_says_so(sf, tiny, tmp_path):
    import shutil

    from subject_fingerprint.library import EmbeddingLibrary

    folder = tmp_path / "mixed"
    shutil.copytree(tiny["images"] / "subj0", folder / "subj0")
    (folder / "subj1").mkdir()
    (folder / "subj1" / "broken.png").write_bytes(b"not a png")
    logic = sf.SubjectFingerprintLogic()
    process = logic.buildLibrary(str(folder), str(tmp_path / "m.h5"), modelPath=tiny["model"], device="cpu")
    assert process.returncode == 1
    assert "could not be read" in logic.finishBackground(process)
    assert any("broken.png" in line for line in process.lines)
    with EmbeddingLibrary.open(tmp_path / "m.h5") as lib:
        assert len(lib) == 2


@pytest.mark.parametrize("shape", [(1, 12, 10), (6, 12, 10)])
def test_volume_saved_by_slicer_in_ras_reads_like_the_engine_reads_the_file(sf, tmp_path, shape):
    """A node with Slicer's default RAS-aligned geometry, saved by Slicer's storage node, gives the
    same array through volumeToLoadedImage as through the engine's own reader of that file."""
    from SubjectFingerprintLib.volumes import volumeToLoadedImage
    from subject_fingerprint.io import read_image

    slicer_harness.new_scene()
    array = np.random.default_rng(0).random(shape).astype(np.float32)
    node = slicer.util.addVolumeFromArray(array, ijkToRAS=np.array([[1, 0, 0, 5], [0, 0.5, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1.0]]))
    path = tmp_path / "saved.nrrd"
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    mine = volumeToLoadedImage(node)
    engine = read_image(str(path))
    assert mine.array.shape == engine.array.shape
    assert np.allclose(mine.array, engine.array)
    assert np.allclose(mine.spacing, engine.spacing)


def test_wrong_modality_for_the_model_is_refused_with_its_message(sf, tiny, tmp_path):
    """An X-ray-only model refuses a DICOM MR image; the DICOM X-ray itself is accepted."""
    from dicom_factory import write_xray
    from subject_fingerprint.checkpoint import FingerprintModel, save_checkpoint
    from subject_fingerprint.errors import ModelMismatchError
    from subject_fingerprint.preprocess import Preprocessing
    from SubjectFingerprintLib.volumes import volumeModality

    slicer_harness.new_scene()
    xray_only = FingerprintModel.create(2, depth=18, embedding_dim=32, modalities=("DX",),
                                        preprocessing=Preprocessing(spatial_dims=2, size=(32, 32)))
    model_path = tmp_path / "xray.pt"
    save_checkpoint(xray_only, model_path)
    pixels = (np.random.default_rng(0).random((40, 36)) * 1000).astype(np.uint16)
    mr = load(sf, write_xray(tmp_path / "mr.dcm", pixels, modality="MR"))
    dx = load(sf, write_xray(tmp_path / "dx.dcm", pixels, modality="DX"))
    assert (volumeModality(mr), volumeModality(dx)) == ("MR", "DX")
    logic = sf.SubjectFingerprintLogic()
    with pytest.raises(ModelMismatchError, match="trained on xray"):
        logic.addVolumeToLibrary(mr, "p1", str(tmp_path / "lib.h5"), modelPath=str(model_path), device="cpu")
    assert logic.addVolumeToLibrary(dx, "p1", str(tmp_path / "lib.h5"), modelPath=str(model_path), device="cpu") == 1


def test_default_model_is_the_bundled_starter(sf):
    path = Path(sf.SubjectFingerprintLogic().defaultModelPath())
    assert path.name == "starter-2d-cxr.pt" and path.is_file()

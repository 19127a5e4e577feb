"""Module-level behaviour against slicer-core: the model named by $SUBJECT_FINGERPRINT_MODEL,
paths kept in the parameter nodes, sample data registration, the module descriptions."""

import types

import pytest

slicer = pytest.importorskip("slicer")
import slicer_harness  # noqa: E402


@pytest.fixture(scope="module")
def sf():
    slicer_harness.install()
    return slicer_harness.import_module("SubjectFingerprint")


def test_default_model_honours_the_environment_variable_like_the_engine(sf, tmp_path, monkeypatch):
    from subject_fingerprint.checkpoint import default_model_path
    from subject_fingerprint.errors import CheckpointError

    model = tmp_path / "mine.pt"
    model.write_bytes(b"x")
    # An installed module ships the starter model in its own Resources/Models: the variable still wins.
    shipped = tmp_path / "module" / "Resources" / "Models" / "starter-2d-cxr.pt"
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(b"starter")
    monkeypatch.setattr(sf.SubjectFingerprintLogic, "moduleDir", staticmethod(lambda: str(tmp_path / "module")))
    monkeypatch.setenv("SUBJECT_FINGERPRINT_MODEL", str(model))
    logic = sf.SubjectFingerprintLogic()
    assert logic.defaultModelPath() == str(model) == str(default_model_path())
    assert logic.resolveModelPath(None) == str(model)
    monkeypatch.setenv("SUBJECT_FINGERPRINT_MODEL", str(tmp_path / "gone.pt"))
    with pytest.raises(CheckpointError, match="SUBJECT_FINGERPRINT_MODEL"):
        logic.defaultModelPath()
    monkeypatch.delenv("SUBJECT_FINGERPRINT_MODEL")
    assert logic.defaultModelPath() == str(shipped)


def test_model_and_library_paths_are_parameters(sf):
    import FingerprintTraining

    params = sf.SubjectFingerprintLogic().getParameterNode()
    assert (params.modelPath, params.libraryPath) == ("", "")
    training = FingerprintTraining.FingerprintTrainingLogic().getParameterNode()
    assert all(getattr(training, n) == "" for n in ("sourcePath", "manifestPath", "splitPath", "outputPath"))


def test_sample_data_is_registered_with_local_files(sf, monkeypatch):
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    registered = []
    fake = types.ModuleType("SampleData")
    fake.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kw: registered.append(kw))
    monkeypatch.setitem(__import__("sys").modules, "SampleData", fake)
    sf.registerSampleData()
    assert {r["sampleName"] for r in registered} == {"SubjectFingerprintChestXray", "SubjectFingerprintBrainMRI"}
    for source in registered:
        assert source["category"] == "SubjectFingerprint"
        assert len(source["uris"]) == len(source["fileNames"]) == len(source["nodeNames"]) == 2
        for uri in source["uris"]:
            assert uri.startswith("file://") and Path(unquote(urlparse(uri).path)).is_file()
        assert Path(source["thumbnailFileName"]).is_file()


def test_shipped_sample_files_are_the_registered_ones(sf):
    import re

    from SubjectFingerprintLib.sampledata import SAMPLES

    cmake = (slicer_harness.REPO / "SubjectFingerprint" / "CMakeLists.txt").read_text()
    shipped = set(re.findall(r"SampleData/(\S+)", cmake))
    assert {f for files in SAMPLES.values() for f in files} <= shipped


def test_module_descriptions(sf):
    import FingerprintTraining

    for module in (sf.SubjectFingerprint, FingerprintTraining.FingerprintTraining):
        parent = types.SimpleNamespace()
        module(parent)
        assert parent.categories == ["Utilities"]
        assert "documentation" in parent.helpText and "href" in parent.helpText
        assert parent.contributors and parent.acknowledgementText

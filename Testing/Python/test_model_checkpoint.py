"""Network shapes, model IDs, checkpoint round trips and refusal of bad files."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from subject_fingerprint.calibration import Calibration
from subject_fingerprint.checkpoint import (FingerprintModel, default_model_path, load_checkpoint,
                                            save_checkpoint)
from subject_fingerprint.errors import CheckpointError, ModelMismatchError
from subject_fingerprint.model import build_network
from subject_fingerprint.preprocess import Preprocessing
from subject_fingerprint.records import ImageRecord, LoadedImage


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model2d(**kw):
    return FingerprintModel.create(2, depth=18, embedding_dim=16,
                                   preprocessing=Preprocessing(2, (32, 32)), **kw)


@pytest.mark.parametrize("dims,shape", [(2, (2, 1, 32, 32)), (3, (2, 1, 16, 16, 16))])
def test_network_output_shape(dims, shape):
    net = build_network(spatial_dims=dims, depth=18, embedding_dim=24).eval()
    with torch.inference_mode():
        assert net(torch.zeros(shape)).shape == (2, 24)


def test_network_stem_and_block_types():
    net = build_network(2, depth=50, embedding_dim=128)
    assert net.conv1.stride == (2, 2) and net.conv1.in_channels == 1
    assert type(net.layer1[0]).__name__ == "ResNetBottleneck"
    assert type(build_network(2, 18).layer1[0]).__name__ == "ResNetBlock"
    with pytest.raises(ValueError):
        build_network(2, depth=19)


def test_create_defaults_and_properties():
    m = FingerprintModel.create(2, depth=18, embedding_dim=16, modalities=("CR",))
    assert m.preprocessing.size == (256, 256)
    assert (m.spatial_dims, m.embedding_dim, m.depth) == (2, 16, 18)
    assert m.modalities == ["xray"]
    assert m.calibration is None
    assert len(m.model_id) == 16 and int(m.model_id, 16) >= 0
    m3 = FingerprintModel.create(3, depth=18, embedding_dim=16)
    assert m3.preprocessing.size == (96, 96, 96) and m3.preprocessing.spacing is None
    assert m3.model_id != m.model_id


def test_model_id_follows_weights():
    m = _model2d()
    first = m.model_id
    assert m.model_id == first
    with torch.no_grad():
        m.network.fc.bias.add_(1.0)
    assert m.model_id != first


def test_check_image_messages():
    m = _model2d(modalities=["xray"])
    rec = ImageRecord("/data/head.nii.gz", "s", "head", modality="MR")
    with pytest.raises(ModelMismatchError, match="this model embeds 2D images; /data/head.nii.gz is a 3D volume"):
        m.check_image(LoadedImage(np.zeros((4, 8, 8), np.float32), (1, 1, 1), rec))
    with pytest.raises(ModelMismatchError, match="this model was trained on xray images; /data/head.nii.gz is mr"):
        m.check_image(LoadedImage(np.zeros((8, 8), np.float32), (1, 1), rec))
    for modality in ("DX", "", "OT"):  # right family, or unknown: accepted
        m.check_image(LoadedImage(np.zeros((8, 8), np.float32), (1, 1),
                                  ImageRecord("a.png", "s", "a", modality=modality)))


def test_round_trip_keeps_everything(tmp_path):
    m = _model2d(modalities=["xray"])
    m.metadata["training"] = {"epochs": 3}
    m.calibration = Calibration(-6.0, 3.0, 0.5, 0.01, [[0.01, 0.5]])
    path = save_checkpoint(m, tmp_path / "sub" / "m.pt")
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    again = load_checkpoint(path)
    assert again.model_id == m.model_id
    assert again.preprocessing == m.preprocessing
    assert again.metadata["training"] == {"epochs": 3}
    assert again.calibration == m.calibration
    assert not again.network.training
    x = torch.randn(2, 1, 32, 32)
    m.network.eval()
    with torch.inference_mode():
        assert torch.allclose(m.network(x), again.network(x))


def test_half_checkpoint_is_smaller_and_float32_on_load(tmp_path):
    m = _model2d()
    full = save_checkpoint(m, tmp_path / "full.pt")
    half = save_checkpoint(m, tmp_path / "half.pt", half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.network.parameters())


def _write(path, payload):
    torch.save(payload, path)
    return path


def _payload(path):
    return torch.load(path, weights_only=True)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_not_a_torch_file(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(2000))
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        load_checkpoint(junk)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(text)


class _Evil:
    """A pickle payload that would create a file if it were ever unpickled unsafely."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_does_not_run(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"format": "subject-fingerprint-checkpoint", "x": _Evil(target)}, path)
    with pytest.raises(CheckpointError, match="run code"):
        load_checkpoint(path)
    assert not target.exists()


def test_foreign_state_dict_refused(tmp_path):
    path = _write(tmp_path / "foreign.pt", build_network(2, 18, 16).state_dict())
    with pytest.raises(CheckpointError, match="not a SubjectFingerprint checkpoint"):
        load_checkpoint(path)


def test_newer_format_refused(tmp_path):
    path = save_checkpoint(_model2d(), tmp_path / "m.pt")
    payload = _payload(path)
    payload["format_version"] = 99
    _write(path, payload)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(path)


def test_tampered_weights_refused(tmp_path):
    path = save_checkpoint(_model2d(), tmp_path / "m.pt")
    payload = _payload(path)
    payload["state_dict"]["fc.bias"][0] += 0.5
    _write(path, payload)
    with pytest.raises(CheckpointError, match="the file was altered"):
        load_checkpoint(path)


def test_weights_not_matching_architecture_refused(tmp_path):
    path = save_checkpoint(_model2d(), tmp_path / "m.pt")
    payload = _payload(path)
    meta = json.loads(payload["metadata_json"])
    meta["architecture"]["depth"] = 34  # claims a deeper network than the weights hold
    payload["metadata_json"] = json.dumps(meta)
    # A consistently written but wrong file (hash recomputed), not a tampered one.
    payload["metadata_sha256"] = hashlib.sha256(payload["metadata_json"].encode()).hexdigest()
    _write(path, payload)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)


def test_default_model_path(tmp_path, monkeypatch):
    model_file = save_checkpoint(_model2d(), tmp_path / "env.pt")
    monkeypatch.setenv("SUBJECT_FINGERPRINT_MODEL", str(model_file))
    assert default_model_path() == model_file
    monkeypatch.setenv("SUBJECT_FINGERPRINT_MODEL", str(tmp_path / "gone.pt"))
    with pytest.raises(CheckpointError):
        default_model_path()
    monkeypatch.delenv("SUBJECT_FINGERPRINT_MODEL")
    try:
        path = default_model_path()
    except CheckpointError as exc:
        assert "--model" in str(exc)
    else:
        assert path.name == "starter-2d-cxr.pt" and path.is_file()


def test_tampered_metadata_refused(tmp_path):
    path = save_checkpoint(_model2d(), tmp_path / "m.pt")
    payload = _payload(path)
    meta = json.loads(payload["metadata_json"])
    meta["preprocessing"]["size"] = [64, 64]  # same weights, different inputs: must not pass
    payload["metadata_json"] = json.dumps(meta)
    _write(path, payload)
    with pytest.raises(CheckpointError, match="metadata does not match"):
        load_checkpoint(path)


def test_half_checkpoint_has_a_stable_id(tmp_path):
    m = _model2d()
    first = load_checkpoint(save_checkpoint(m, tmp_path / "a.pt", half=True))
    # fp16 rounding changes the weights, hence the ID; from then on it is fixed.
    assert first.model_id != m.model_id
    second = load_checkpoint(save_checkpoint(first, tmp_path / "b.pt", half=True))
    third = load_checkpoint(save_checkpoint(second, tmp_path / "c.pt"))
    assert first.model_id == second.model_id == third.model_id
    assert load_checkpoint(tmp_path / "a.pt").model_id == first.model_id


def test_metadata_objects_are_stored_as_json(tmp_path):
    m = _model2d(modalities=("CR", "DX", "xray"))
    assert m.modalities == ["xray"]  # one family, listed once
    cal = Calibration(-6.0, 3.0, 0.5, 0.01, [[0.01, 0.5]])
    m.metadata["calibration"] = cal  # an object rather than its dict
    assert m.calibration == cal
    m.metadata["metrics"] = {"hit_at_1": np.float32(0.75), "curve": np.arange(3)}
    again = load_checkpoint(save_checkpoint(m, tmp_path / "m.pt"), device="auto")
    assert again.calibration == cal
    assert again.metadata["metrics"] == {"hit_at_1": 0.75, "curve": [0, 1, 2]}
    m.metadata["training"] = {"bad": object()}
    with pytest.raises(TypeError):
        save_checkpoint(m, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def test_architecture_inferred_when_metadata_lacks_it():
    net = build_network(2, depth=34, embedding_dim=8)
    m = FingerprintModel(net, Preprocessing(2, (32, 32)), {})
    assert (m.depth, m.spatial_dims, m.embedding_dim) == (34, 2, 8)

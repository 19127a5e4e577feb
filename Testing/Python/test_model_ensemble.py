"""Ensembles (`subject_fingerprint.ensemble`, `subject-fingerprint ensemble`): what they embed,
how they are stored and identified, and what they refuse."""

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from fingerprint_training.cli import main
from subject_fingerprint.checkpoint import FingerprintModel, load_checkpoint, save_checkpoint
from subject_fingerprint.embed import Embedder
from subject_fingerprint.ensemble import combine
from subject_fingerprint.errors import CheckpointError
from subject_fingerprint.preprocess import Preprocessing, resize_tensor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(size=32, dims=2, seed=0, **prep):
    torch.manual_seed(seed)
    return FingerprintModel.create(dims, depth=10, embedding_dim=8,
                                   preprocessing=Preprocessing(dims, (size,) * dims, **prep))


def _embed(model, x):
    with torch.inference_mode():
        return model.network.eval()(x)


def test_an_ensemble_embeds_with_every_member_at_its_own_input_size():
    big, small = _model(32, seed=0), _model(16, seed=1)
    ens = combine([big, small])
    x = torch.rand(3, 1, 32, 32)
    out = _embed(ens, x)
    want = torch.cat([F.normalize(_embed(big, x), dim=1),
                      F.normalize(_embed(small, resize_tensor(x, (16, 16))), dim=1)], dim=1) / 2 ** 0.5
    assert out.shape == (3, 16) and torch.allclose(out, want, atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    # Squared distances are the mean of the members' (unit-length) squared distances.
    d = (out[0] - out[1]).pow(2).sum()
    parts = [(F.normalize(e, dim=1)[0] - F.normalize(e, dim=1)[1]).pow(2).sum()
             for e in (_embed(big, x), _embed(small, resize_tensor(x, (16, 16))))]
    assert torch.isclose(d, sum(parts) / 2, atol=1e-5)
    # The input is prepared as the largest member prepares it.
    assert ens.preprocessing.size == (32, 32) and ens.embedding_dim == 16 and ens.depth == 10


def test_the_preprocessing_and_the_ensemble_shrink_an_image_the_same_way():
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(resize_tensor(x, (32, 32)), x)
    from subject_fingerprint.preprocess import _resize

    assert torch.allclose(torch.from_numpy(_resize(x[0, 0].numpy(), (16, 16))), resize_tensor(x, (16, 16))[0, 0])


def test_an_ensemble_round_trips_with_its_own_id_and_records_its_members(tmp_path):
    a, b = _model(32, seed=0), _model(16, seed=1)
    a.metadata["training"] = {"sources": [{"name": "NIH", "source": "/data/nih"}]}
    b.metadata["training"] = {"sources": [{"name": "NIH", "source": "/data/nih"},
                                          {"name": "KER", "source": "/data/ker"}]}
    ens = combine([a, b])
    save_checkpoint(ens, tmp_path / "e.pt")
    back = load_checkpoint(tmp_path / "e.pt")
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(_embed(back, x), _embed(ens, x), atol=1e-6)
    assert back.model_id == ens.model_id and back.model_id not in (a.model_id, b.model_id)
    t = back.metadata["training"]
    assert [m["model_id"] for m in t["ensemble_of"]] == [a.model_id, b.model_id]
    assert [s["source"] for s in t["sources"]] == ["/data/nih", "/data/ker"]   # each source once
    assert back.calibration is None and "ensemble of 2" in repr(back)
    # The same weights with the members taking other input sizes embed differently: another ID.
    other = combine([_model(32, seed=0), _model(24, seed=1)])
    assert torch.equal(next(iter(other.network.state_dict().values())),
                       next(iter(ens.network.state_dict().values())))
    assert other.model_id != ens.model_id


def test_the_embedder_embeds_files_with_an_ensemble():
    ens = combine([_model(32, seed=0), _model(16, seed=1)])
    out = Embedder(ens, device="cpu", progress=False).embed_tensor(torch.rand(4, 1, 32, 32))
    assert out.shape == (4, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("members,message", [
    (lambda: [_model(32)], "at least two"),
    (lambda: [_model(32), _model(16, dims=3)], "3D"),
    (lambda: [_model(32), _model(32, resize="stretch")], "resize"),
    (lambda: [_model(32), _model(32, test_shift=0.06)], "test-time views"),
    (lambda: [combine([_model(32), _model(16)]), _model(32)], "itself an ensemble"),
])
def test_members_that_cannot_share_an_input_are_refused(members, message):
    with pytest.raises(ValueError, match=message):
        combine(members())


def test_the_command_writes_a_new_model_and_names_the_files_it_refuses(tmp_path, capsys):
    paths = []
    for i, size in enumerate((32, 16)):
        paths.append(tmp_path / f"m{i}.pt")
        save_checkpoint(_model(size, seed=i), paths[-1], half=True)
    before = [p.read_bytes() for p in paths]
    assert main(["ensemble", *map(str, paths), "--out", str(tmp_path / "e.pt"), "--half"]) == 0
    out = capsys.readouterr().out
    assert "2 members" in out and "--write-calibration" in out
    ens = load_checkpoint(tmp_path / "e.pt")
    assert ens.metadata["architecture"]["name"] == "ensemble"
    stored = torch.load(tmp_path / "e.pt", weights_only=True)["state_dict"].values()
    assert {t.dtype for t in stored if t.is_floating_point()} == {torch.float16}   # --half
    assert [p.read_bytes() for p in paths] == before                 # members left as they were
    assert main(["ensemble", *map(str, paths), "--out", str(paths[0])]) == 2
    assert "stay as they are" in capsys.readouterr().err
    save_checkpoint(_model(16, dims=3), tmp_path / "v.pt")
    assert main(["ensemble", str(paths[0]), str(tmp_path / "v.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "v.pt" in err and "3D" in err and not (tmp_path / "x.pt").exists()


def test_an_ensemble_checkpoint_with_damaged_members_is_a_clear_error(tmp_path):
    save_checkpoint(combine([_model(32), _model(16, seed=1)]), tmp_path / "e.pt")
    payload = torch.load(tmp_path / "e.pt", weights_only=True)
    meta = json.loads(payload["metadata_json"])
    meta["architecture"]["members"][1]["depth"] = 18        # no longer fits the stored weights

    payload["metadata_json"] = json.dumps(meta, sort_keys=True)
    payload["metadata_sha256"] = hashlib.sha256(payload["metadata_json"].encode()).hexdigest()
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="weights do not fit the ensemble of 2D ResNet-10 with 8-d output, 2D ResNet-18"):
        load_checkpoint(tmp_path / "bad.pt")


def test_the_cpu_backends_lay_out_each_member_of_an_ensemble_as_they_would_alone():
    from subject_fingerprint.ensemble import EnsembleNetwork
    from subject_fingerprint.staged_precision import (StagedPrecision, bf16_mixed_network,
                                                      float32_staged_network)

    ens = combine([_model(32, seed=0), _model(16, seed=1)])
    x = torch.rand(2, 1, 32, 32)
    want = _embed(ens, x)
    mixed = bf16_mixed_network(ens.network, (32, 32))
    assert isinstance(mixed, EnsembleNetwork) and mixed.sizes == [(32, 32), (16, 16)]
    assert all(isinstance(m, StagedPrecision) for m in mixed.members)
    with torch.inference_mode():
        assert F.cosine_similarity(mixed(x), want).min() > 0.99
        staged = float32_staged_network(ens.network, (32, 32))
        assert torch.allclose(staged(x), want, atol=1e-4)
    assert isinstance(ens.network, EnsembleNetwork) and not isinstance(ens.network.members[0], StagedPrecision)


def test_onnx_is_refused_up_front_for_an_ensemble_that_resizes(tmp_path, monkeypatch, capfd):
    from subject_fingerprint import backends

    monkeypatch.setenv("SUBJECT_FINGERPRINT_CACHE", str(tmp_path))
    ens = combine([_model(32, seed=0), _model(16, seed=1)])
    with pytest.raises(ValueError, match="antialiased resize"):
        backends.export_onnx(ens)
    assert capfd.readouterr().out == ""                 # no graph dump from torch's exporter
    if "onnx" in backends.auto_candidates(torch.device("cpu")):  # ONNX Runtime installed
        choice = backends.choose(ens, "auto", torch.device("cpu"), remember=False)
        assert choice.name != "onnx" and "antialiased resize" in choice.rejected["onnx"]
    assert combine([_model(32, seed=0), _model(32, seed=1)]).network.onnx_unsupported == ""


def test_an_ensemble_does_not_change_when_a_member_model_is_trained_further():
    a, b = _model(32, seed=0), _model(16, seed=1)
    ens = combine([a, b])
    x = torch.rand(2, 1, 32, 32)
    before, ens_id = _embed(ens, x), ens.model_id
    with torch.no_grad():
        next(a.network.parameters()).add_(1.0)
    assert torch.equal(_embed(ens, x), before) and ens.model_id == ens_id

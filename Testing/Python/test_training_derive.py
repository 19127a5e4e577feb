"""`subject-fingerprint derive`: a copy of a model with test-time views, the original untouched."""

import pytest
import torch

from fingerprint_training.cli import main
from subject_fingerprint.calibration import Calibration
from subject_fingerprint.checkpoint import FingerprintModel, load_checkpoint, save_checkpoint
from subject_fingerprint.preprocess import Preprocessing


@pytest.fixture()
def source(tmp_path):
    torch.manual_seed(0)
    model = FingerprintModel.create(2, depth=10, embedding_dim=8,
                                    preprocessing=Preprocessing(spatial_dims=2, size=(32, 32)))
    model.calibration = Calibration(coef=-50.0, intercept=2.0, threshold=0.04, target_fpr=0.01)
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, half=True)
    return path


def test_derive_writes_a_new_model_with_views_and_no_stale_calibration(source, tmp_path, capsys):
    before = source.read_bytes()
    old = load_checkpoint(source)
    assert main(["derive", str(source), "--test-shift", "0.06", "--out", str(tmp_path / "tta.pt")]) == 0
    new = load_checkpoint(tmp_path / "tta.pt")
    assert new.preprocessing.test_shift == 0.06 and len(new.preprocessing.view_shifts()) == 5
    assert new.calibration is None and new.metadata["derived_from"]["model_id"] == old.model_id
    assert new.model_id != old.model_id
    assert all(torch.equal(a, b) for a, b in zip(new.network.state_dict().values(),
                                                 old.network.state_dict().values()))
    assert source.read_bytes() == before                       # the original is left as it was
    assert "--write-calibration" in capsys.readouterr().out    # says what to do next


def test_derive_refuses_to_overwrite_its_source_and_a_bad_shift(source, tmp_path, capsys):
    assert main(["derive", str(source), "--test-shift", "0.06", "--out", str(source)]) == 2
    assert "stays as it is" in capsys.readouterr().err
    assert main(["derive", str(source), "--test-shift", "0.7", "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "m.pt" in err and "test_shift" in err and not (tmp_path / "x.pt").exists()

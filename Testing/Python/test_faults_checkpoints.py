"""Edited checkpoints and training states: a changed preprocessing is a different model, a
changed calibration is noticed against the library, and ``train --resume`` refuses damaged
or malicious ``last.pt`` files the way ``load_checkpoint`` refuses models."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from subject_fingerprint.calibration import Calibration
from subject_fingerprint.checkpoint import FingerprintModel, load_checkpoint, save_checkpoint
from subject_fingerprint.errors import CheckpointError, ModelMismatchError
from subject_fingerprint.lookup import index, query
from subject_fingerprint.preprocess import Preprocessing


def _model():
    torch.manual_seed(0)
    return FingerprintModel.create(2, depth=18, embedding_dim=16,
                                   preprocessing=Preprocessing(2, (32, 32)))


def _edit(path, change):
    """Edit a checkpoint's metadata and recompute its hash, as a careful tamperer would."""
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["metadata_json"])
    change(meta)
    payload["metadata_json"] = json.dumps(meta)
    payload["metadata_sha256"] = hashlib.sha256(payload["metadata_json"].encode()).hexdigest()
    torch.save(payload, path)
    return path


def test_edited_preprocessing_is_another_model(tmp_path):
    path = save_checkpoint(_model(), tmp_path / "m.pt")
    original = load_checkpoint(path).model_id
    _edit(path, lambda m: m["preprocessing"].update(size=[64, 64]))
    assert load_checkpoint(path).model_id != original


def _images(folder, n=4):
    rng = np.random.default_rng(0)
    for k in range(n):
        (folder / f"s{k}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (32, 32)).astype(np.uint8)).save(
            folder / f"s{k}" / "a.png")
    return folder


def test_edited_calibration_is_noticed_against_the_library(tmp_path, one_torch_thread):
    model = _model()
    model.calibration = Calibration(-20.0, 5.0, 0.3, 0.01, [[0.01, 0.3]])
    path = save_checkpoint(model, tmp_path / "m.pt")
    data = _images(tmp_path / "data")
    lib = tmp_path / "lib.h5"
    index([data], lib, model=str(path), device="cpu", progress=False)
    notices = []
    query([data / "s0" / "a.png"], lib, model=str(path), device="cpu", notices=notices)
    assert notices == []
    _edit(path, lambda m: m["calibration"].update(threshold=5.0))
    edited = load_checkpoint(path)
    assert edited.calibration_id != model.calibration_id
    query([data / "s0" / "a.png"], lib, model=edited, device="cpu", notices=notices)
    assert len(notices) == 1 and "was built with calibration" in notices[0]
    # A changed preprocessing cannot search the library at all.
    _edit(path, lambda m: m["preprocessing"].update(size=[48, 48]))
    with pytest.raises(ModelMismatchError):
        query([data / "s0" / "a.png"], lib, model=str(path), device="cpu")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("kind", ["pickle", "junk", "truncated", "foreign", "no-config"])
def test_resume_refuses_damaged_or_malicious_state(tmp_path, kind):
    from fingerprint_training.trainer import STATE_FORMAT, Trainer

    path = tmp_path / "last.pt"
    if kind == "pickle":
        torch.save({"format": STATE_FORMAT, "x": _Payload()}, path)
        match = "would run code"
    elif kind == "junk":
        path.write_bytes(os.urandom(2000))
        match = "not a training state file"
    elif kind == "truncated":
        torch.save({"format": STATE_FORMAT, "w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:1500])
        match = "not a training state file"
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
        match = "no format marker"
    else:
        torch.save({"format": STATE_FORMAT, "config": "{not json"}, path)
        match = "no readable configuration"
    with pytest.raises(CheckpointError, match=match):
        Trainer.load_last(None, path)

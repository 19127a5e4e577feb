"""`subject-fingerprint split` and `train` end to end on a tiny folder of PNG files."""

import json

import numpy as np
import pytest

pytest.importorskip("subject_fingerprint.checkpoint", reason="model engine not installed")
io = pytest.importorskip("subject_fingerprint.io")
if not hasattr(io, "discover"):
    pytest.skip("subject_fingerprint.io.discover not available", allow_module_level=True)


def _png_folder(root, n_subjects=8, per_subject=3, singles=2):
    from PIL import Image
    rng = np.random.default_rng(0)
    lines = ["subject_id,image_path,modality"]
    for s in range(n_subjects + singles):
        base = rng.integers(0, 255, (8, 8)).astype(np.float32)
        for i in range(per_subject if s < n_subjects else 1):
            img = np.kron(base, np.ones((4, 4))) + rng.normal(0, 10, (32, 32))
            name = f"img/s{s}_{i}.png"
            (root / "img").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name)
            lines.append(f"p{s},{name},CXR")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_split_then_train_from_the_command_line(tmp_path):
    import torch
    from subject_fingerprint.checkpoint import load_checkpoint
    from fingerprint_training.cli import main

    torch.set_num_threads(1)
    data = _png_folder(tmp_path / "data")
    split = tmp_path / "split.json"
    assert main(["split", str(data), "--out", str(split), "--fractions", "0.5", "0.5", "0", "--seed", "1"]) == 0
    s = json.loads(split.read_text())
    assert len(s["train"]) + len(s["val"]) == 10 and not set(s["train"]) & set(s["val"])
    run = tmp_path / "run"
    args = ["train", str(data), "--split", str(split), "--out", str(run), "--depth", "18",
            "--size", "32", "32", "--steps", "2", "--batch-subjects", "2", "--images-per-subject", "2",
            "--val-every", "1", "--val-episodes", "5", "--quiet", "--seed", "0"]
    assert main(args) == 0
    for name in ("best.pt", "last.pt", "log.csv", "training.png"):
        assert (run / name).is_file(), name
    model = load_checkpoint(run / "best.pt")
    t = model.metadata["training"]
    assert t["split"] == str(split) and len(t["split_sha256"]) == 64
    assert t["hyperparameters"]["depth"] == 18 and t["hyperparameters"]["margin"] == 4.0
    assert model.spatial_dims == 2
    # resume of a finished run: nothing left to do, still exit 0
    assert main(args + ["--resume"]) == 0
    assert main(["train", str(data), "--out", str(run), "--dims", "3", "--size", "8", "8"]) == 2

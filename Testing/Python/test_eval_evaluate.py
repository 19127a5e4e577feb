"""``evaluate`` end to end on a tiny model and a few PNGs, and ``evaluate_embeddings``."""

import argparse
import json

import numpy as np
import pytest

from fingerprint_training import evaluate as E
from fingerprint_training import evaluate_command as EC


def test_evaluate_embeddings_settings_and_notes():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 3)
    e = rng.normal(size=(6, 4))[labels] * 4 + rng.normal(size=(18, 4)) * 0.1
    r = E.evaluate_embeddings(e, labels, ways=(5, 10), shots=(1, 2, 3), episodes=5,
                              threshold=1.0, n_boot=50)
    assert [(x["n_way"], x["k_shot"]) for x in r["nway_kshot"]] == [(5, 1), (5, 2)]
    assert any("10-way 1-shot skipped" in n and "has 6" in n for n in r["notes"])
    assert any("5-way 3-shot skipped" in n and "has 0" in n for n in r["notes"])
    assert r["retrieval"]["precision_at_1"] == 1.0
    assert r["verification"]["auc"] == 1.0 and "at_threshold" in r["verification"]
    assert r["clusters"]["miasd"] < r["clusters"]["miesd"]
    md = E.results_markdown(r)
    assert "| 5-1 |" in md and "| 5-2 |" in md and "MRe@K Ours" in md and "mAP@R" in md


def _write_dataset(root, n_subjects=6, per_subject=3, size=32, seed=0):
    """Folder of 8-bit PNGs (a smooth random texture per subject plus noise) and a manifest."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    rows = ["subject_id,image_path"]
    for s in range(n_subjects):
        coarse = rng.random((4, 4))
        tex = np.kron(coarse, np.ones((size // 4, size // 4)))
        for i in range(per_subject):
            img = np.clip(tex + rng.normal(scale=0.05, size=tex.shape), 0, 1)
            name = f"img/s{s}_{i}.png"
            Image.fromarray((img * 255).astype(np.uint8)).save(root / name)
            rows.append(f"S{s},{name}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return [f"S{s}" for s in range(n_subjects)]


@pytest.mark.slow
def test_evaluate_command_end_to_end(tmp_path):
    torch = pytest.importorskip("torch")
    from subject_fingerprint.checkpoint import FingerprintModel, load_checkpoint, save_checkpoint
    from subject_fingerprint.preprocess import Preprocessing

    torch.set_num_threads(1)
    data = tmp_path / "data"
    subjects = _write_dataset(data)
    split = {"seed": 0, "fractions": [0.0, 0.34, 0.66], "source": str(data),
             "train": [], "val": subjects[:2], "test": subjects[2:]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    torch.manual_seed(0)
    model = FingerprintModel.create(2, depth=18, embedding_dim=16,
                                    preprocessing=Preprocessing(spatial_dims=2, size=(32, 32)))
    ckpt = save_checkpoint(model, tmp_path / "model.pt")
    model_id = load_checkpoint(ckpt).model_id

    parser = argparse.ArgumentParser()
    EC.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args([
        str(data), "--model", str(ckpt), "--manifest", str(data / "manifest.csv"),
        "--split", str(tmp_path / "split.json"), "--out", str(out), "--ways", "3", "5",
        "--shots", "1", "2", "--episodes", "4", "--baselines", "--bootstrap", "20",
        "--device", "cpu", "--write-calibration", "--quiet"])
    assert EC.main(args) == 0

    m = json.loads((out / "metrics.json").read_text())
    assert (out / "metrics.json").stat().st_mode & 0o777 == 0o644
    assert m["data"]["images"] == 12 and m["data"]["subjects"] == 4
    assert [(r["n_way"], r["k_shot"]) for r in m["nway_kshot"]] == [(3, 1), (3, 2)]
    assert any("5-way 1-shot skipped" in n for n in m["notes"])
    for name in ("ssim", "pixel-correlation"):
        b = m["baselines"][name]
        assert len(b["nway_kshot"]) == 2 and "retrieval" in b and "verification" in b
    assert {"retrieval", "verification", "clusters", "calibration"} <= set(m)
    assert m["calibration"]["fitted_on"] == "val"
    assert "at_threshold" in m["verification"]
    md = (out / "results.md").read_text()
    assert "| 3-1 |" in md and "SSIM" in md and "PixCorr" in md
    for png in ("cluster_distances.png", "pair_distances.png", "roc.png", "tsne.png"):
        assert (out / png).stat().st_size > 1000

    # The calibration went into the checkpoint, which still loads with the same weights.
    reloaded = load_checkpoint(ckpt)
    assert reloaded.model_id == model_id
    assert reloaded.calibration is not None
    assert reloaded.calibration.threshold == pytest.approx(m["calibration"]["threshold"])
    assert reloaded.metadata["metrics"]["evaluation_test"]["nway_kshot"][0]["n_way"] == 3


def test_evaluate_command_errors(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    EC.add_arguments(parser)
    (tmp_path / "split.json").write_text(json.dumps({"train": [], "val": [], "test": ["x"]}))
    args = parser.parse_args([str(tmp_path), "--model", str(tmp_path / "missing.pt"),
                              "--split", str(tmp_path / "split.json"), "--out",
                              str(tmp_path / "out"), "--quiet"])
    assert EC.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_evaluate_is_wired_into_the_command_line():
    from fingerprint_training.cli import build_parser

    args = build_parser().parse_args(["evaluate", "data", "--model", "m.pt", "--split", "s.json",
                                      "--out", "o", "--ways", "20", "--shots", "1", "5"])
    assert args.func is EC.main
    assert args.ways == [20] and args.shots == [1, 5] and args.subset == "test"
    assert args.calibrate_on == "val" and args.target_fpr == 0.01 and args.episodes == 100

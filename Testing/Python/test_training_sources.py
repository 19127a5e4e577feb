"""Training on several sources: NAME=PATH parsing, subject IDs kept apart, batches balanced
across sources, exact resume, and the command line (tiny PNG folders, a few steps)."""

import numpy as np
import pytest

from fingerprint_training.sources import BalancedSourceSampler, concat, parse_sources


def _write_source(root, prefix, n_subjects=5, per_subject=3, size=16, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    rows = ["subject_id,image_path"]
    for s in range(n_subjects):
        tex = np.kron(rng.random((4, 4)), np.ones((size // 4, size // 4)))
        for i in range(per_subject):
            img = np.clip(tex + rng.normal(scale=0.05, size=tex.shape), 0, 1)
            name = f"img/{s}_{i}.png"
            Image.fromarray((img * 255).astype(np.uint8)).save(root / name)
            rows.append(f"{prefix}{s},{name}")  # the same IDs in both sources on purpose
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")


def test_parse_sources_names_splits_and_errors(tmp_path):
    specs = parse_sources(["A=/d/a", "B=/d/b.csv"], ["A=sa.json"], [])
    assert [(s.name, s.path, s.manifest, s.split) for s in specs] == [
        ("A", "/d/a", None, "sa.json"), ("B", "/d/b.csv", "/d/b.csv", None)]
    assert parse_sources(["/data/folder"], ["s.json"])[0].name == "folder"
    assert parse_sources(["/data/folder"], ["s.json"])[0].split == "s.json"
    with pytest.raises(ValueError, match="NAME=FILE"):
        parse_sources(["A=/a", "B=/b"], ["s.json"])
    with pytest.raises(ValueError, match="no source named 'C'"):
        parse_sources(["A=/a", "B=/b"], ["C=s.json"])
    with pytest.raises(ValueError, match="must differ"):
        parse_sources(["A=/a", "A=/b"])


def test_concat_keeps_subjects_of_sources_apart():
    from fingerprint_training.data import synthetic_dataset

    a = synthetic_dataset(3, 2, size=(8, 8), seed=0)
    b = synthetic_dataset(3, 2, size=(8, 8), seed=1)   # same subject names "subject000".."002"
    ds = concat([a, b], ["A", "B"])
    assert len(ds.subjects) == 6 and "A/subject000" in ds.subjects and "B/subject000" in ds.subjects
    assert ds.source_index.tolist() == [0] * 6 + [1] * 6


def test_balanced_sampler_shares_and_is_a_function_of_the_step():
    labels = np.repeat(np.arange(30), 2)                    # 30 subjects x 2 images
    source = np.where(labels < 25, 0, 1)                    # 25 subjects in A, 5 in B
    s = BalancedSourceSampler(labels, source, 8, 2, seed=3)
    for step in range(6):
        batch = s.batch(step)
        subjects = labels[batch[::2]]
        assert len(set(subjects.tolist())) == 8
        assert (source[batch] == 1).sum() == 8               # 4 of the 8 subjects from the small source
        assert np.array_equal(batch, BalancedSourceSampler(labels, source, 8, 2, seed=3).batch(step))
    odd = BalancedSourceSampler(labels, source, 5, 2, seed=3)  # the remainder rotates with the step
    assert {(source[odd.batch(t)] == 1).sum() // 2 for t in range(4)} == {2, 3}


@pytest.mark.slow
def test_train_two_sources_from_the_command_line_and_resume_exactly(tmp_path, one_torch_thread):
    import dataclasses

    import torch
    from subject_fingerprint.checkpoint import load_checkpoint
    from fingerprint_training.cli import main

    from fingerprint_training.sources import run_multi_training
    from fingerprint_training.trainer import TrainConfig

    for name, seed in (("a", 0), ("b", 1)):
        _write_source(tmp_path / name, "P", seed=seed)
        assert main(["split", str(tmp_path / name), "--out", str(tmp_path / f"{name}.json"),
                     "--fractions", "0.6", "0.4", "0.0"]) == 0
    assert main(["train", f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}", "--split",
                 f"A={tmp_path / 'a.json'}", f"B={tmp_path / 'b.json'}", "--size", "16", "16",
                 "--depth", "10", "--embedding-dim", "8", "--steps", "4", "--warmup", "1",
                 "--batch-subjects", "4", "--images-per-subject", "2", "--val-every", "2",
                 "--val-n-way", "2", "--val-episodes", "3", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "full")]) == 0
    model = load_checkpoint(tmp_path / "full" / "best.pt")
    t = model.metadata["training"]
    assert [s["name"] for s in t["sources"]] == ["A", "B"]
    assert all(len(s["split_sha256"]) == 64 for s in t["sources"])
    assert t["train_summary"]["subjects"] == 6          # 3 + 3: "P0" of A is not "P0" of B
    assert t["hyperparameters"]["augment_preset"] == "domain"
    assert set(model.metadata["metrics"]["validation"]["per_source"]) == {"A", "B"}
    # Calibrated on each source's own pairs (float32 embeddings), the thresholds the smaller.
    from fingerprint_training.calibration_fit import calibration_pairs, thresholds_at_fprs
    from fingerprint_training.evaluate import _load_subset
    from fingerprint_training.splits import load_split
    from subject_fingerprint.embed import Embedder
    from subject_fingerprint.io import discover

    embedder = Embedder(model, device="cpu", progress=False)
    per_source = []
    for name in ("a", "b"):
        found = discover([str(tmp_path / name)], manifest=str(tmp_path / name / "manifest.csv"))
        ds = _load_subset(found.records, load_split(tmp_path / f"{name}.json"), "val", model, False)
        emb = embedder.embed_tensor(torch.as_tensor(ds.images)).numpy()
        per_source.append(thresholds_at_fprs((), calibration_pairs(emb, np.array(ds.subject_ids()))[1], [0.01])[0])
    assert model.calibration.threshold == pytest.approx(min(per_source), rel=1e-4)

    # Interrupted after 2 steps, then resumed: exactly the uninterrupted run's weights.
    specs = parse_sources([f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}"],
                          [f"A={tmp_path / 'a.json'}", f"B={tmp_path / 'b.json'}"])
    cfg = TrainConfig(source="A B", out=str(tmp_path / "part"), dims=2, depth=10, embedding_dim=8,
                      size=(16, 16), steps=4, warmup=1, batch_subjects=4, images_per_subject=2,
                      val_every=2, val_n_way=2, val_episodes=3, device="cpu", progress=False,
                      augment_preset="domain", stop_at=2)
    assert run_multi_training(cfg, specs).interrupted
    run_multi_training(dataclasses.replace(cfg, stop_at=None, resume=True), specs)
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert part["step"] == full["step"] == 4
    for k, v in full["network"].items():
        assert torch.equal(v, part["network"][k]), k


def test_val_moved_moves_the_3d_validation_volumes(one_torch_thread):
    import torch

    from fingerprint_training.data import synthetic_dataset
    from fingerprint_training.sources import MultiSourceTrainer
    from fingerprint_training.trainer import TrainConfig

    train = concat([synthetic_dataset(4, 2, size=(8, 8, 8), seed=0)], ["A"])
    val = synthetic_dataset(3, 2, size=(8, 8, 8), seed=1)
    before = val.images.clone()
    cfg = TrainConfig(dims=3, depth=10, embedding_dim=4, size=(8, 8, 8), steps=1, batch_subjects=2,
                      images_per_subject=2, device="cpu", val_moved=True, write_outputs=False,
                      progress=False, val_n_way=2, val_episodes=2)
    t = MultiSourceTrainer(cfg, train, {"A": val})
    assert not torch.allclose(t.val_sets["A"].images, before)
    assert t.val_set.images.shape == before.shape
    assert t.validate()["n_way"] == 2

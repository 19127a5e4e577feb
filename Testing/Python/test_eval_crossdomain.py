"""``evaluate`` with several sources / models: the cross-domain table (crossdomain.py)."""

import json

import pytest

from test_training_sources import _write_source


@pytest.mark.slow
def test_every_model_on_every_source_next_to_pixel_correlation(tmp_path, one_torch_thread):
    import torch
    from subject_fingerprint.checkpoint import FingerprintModel, save_checkpoint
    from fingerprint_training.cli import main
    from subject_fingerprint.preprocess import Preprocessing

    for name, seed in (("a", 0), ("b", 1)):
        _write_source(tmp_path / name, "P", n_subjects=5, seed=seed)
        assert main(["split", str(tmp_path / name), "--out", str(tmp_path / f"{name}.json"),
                     "--fractions", "0", "0", "1"]) == 0
    models = []
    for i, size in enumerate((16, 24)):
        torch.manual_seed(i)
        m = FingerprintModel.create(2, depth=10, embedding_dim=8,
                                    preprocessing=Preprocessing(spatial_dims=2, size=(size, size)))
        m.metadata["training"] = {"source": str(tmp_path / "a")}
        models.append(f"m{size}={save_checkpoint(m, tmp_path / f'm{size}.pt')}")
    out = tmp_path / "out"
    assert main(["evaluate", f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}", "--split",
                 f"A={tmp_path / 'a.json'}", f"B={tmp_path / 'b.json'}", "--model", *models,
                 "--out", str(out), "--ways", "4", "9", "--shots", "1", "--episodes", "5",
                 "--device", "cpu", "--quiet"]) == 0
    r = json.loads((out / "cross_domain.json").read_text())
    assert [(row["model"], row["source"]) for row in r["rows"]] == [
        ("m16", "A"), ("m16", "B"), ("m24", "A"), ("m24", "B")]
    assert [row["trained_on_source"] for row in r["rows"]] == [True, False, True, False]
    for row in r["rows"]:
        assert [s["n_way"] for s in row["settings"]] == [4]          # 9-way: only 5 subjects
        s = row["settings"][0]
        assert 0 <= s["model"] <= 1 and 0 <= s["pixel_correlation"] <= 1
        assert s["difference"] == pytest.approx(s["model"] - s["pixel_correlation"])
        assert row["retrieval"]["pixel_correlation"]["precision_at_1"] is not None
    # pixel correlation is measured on each model's own input grid, hence per size
    assert r["rows"][0]["input_size"] == [16, 16] and r["rows"][2]["input_size"] == [24, 24]
    md = (out / "cross_domain.md").read_text()
    assert "| m16 | A | yes | 16x16 | 4-way 1-shot |" in md
    with pytest.raises(SystemExit):
        main(["evaluate", f"A={tmp_path / 'a'}", "--out", str(out)])      # --model/--split missing
    assert main(["evaluate", f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}", "--split",
                 f"A={tmp_path / 'a.json'}", "--model", models[0], "--out", str(out), "--quiet"]) == 2


def test_write_calibration_fits_on_each_sources_validation_subjects(tmp_path, one_torch_thread):
    import numpy as np
    import torch
    from subject_fingerprint.checkpoint import FingerprintModel, load_checkpoint, save_checkpoint
    from subject_fingerprint.embed import Embedder
    from subject_fingerprint.io import discover
    from subject_fingerprint.preprocess import Preprocessing

    from fingerprint_training.calibration_fit import calibration_pairs, threshold_at_fpr
    from fingerprint_training.cli import main
    from fingerprint_training.evaluate import _load_subset
    from fingerprint_training.splits import load_split

    for name, seed in (("a", 0), ("b", 1)):
        _write_source(tmp_path / name, "P", n_subjects=8, seed=seed)
        assert main(["split", str(tmp_path / name), "--out", str(tmp_path / f"{name}.json"),
                     "--fractions", "0", "0.5", "0.5"]) == 0
    torch.manual_seed(0)
    m = FingerprintModel.create(2, depth=10, embedding_dim=8,
                                preprocessing=Preprocessing(spatial_dims=2, size=(16, 16)))
    path = save_checkpoint(m, tmp_path / "m.pt", half=True)
    assert load_checkpoint(path).calibration is None
    out = tmp_path / "out"
    assert main(["evaluate", f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}", "--split",
                 f"A={tmp_path / 'a.json'}", f"B={tmp_path / 'b.json'}", "--model", f"m={path}",
                 "--out", str(out), "--ways", "3", "--shots", "1", "--episodes", "5",
                 "--device", "cpu", "--quiet", "--write-calibration"]) == 0
    model = load_checkpoint(path)
    assert torch.load(path, weights_only=True)["state_dict"]["fc.weight"].dtype == torch.float16
    embedder = Embedder(model, device="cpu", progress=False)
    own = []
    for name in ("a", "b"):
        found = discover([str(tmp_path / name)])
        ds = _load_subset(found.records, load_split(tmp_path / f"{name}.json"), "val", model, False)
        neg = calibration_pairs(embedder.embed_tensor(torch.as_tensor(ds.images)).numpy(),
                                np.array(ds.subject_ids()))[1]
        own.append(threshold_at_fpr(neg, 0.01))
    assert model.calibration.threshold == pytest.approx(min(own), rel=1e-4)
    assert "pairs within each source" in model.metadata["metrics"]["calibration_fitted_on"]
    rows = json.loads((out / "cross_domain.json").read_text())["rows"]
    for row in rows:  # the test subjects' operating point at that threshold
        assert row["calibration"]["threshold"] == pytest.approx(model.calibration.threshold)
        assert 0 <= row["calibration"]["fpr"] <= 1
    assert "at target 1.0" in (out / "cross_domain.md").read_text()

"""The pair-verification head (Packhäuser et al.): learns same/different from embedding pairs,
travels in the checkpoint (hash-checked, outside the model ID), trains and resumes with
`train --verification-head`, and is scored by `evaluate` next to the distance."""

import json

import numpy as np
import pytest
import torch

from subject_fingerprint.verification import PairHead, batch_pair_loss, pair_probabilities


def _clusters(n_subjects=12, per_subject=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_subjects, dim, generator=g) * 3
    labels = torch.arange(n_subjects).repeat_interleave(per_subject)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def test_head_learns_same_versus_different_and_is_symmetric(one_torch_thread):
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    head = PairHead(8, hidden=16)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for step in range(150):
        e, labels = _clusters(seed=step)
        loss, _ = batch_pair_loss(head, e, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    e, labels = _clusters(seed=999)  # new subjects: the head learned a rule, not identities
    i, j = np.triu_indices(len(labels), 1)
    p = pair_probabilities(head, e[i], e[j])
    same = (labels[i] == labels[j]).numpy()
    assert roc_auc_score(same, p) > 0.95
    np.testing.assert_allclose(p, pair_probabilities(head, e[j], e[i]), rtol=1e-6)
    assert np.all((p >= 0) & (p <= 1))


def test_batch_without_positives_gives_a_zero_loss_that_touches_the_weights():
    head = PairHead(4)
    loss, accuracy = batch_pair_loss(head, torch.randn(3, 4), torch.tensor([0, 1, 2]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and np.isnan(accuracy)
    assert all(p.grad is not None for p in head.parameters())


def test_head_travels_in_the_checkpoint_outside_the_model_id(tmp_path):
    from subject_fingerprint.checkpoint import load_checkpoint, save_checkpoint
    from subject_fingerprint.errors import CheckpointError
    from subject_fingerprint.model import FingerprintModel
    from subject_fingerprint.preprocess import Preprocessing

    torch.manual_seed(0)
    model = FingerprintModel.create(2, depth=10, embedding_dim=8,
                                    preprocessing=Preprocessing(spatial_dims=2, size=(16, 16)))
    plain_id = model.model_id
    model.pair_head = PairHead(8, hidden=4, normalize=True)
    save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.model_id == plain_id and loaded.metadata["pair_head"]["normalize"] is True
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    np.testing.assert_allclose(pair_probabilities(loaded.pair_head, a, b),
                               pair_probabilities(model.pair_head, a, b), rtol=1e-6)
    assert load_checkpoint(tmp_path / "m.pt").pair_head is not None
    # A model without a head loads with none; a tampered head is refused.
    model.pair_head = None
    save_checkpoint(model, tmp_path / "plain.pt")
    assert load_checkpoint(tmp_path / "plain.pt").pair_head is None
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["pair_head_state"]["net.0.weight"] += 1.0
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="pair-head weights"):
        load_checkpoint(tmp_path / "tampered.pt")


@pytest.mark.slow
def test_train_with_the_head_resumes_and_evaluate_scores_it(tmp_path, one_torch_thread):
    import dataclasses

    from subject_fingerprint.checkpoint import load_checkpoint
    from fingerprint_training.cli import main
    from fingerprint_training.trainer import TrainConfig, run_training

    from test_training_cli import _png_folder

    data = _png_folder(tmp_path / "data", n_subjects=10)
    split = tmp_path / "split.json"
    assert main(["split", str(data), "--out", str(split), "--fractions", "0.6", "0.4", "0"]) == 0
    cfg = TrainConfig(source=str(data), split=str(split), out=str(tmp_path / "full"), dims=2,
                      depth=10, embedding_dim=8, size=(32, 32), steps=4, warmup=1,
                      batch_subjects=3, images_per_subject=2, val_every=2, val_n_way=2,
                      val_episodes=3, device="cpu", progress=False, verification_head=True)
    run_training(cfg)
    part = dataclasses.replace(cfg, out=str(tmp_path / "part"), stop_at=2)
    assert run_training(part).interrupted
    run_training(dataclasses.replace(part, stop_at=None, resume=True))
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    for k, v in full["pair_head"].items():
        assert torch.equal(v, resumed["pair_head"][k]), k
    log = (tmp_path / "full" / "log.csv").read_text().splitlines()
    assert "pair_accuracy" in log[0]
    model = load_checkpoint(tmp_path / "full" / "best.pt")
    assert model.pair_head is not None
    out = tmp_path / "eval"
    assert main(["evaluate", str(data), "--model", str(tmp_path / "full" / "best.pt"), "--split",
                 str(split), "--subset", "val", "--calibrate-on", "val", "--out", str(out),
                 "--ways", "2", "--shots", "1", "--episodes", "5", "--bootstrap", "20",
                 "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    head = metrics["verification_head"]
    assert 0.0 <= head["auc"] <= 1.0 and head["positive_pairs"] == metrics["verification"]["positive_pairs"]
    assert "pair-verification head" in (out / "results.md").read_text()

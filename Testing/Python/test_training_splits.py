"""Subject-disjoint, seeded splits; the subject-balanced sampler; augmentation."""

import json

import numpy as np
import pytest
import torch

from fingerprint_training.augment import augment
from fingerprint_training.sampler import InstanceBatchSampler, SubjectBatchSampler
from fingerprint_training.splits import check_split, load_split, make_split, records_in, save_split
from subject_fingerprint.records import ImageRecord


def _records(n_multi=30, n_single=10):
    recs = []
    for s in range(n_multi):
        for i in range(2 + s % 3):
            recs.append(ImageRecord(f"/x/s{s}_{i}.png", f"s{s}", f"s{s}_{i}.png"))
    for s in range(n_single):
        recs.append(ImageRecord(f"/x/u{s}.png", f"u{s}", f"u{s}.png"))
    return recs


def test_split_is_disjoint_complete_and_deterministic(tmp_path):
    recs = _records()
    a = make_split(recs, seed=42, source="x")
    b = make_split(list(reversed(recs)), seed=42, source="x")
    c = make_split(recs, seed=43, source="x")
    assert a == b and a["train"] != c["train"]
    sets = [set(a[n]) for n in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set().union(*sets) == {r.subject_id for r in recs}
    # multi-image subjects are shared out by the fractions (21/3/6 of 30)
    assert [a["counts"][n]["subjects_with_2plus_images"] for n in ("train", "val", "test")] == [21, 3, 6]
    path = save_split(a, tmp_path / "s.json")
    assert load_split(path) == json.loads(path.read_text())
    assert {r.subject_id for r in records_in(recs, a, "test")} == set(a["test"])


def test_overlapping_split_is_rejected():
    with pytest.raises(ValueError):
        check_split({"train": ["a", "b"], "val": ["b"], "test": []})


def test_committed_cxr_split_matches_the_data(shared_data, repo_root):
    discover = getattr(pytest.importorskip("subject_fingerprint.io"), "discover", None)
    if discover is None:
        pytest.skip("subject_fingerprint.io.discover not available")
    src = shared_data / "cxr14-subset-64px"
    split = load_split(repo_root / "Resources" / "Splits" / "cxr14-subset-64px-seed42.json")
    fresh = make_split(discover([str(src)]).records, fractions=split["fractions"], seed=split["seed"])
    for name in ("train", "val", "test"):
        assert fresh[name] == split[name]


def test_sampler_is_subject_balanced_and_skips_singletons():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 4])  # subject 2 is a singleton
    s = SubjectBatchSampler(labels, subjects_per_batch=3, images_per_subject=2, seed=5)
    for step in range(20):
        batch = s.batch(step)
        subj, counts = np.unique(labels[batch], return_counts=True)
        assert len(subj) == 3 and (counts == 2).all() and 2 not in subj
        assert len(set(batch.tolist())) == 6  # no image twice when a subject has enough
    assert np.array_equal(s.batch(7), SubjectBatchSampler(labels, 3, 2, seed=5).batch(7))
    assert not np.array_equal(s.batch(7), SubjectBatchSampler(labels, 3, 2, seed=6).batch(7))


def test_sampler_ranks_draw_different_subjects_from_a_shared_stream():
    labels = np.repeat(np.arange(10), 3)
    r0 = SubjectBatchSampler(labels, 2, 3, seed=1, rank=0, world_size=2)
    r1 = SubjectBatchSampler(labels, 2, 3, seed=1, rank=1, world_size=2)
    single = SubjectBatchSampler(labels, 4, 3, seed=1)
    for step in range(10):
        a, b = set(labels[r0.batch(step)]), set(labels[r1.batch(step)])
        assert len(a) == 2 and len(b) == 2 and not (a & b)
        assert a | b == set(labels[single.batch(step)])


def test_cross_modal_sampler_always_gives_two_modalities():
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    groups = np.array([1, 1, 2, 1, 2, 1, 1])  # subject 2 has one modality only -> not trainable
    s = SubjectBatchSampler(labels, 2, 2, seed=0, groups=groups, cross_modal=True)
    assert s.num_subjects == 2
    for step in range(30):
        batch = s.batch(step)
        for subj in (0, 1):
            assert len(set(groups[batch][labels[batch] == subj])) == 2


def test_instance_sampler_repeats_each_image():
    s = InstanceBatchSampler(10, 4, copies=2, seed=0)
    b = s.batch(3)
    assert len(b) == 8 and (np.unique(b, return_counts=True)[1] == 2).all()


def test_augmentation_is_seeded_small_and_shape_preserving():
    x = torch.rand(3, 1, 32, 32)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    c = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    v = torch.rand(2, 1, 16, 16, 16)
    assert augment(v, torch.Generator().manual_seed(0)).shape == v.shape

"""Calibration fitting and the pixel baselines."""

import numpy as np
import pytest

from fingerprint_training import baselines as B
from fingerprint_training import calibration_fit as C
from fingerprint_training import metrics as M


def _distances(seed=0):
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(1.0, 0.4, 300)), np.abs(rng.normal(3.0, 0.7, 4000))


def test_fit_calibration_monotone_and_threshold_fpr():
    from subject_fingerprint.calibration import Calibration

    pos, neg = _distances()
    cal = C.fit_calibration(pos, neg, target_fpr=0.01)
    assert isinstance(cal, Calibration) and cal.coef < 0
    p = cal.probability(np.linspace(0, 6, 50))
    assert np.all(np.diff(p) < 0)
    assert cal.probability(0.5) > 0.9 and cal.probability(5.0) < 0.1
    # The threshold gives the target FPR on the negatives it was fitted on (at most).
    fpr = (neg <= cal.threshold).mean()
    assert 0.009 <= fpr <= 0.01
    # The table lets other operating points be picked; a looser FPR = a larger threshold.
    assert cal.threshold_for_fpr(0.1) > cal.threshold > cal.threshold_for_fpr(0.001)
    assert (neg <= cal.threshold_for_fpr(0.1)).mean() == pytest.approx(0.1, abs=0.005)
    # Round trip through the checkpoint's dict form.
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_grouped_negatives_keep_every_group_within_the_target():
    rng = np.random.default_rng(1)
    pos = np.abs(rng.normal(1.0, 0.3, 200))
    easy, hard = rng.normal(5.0, 0.5, 6000), rng.normal(2.0, 0.5, 2000)
    neg = np.concatenate([easy, hard])
    pooled = C.fit_calibration(pos, neg, target_fpr=0.01)
    grouped = C.fit_calibration(pos, neg, target_fpr=0.01,
                                neg_groups=np.r_[np.zeros(len(easy)), np.ones(len(hard))])
    # Pooled, the easy group dilutes the rate: the hard group sees about 4 times the target.
    assert (hard <= pooled.threshold).mean() > 0.03
    assert (hard <= grouped.threshold).mean() <= 0.01 and (easy <= grouped.threshold).mean() <= 0.01
    assert grouped.threshold == C.threshold_at_fpr(hard, 0.01)
    with pytest.raises(ValueError, match="one code per negative"):
        C.fit_calibration(pos, neg, neg_groups=[0, 1])


def test_threshold_at_fpr_by_hand():
    neg = [4.0, 1.0, 3.0, 2.0]
    assert C.threshold_at_fpr(neg, 0.25) == 1.5   # accepts exactly the smallest
    assert C.threshold_at_fpr(neg, 0.5) == 2.5
    assert C.threshold_at_fpr(neg, 0.0) < 1.0     # accepts none
    assert C.threshold_at_fpr([1.0, 1.0, 2.0], 0.34) < 1.0  # ties at the edge stay out


def test_calibration_errors():
    with pytest.raises(ValueError, match="at least 2"):
        C.fit_calibration([1.0], [2.0, 3.0])
    with pytest.raises(ValueError, match="not closer"):
        C.fit_calibration([3.0, 3.5, 4.0, 3.2], [0.5, 1.0, 0.7, 0.8])


def test_fit_from_embeddings():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 3)
    e = rng.normal(size=(20, 8))[labels] * 5 + rng.normal(size=(60, 8)) * 0.5
    pos, neg = C.calibration_pairs(e, labels, max_negatives=500, seed=1)
    assert len(pos) == 20 * 3 and len(neg) == 500
    cal = C.fit_from_embeddings(e, labels, target_fpr=0.05, seed=1, max_negatives=500)
    assert cal.probability(float(np.median(pos))) > 0.5 > cal.probability(float(np.median(neg)))


# -- baselines ----------------------------------------------------------------------------------------

def _images(n=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, size, size)).astype(np.float32)


def test_pixel_correlation_matches_numpy():
    im = _images()
    im[1] = im[0] * 0.5 + 0.2                    # linear change: correlation 1
    pc = B.PixelCorrelation(im)
    d = pc.matrix()
    r = np.corrcoef(im.reshape(len(im), -1))
    assert np.allclose(d, 1 - r, atol=1e-9)
    assert d[0, 0] == pytest.approx(0, abs=1e-12) and d[0, 1] == pytest.approx(0, abs=1e-9)
    assert pc(0, [1, 2]) == pytest.approx(d[0, [1, 2]])


def test_ssim_identical_zero_and_matches_skimage():
    from skimage.metrics import structural_similarity

    im = _images(4, 16)
    im[2] = im[0]
    s = B.SSIMDistance(im, size=32)
    assert s.images.shape == (4, 32, 32)
    assert s.pair(0, 2) == pytest.approx(0.0, abs=1e-12)
    assert s.pair(1, 1) == 0.0
    ref = 1 - structural_similarity(B.upsample(im[0, 0], 32), B.upsample(im[1, 0], 32), data_range=1.0)
    assert s.pair(0, 1) == pytest.approx(ref)
    assert s(1, [0])[0] == s.pair(0, 1)          # symmetric, cached
    assert s.pairs_computed == 2
    assert s.block([0]).shape == (1, 4)
    # Batched path equals skimage on every pair.
    for j in (1, 3):
        ref = 1 - structural_similarity(s.images[2], s.images[j], data_range=1.0)
        assert s.distances(2, [j])[0] == pytest.approx(ref, abs=1e-10)


def test_ssim_3d_matches_skimage():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    vol = rng.random((3, 1, 9, 10, 11))
    s = B.SSIMDistance(vol, size=0)
    d = s.block([0])[0]
    assert d[0] == 0.0
    for j in (1, 2):
        assert d[j] == pytest.approx(1 - structural_similarity(vol[0, 0], vol[j, 0], data_range=1.0),
                                     abs=1e-10)


def test_ssim_default_size_is_256():
    s = B.SSIMDistance(_images(2, 8))
    assert s.images.shape == (2, B.SSIM_SIZE, B.SSIM_SIZE)


def test_baselines_on_same_episodes_and_retrieval():
    # Two images per subject; subject k's images differ by a little noise.
    rng = np.random.default_rng(3)
    base = rng.random((5, 1, 12, 12))
    im = np.concatenate([base, base + rng.normal(scale=0.05, size=base.shape)])
    labels = np.concatenate([np.arange(5), np.arange(5)])
    pc = B.PixelCorrelation(im)
    r = B.baseline_nway_kshot(pc, labels, 5, 1, episodes=5)
    assert r["mean_recall_at_k"] == 1.0 and r["distance"] == "pixel-correlation"
    assert B.baseline_retrieval(pc, labels)["precision_at_1"] == 1.0
    ss = B.SSIMDistance(im, size=24)
    assert B.baseline_nway_kshot(ss, labels, 5, 1, episodes=3)["mean_hit_at_r"]["1"] == 1.0
    assert B.baseline_retrieval(ss, labels)["map_at_r"] == 1.0
    # The baseline sees exactly the episodes of the embedding evaluation: 1 - r between
    # unit-length standardised vectors ranks like their Euclidean distance, so scoring the
    # vectors as embeddings must give identical figures, episode for episode.
    noisy = np.concatenate([base, base + rng.normal(scale=2.5, size=base.shape)])
    pc2 = B.PixelCorrelation(noisy)
    ref = M.nway_kshot(pc2.z, labels, 4, 1, episodes=30, seed=2)
    got = B.baseline_nway_kshot(pc2, labels, 4, 1, episodes=30, seed=2)
    assert 0 < ref["mean_recall_at_k"] < 1
    assert got["mean_recall_at_k"] == pytest.approx(ref["mean_recall_at_k"])
    assert got["mean_hit_at_r"] == pytest.approx(ref["mean_hit_at_r"])

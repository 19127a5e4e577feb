"""Evaluation metrics against values worked out by hand on tiny point sets."""

import math

import numpy as np
import pytest

from fingerprint_training import metrics as M
from subject_fingerprint.distances import pairwise


# -- N-way K-shot ----------------------------------------------------------------------------

def test_score_episode_hand_matrix():
    # 2-way 2-shot; supports in subject-major order [s0a, s0b, s1a, s1b].
    dist = np.array([
        [0.5, 3.0, 1.0, 2.0],   # subject 0: order s0a(rel) s1a s1b s0b
        [0.1, 0.2, 0.5, 0.6],   # subject 1: order s0a s0b s1a(rel) s1b(rel)
    ])
    recall, hits = M.score_episode(dist, k_shot=2, max_r=4)
    assert recall.tolist() == [0.5, 0.0]
    assert hits[0].tolist() == [True, True, True, True]
    assert hits[1].tolist() == [False, False, True, True]


def test_nway_kshot_hand_points():
    # A is tight, B straddles A (its own other image is always twice as far as A's),
    # C is far away. 3-way 1-shot: A and C queries hit at rank 1, a B query finds A's
    # support first and its own second, whatever images the episode picks.
    e = np.array([[0, 0], [0, 0.1], [-3, 0], [3, 0], [100, 0], [100, 0.1]], dtype=float)
    labels = np.array(["A", "A", "B", "B", "C", "C"])
    r = M.nway_kshot(e, labels, n_way=3, k_shot=1, episodes=7, seed=3)
    assert r["n_way"] == 3 and r["k_shot"] == 1 and r["episodes"] == 7
    assert r["mean_recall_at_k"] == pytest.approx(2 / 3)
    assert r["mean_hit_at_r"]["1"] == pytest.approx(2 / 3)
    # Only 3 supports: Hit@R for R >= 2 is 1 (R beyond the list counts the whole list).
    assert [r["mean_hit_at_r"][str(k)] for k in range(2, 6)] == [pytest.approx(1.0)] * 4
    assert r["std_recall_at_k"] == pytest.approx(0.0)
    assert r["eligible_subjects"] == 3


def test_nway_kshot_two_shot_perfect_and_chance_ties():
    rng = np.random.default_rng(0)
    centres = np.arange(5)[:, None] * np.array([[100.0, 0.0]])
    e = np.repeat(centres, 3, axis=0) + rng.normal(scale=0.01, size=(15, 2))
    labels = np.repeat(np.arange(5), 3)
    r = M.nway_kshot(e, labels, 4, 2, episodes=10)
    assert r["mean_recall_at_k"] == 1.0 and r["mean_hit_at_r"]["1"] == 1.0
    # All embeddings equal: ties are broken at random, so the score is near chance (1/4),
    # never the perfect score a position-based tie-break would give.
    flat = M.nway_kshot(np.zeros((15, 2)), labels, 4, 2, episodes=200)
    assert 0.15 < flat["mean_hit_at_r"]["1"] < 0.35


def test_nway_kshot_deterministic_given_seed():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(12), 3)
    e = rng.normal(size=(36, 4)) + labels[:, None] * 0.2
    a = M.nway_kshot(e, labels, 5, 1, episodes=20, seed=7)
    b = M.nway_kshot(e, labels, 5, 1, episodes=20, seed=7)
    assert a == b
    ea = M.sample_episodes(labels, 5, 1, 20, seed=7)
    eb = M.sample_episodes(labels, 5, 1, 20, seed=8)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(ea, eb))


def test_episode_structure_without_replacement():
    labels = np.repeat(np.arange(6), 4)
    for queries, supports in M.sample_episodes(labels, 4, 3, episodes=10, seed=0):
        assert len(set(labels[queries].tolist())) == 4
        for q, s in zip(queries, supports):
            assert (labels[s] == labels[q]).all()
            assert len({int(q), *s.tolist()}) == 4  # query and supports all distinct


def test_too_few_subjects_error_says_how_many():
    labels = np.array([0, 0, 1, 1, 2, 2, 3])  # subject 3 has one image: not eligible
    with pytest.raises(ValueError, match=r"only 3 subject"):
        M.nway_kshot(np.zeros((7, 2)), labels, n_way=4, k_shot=1)
    with pytest.raises(ValueError, match=r"only 0 subject"):
        M.nway_kshot(np.zeros((7, 2)), labels, n_way=2, k_shot=2)


def test_cross_modal_groups():
    labels = np.repeat(np.arange(5), 4)
    groups = np.tile(np.arange(4), 5)          # four modalities per subject
    for queries, supports in M.sample_episodes(labels, 5, 3, episodes=5, seed=0, groups=groups):
        for q, s in zip(queries, supports):
            assert groups[q] not in groups[s].tolist()
    # Two images of the same modality cannot give a cross-modal 1-shot.
    with pytest.raises(ValueError, match="other modalities"):
        M.sample_episodes([0, 0, 1, 1], 2, 1, groups=[0, 0, 0, 0])


def test_same_episodes_for_distance_matrix_and_function():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(8), 3)
    e = rng.normal(size=(24, 3)) + labels[:, None] * 0.3
    ref = M.nway_kshot(e, labels, 6, 2, episodes=15, seed=4)
    d = pairwise(e, e)
    by_matrix = M.nway_kshot_from_distances(d, labels, 6, 2, episodes=15, seed=4)
    by_fn = M.nway_kshot_from_distances(lambda q, s: d[q, s], labels, 6, 2, episodes=15, seed=4)
    for r in (by_matrix, by_fn):
        assert r["mean_recall_at_k"] == pytest.approx(ref["mean_recall_at_k"])
        assert r["mean_hit_at_r"] == pytest.approx(ref["mean_hit_at_r"])


# -- whole-gallery retrieval ----------------------------------------------------------------------

# A has three images (R = 2), B two (R = 1), C one (distractor only). Rankings by hand:
#   a1: c, a2, b1, a3, b2   -> R-P 1/2, AP@R (0 + 1/2)/2 = 1/4, P@1 0
#   a2: a1, b1, c, a3, b2   -> R-P 1/2, AP@R (1)/2 = 1/2,       P@1 1
#   a3: a1, c, a2, b2, b1   -> R-P 1/2, AP@R 1/2,               P@1 1
#   b1: a2, a1, c, ...      -> 0;  b2: a3, ... -> 0
RET_POINTS = np.array([[0, 0], [1, 0], [0, 3], [2.5, 0], [2.5, 5], [-0.8, 0]], dtype=float)
RET_LABELS = np.array(["A", "A", "A", "B", "B", "C"])


@pytest.mark.parametrize("block_size", [1, 2, 1024])
def test_retrieval_hand_values(block_size):
    r = M.retrieval_metrics(RET_POINTS, RET_LABELS, block_size=block_size)
    assert r["queries"] == 5 and r["gallery"] == 6
    assert r["map_at_r"] == pytest.approx((0.25 + 0.5 + 0.5) / 5)
    assert r["r_precision"] == pytest.approx(1.5 / 5)
    assert r["precision_at_1"] == pytest.approx(2 / 5)


def test_retrieval_block_fn_matches_embeddings():
    d = pairwise(RET_POINTS, RET_POINTS)
    r = M.retrieval_metrics(labels=RET_LABELS, block_fn=lambda q: d[q])
    assert r == M.retrieval_metrics(RET_POINTS, RET_LABELS)


def test_retrieval_needs_a_pair():
    with pytest.raises(ValueError, match="two or more images"):
        M.retrieval_metrics(np.zeros((3, 2)), ["a", "b", "c"])


# -- verification ------------------------------------------------------------------------------------

def test_auc_and_threshold_by_hand():
    pos, neg = [1.0, 2.0], [1.5, 3.0, 4.0]
    # 5 of the 6 (pos, neg) pairs are ordered correctly.
    assert M.roc_auc(pos, neg) == pytest.approx(5 / 6)
    t = M.threshold_metrics(pos, neg, 1.75)
    assert t["tpr"] == 0.5 and t["fpr"] == pytest.approx(1 / 3)
    assert t["accuracy"] == pytest.approx(3 / 5)


def test_verification_pairs_and_bootstrap():
    e = np.array([[0.0], [1.0], [5.0], [6.5], [20.0]])
    labels = np.array([0, 0, 1, 1, 2])
    pos, neg = M.pair_indices(labels)
    assert sorted(map(tuple, pos.tolist())) == [(0, 1), (2, 3)]
    assert len(neg) == 10 - 2
    v = M.verification_metrics(e, labels, threshold=1.2, n_boot=200, seed=0)
    # pos distances 1, 1.5; smallest negative 3.5 -> perfect separation.
    assert v["auc"] == 1.0 and v["positive_pairs"] == 2 and v["negative_pairs"] == 8
    assert v["at_threshold"]["tpr"] == 0.5 and v["at_threshold"]["fpr"] == 0.0
    assert v["auc_ci95"][0] <= v["auc"] <= v["auc_ci95"][1]
    assert v == M.verification_metrics(e, labels, threshold=1.2, n_boot=200, seed=0)


def test_bootstrap_interval_covers_auc():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 200), rng.normal(2, 1, 400)
    lo, hi = M.bootstrap_auc(pos, neg, n_boot=200, seed=1)
    auc = M.roc_auc(pos, neg)
    assert lo < auc < hi and hi - lo < 0.2


def test_negative_sampling_is_seeded_and_valid():
    labels = np.repeat(np.arange(30), 2)
    pos, neg = M.pair_indices(labels, max_negatives=100, seed=5)
    assert len(pos) == 30 and len(neg) == 100
    assert len({tuple(p) for p in neg.tolist()}) == 100
    assert (labels[neg[:, 0]] != labels[neg[:, 1]]).all() and (neg[:, 0] < neg[:, 1]).all()
    assert np.array_equal(neg, M.pair_indices(labels, max_negatives=100, seed=5)[1])


# -- MIASD / MIESD ------------------------------------------------------------------------------------

def test_cluster_distances_by_hand():
    e = np.array([[0, 0], [2, 0], [0, 4], [0, 6], [4, 0], [4, 0], [100, 100]], dtype=float)
    labels = np.array(["A", "A", "B", "B", "C", "C", "D"])  # D: one image, left out
    c = M.cluster_distances(e, labels)
    # centroids A (1,0), B (0,5), C (4,0); intra 1, 1, 0
    assert c["subjects"] == 3
    assert c["miasd"] == pytest.approx(2 / 3)
    assert c["miasd_std"] == pytest.approx(math.sqrt(2 / 9))
    inter = [(math.sqrt(26) + 3) / 2, (math.sqrt(26) + math.sqrt(41)) / 2, (3 + math.sqrt(41)) / 2]
    assert c["inter"] == pytest.approx(inter)
    assert c["miesd"] == pytest.approx(np.mean(inter))
    assert c["miesd_std"] == pytest.approx(np.std(inter))


def test_cosine_distance():
    d = pairwise([[1, 0]], [[2, 0], [0, 3], [-1, 0]], "cosine")
    assert d[0].tolist() == pytest.approx([0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="unknown distance"):
        pairwise([[1]], [[1]], "manhattan")


def test_bootstrap_weights_equal_explicit_resamples():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    pos = np.round(rng.normal(1, 1, 40), 1)   # rounding makes ties
    neg = np.round(rng.normal(2, 1, 60), 1)
    y = np.concatenate([np.ones(40), np.zeros(60)])
    s = -np.concatenate([pos, neg])
    draws = np.random.default_rng(3)
    aucs = [roc_auc_score(y[i], s[i]) for i in (draws.integers(0, 100, 100) for _ in range(50))]
    lo, hi = M.bootstrap_auc(pos, neg, n_boot=50, seed=3)
    assert lo == pytest.approx(np.quantile(aucs, 0.025)) and hi == pytest.approx(np.quantile(aucs, 0.975))

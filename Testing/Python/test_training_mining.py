"""Miners, losses and the cross-batch memory (pytorch-metric-learning) on hand-built distances."""

import math

import pytest
import torch
from pytorch_metric_learning.distances import BaseDistance

from fingerprint_training.losses import MetricObjective, build_loss
from fingerprint_training.mining import (Algorithm1Miner, EuclideanDistance, build_miner,
                                         other_modality_only)

INF = 99.0


class FixedDistance(BaseDistance):
    """A PML distance that looks up a hand-made matrix; the "embeddings" are row numbers."""

    def __init__(self, matrix):
        super().__init__(normalize_embeddings=False)
        self.matrix = matrix

    def compute_mat(self, query_emb, ref_emb):
        return self.matrix[query_emb[:, 0].long()][:, ref_emb[:, 0].long()]


def _rows(n):
    return torch.arange(n, dtype=torch.float32)[:, None]


def _triplets(miner, d, labels):
    miner.distance = FixedDistance(d)
    a, p, n = miner(_rows(len(labels)), torch.tensor(labels))
    return list(zip(a.tolist(), p.tolist(), n.tolist()))


def test_euclidean_distance_matches_cdist_and_has_finite_gradient():
    x = torch.randn(5, 3, requires_grad=True)
    d = EuclideanDistance()(torch.cat([x, x[:1]]))
    assert torch.allclose(d[:5, :5], torch.cdist(x, x), atol=1e-4)
    d[0, 5].backward()  # identical rows: distance 0
    assert torch.isfinite(x.grad).all()


def test_algorithm1_picks_only_negatives_not_farther_than_the_positive():
    # images 0,1 subject A; 2,3 subject B; 4 subject C
    d = torch.tensor([
        [0.0, 2.0, 1.0, 3.0, 2.0],   # anchor 0: d+=2 -> hard set {2 (1.0), 4 (2.0, equal counts)}
        [2.0, 0.0, 5.0, 6.0, 7.0],   # anchor 1: d+=2, no negative <= 2 -> dropped
        [1.0, 5.0, 0.0, 4.0, 9.0],   # anchor 2: d+=4 -> {0}
        [3.0, 6.0, 4.0, 0.0, 0.5],   # anchor 3: d+=4 -> {0, 4}
        [2.0, 7.0, 9.0, 0.5, 0.0],   # subject C has no positive: never an anchor
    ])
    got = {(a, p): n for a, p, n in _triplets(Algorithm1Miner(torch.Generator().manual_seed(0)),
                                              d, [0, 0, 1, 1, 2])}
    assert set(got) == {(0, 1), (2, 3), (3, 2)}  # (1, 0) dropped: no hard negative
    assert got[(0, 1)] in (2, 4)
    assert got[(2, 3)] == 0
    assert got[(3, 2)] in (0, 4)


def test_algorithm1_no_negative_drops_everything_and_the_loss_is_zero():
    d = torch.tensor([[0.0, 1.0, 5.0, 6.0], [1.0, 0.0, 7.0, 8.0],
                      [5.0, 7.0, 0.0, 1.0], [6.0, 8.0, 1.0, 0.0]])
    assert _triplets(Algorithm1Miner(), d, [0, 0, 1, 1]) == []
    emb = torch.randn(4, 3, requires_grad=True)
    obj = MetricObjective(miner="algorithm1", margin=4.0)
    obj.miner.distance = FixedDistance(d)
    loss, stats = obj(_rows(4), torch.tensor([0, 0, 1, 1]))
    assert float(loss) == 0.0 and stats.used_triplets == 0 and stats.candidates == 4
    # an empty batch of triplets still gives a loss connected to the network (DDP)
    loss, _ = MetricObjective(margin=0.0)(emb, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert emb.grad is not None


def test_algorithm1_random_choice_covers_the_whole_hard_set_uniformly():
    # anchor 0 (positive 1 at distance 3) has three hard negatives 2, 3, 4 and one easy 5.
    d = torch.full((6, 6), INF)
    d.fill_diagonal_(0)
    d[0, 1] = d[1, 0] = 3.0
    d[0, 2], d[0, 3], d[0, 4], d[0, 5] = 0.5, 2.0, 3.0, 3.5
    labels = [0, 0, 1, 2, 3, 4]
    miner = Algorithm1Miner(torch.Generator().manual_seed(1))
    counts = {}
    for _ in range(600):
        n = next(n for a, p, n in _triplets(miner, d, labels) if a == 0)
        counts[n] = counts.get(n, 0) + 1
    assert set(counts) == {2, 3, 4}
    assert all(150 < c < 250 for c in counts.values()), counts
    # same generator seed -> same choices (reproducible training)
    a = _triplets(Algorithm1Miner(torch.Generator().manual_seed(7)), d, labels)
    b = _triplets(Algorithm1Miner(torch.Generator().manual_seed(7)), d, labels)
    assert a == b


def test_batch_hard_takes_farthest_positive_and_closest_negative():
    d = torch.tensor([
        [0.0, 1.0, 3.0, 2.5, 9.0],
        [1.0, 0.0, 2.0, 4.0, 1.5],
        [3.0, 2.0, 0.0, 6.0, 7.0],
        [2.5, 4.0, 6.0, 0.0, 0.7],
        [9.0, 1.5, 7.0, 0.7, 0.0],
    ])
    got = {a: (p, n) for a, p, n in _triplets(build_miner("batch-hard", 1.0), d, [0, 0, 0, 1, 1])}
    # anchor 3 (subject 1): only positive 4, closest negative 0 (2.5); anchor 4: 3 and 1 (1.5)
    assert got == {0: (2, 3), 1: (2, 4), 2: (0, 3), 3: (4, 0), 4: (3, 1)}


def test_all_miner_enumerates_every_triplet_within_the_margin():
    d = torch.ones(5, 5) - torch.eye(5)  # every triplet has loss = margin > 0
    assert len(_triplets(build_miner("all", 0.5), d, [0, 0, 1, 1, 2])) == 4 * 3


def test_triplet_loss_hand_computed_averages_the_non_zero_terms():
    d = torch.tensor([[0.0, 2.0, 1.0], [2.0, 0.0, 3.0], [1.0, 3.0, 0.0]])
    loss_fn = build_loss("triplet", margin=0.5)
    loss_fn.distance = FixedDistance(d)
    triplets = (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2, 2]))
    loss = loss_fn(_rows(3), torch.tensor([0, 0, 1]), triplets)
    # anchor 0: 2 - 1 + .5 = 1.5 ; anchor 1: 2 - 3 + .5 = -0.5 -> 0 (not counted)
    assert math.isclose(float(loss), 1.5)


def test_contrastive_loss_hand_computed():
    d = torch.tensor([[0.0, 0.4, 0.3, 1.5], [0.4, 0.0, 0.9, 0.2],
                      [0.3, 0.9, 0.0, 0.1], [1.5, 0.2, 0.1, 0.0]])
    obj = MetricObjective(loss="contrastive", miner="all", margin=1.0)
    obj.loss_fn.distance = FixedDistance(d)
    loss, stats = obj(_rows(4), torch.tensor([0, 0, 1, 1]))
    # positives (both directions): 0.4, 0.4, 0.1, 0.1 -> mean 0.25
    # negatives: 1-0.3, 1-1.5->0, 1-0.9, 1-0.2 (x2 directions): 0.7, 0.1, 0.8 non-zero -> mean 1.6/3
    assert math.isclose(float(loss), 0.25 + 1.6 / 3, rel_tol=1e-5)
    assert stats.active == 4 + 6 and stats.used_triplets == 4 + 8


def test_cross_modal_filter_keeps_other_modality_positives_only():
    groups = torch.tensor([1, 1, 2, 1])
    triplets = (torch.tensor([0, 0, 2]), torch.tensor([1, 2, 0]), torch.tensor([3, 3, 3]))
    kept = other_modality_only(triplets, groups)
    assert [t.tolist() for t in kept] == [[0, 2], [2, 0], [3, 3]]
    with pytest.raises(ValueError, match="cross-modal"):
        MetricObjective(miner="batch-hard", cross_modal=True)


def test_objective_with_memory_uses_past_embeddings_as_negatives_and_round_trips():
    torch.manual_seed(0)
    obj = MetricObjective(loss="triplet", miner="all", margin=10.0, xbm_size=8, embedding_dim=4)
    emb = torch.randn(4, 4, requires_grad=True)
    _, first = obj(emb, torch.tensor([0, 0, 1, 1]))
    assert first.memory == 0 and first.used_triplets == 4 * 2
    emb2 = torch.randn(4, 4, requires_grad=True)
    loss, second = obj(emb2, torch.tensor([2, 2, 3, 3]))
    assert second.memory == 4 and second.used_triplets == 4 * (2 + 4)
    loss.backward()
    assert emb2.grad is not None and emb.grad is None  # memory is detached
    other = MetricObjective(loss="triplet", miner="all", margin=10.0, xbm_size=8, embedding_dim=4)
    other.load_state_dict(obj.state_dict())
    assert torch.equal(other.memory.embedding_memory, obj.memory.embedding_memory)
    with pytest.raises(ValueError, match="size"):
        MetricObjective(xbm_size=4, embedding_dim=4).load_state_dict(obj.state_dict())
    with pytest.raises(ValueError, match="at least one batch"):
        MetricObjective(xbm_size=2, embedding_dim=4)(emb2, torch.tensor([2, 2, 3, 3]))


def test_memory_waits_for_xbm_start_but_fills_before():
    obj = MetricObjective(miner="all", margin=10.0, xbm_size=16, embedding_dim=3, xbm_start=2)
    for step in range(3):
        _, stats = obj(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]) + 2 * step, step=step)
        assert stats.memory == (8 if step == 2 else 0)


def test_objective_normalize_and_contrastive_run():
    emb = torch.randn(6, 3, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    for miner in ("algorithm1", "batch-hard", "all"):
        obj = MetricObjective(loss="contrastive", miner=miner, margin=1.0, normalize=True)
        loss, stats = obj(emb, labels, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(loss) and stats.used_triplets >= stats.active
    with pytest.raises(ValueError):
        MetricObjective(miner="nope")


def test_multi_similarity_loss_hand_computed_and_needs_normalised_embeddings():
    # cosine similarities of 3 images, subjects [0, 0, 1]; base 0.5, alpha 2, beta 50
    s = torch.tensor([[1.0, 0.8, 0.6], [0.8, 1.0, 0.3], [0.6, 0.3, 1.0]])
    obj = MetricObjective(loss="multi-similarity", miner="all", margin=0.5, normalize=True)
    sim = FixedDistance(s)
    sim.is_inverted = True  # a similarity: larger is closer
    obj.loss_fn.distance = sim
    obj.normalize = False   # the "embeddings" are row numbers for FixedDistance
    loss, stats = obj(_rows(3), torch.tensor([0, 0, 1]))

    def anchor(pos, negs):
        p = math.log1p(sum(math.exp(-2 * (x - 0.5)) for x in pos)) / 2
        n = math.log1p(sum(math.exp(50 * (x - 0.5)) for x in negs)) / 50
        return p + n
    # image 2 has no positive: its term is the negative part alone
    expected = (anchor([0.8], [0.6]) + anchor([0.8], [0.3]) + anchor([], [0.6, 0.3])) / 3
    assert math.isclose(float(loss), expected, rel_tol=1e-5)
    assert stats.used_triplets == 2 + 4 and stats.active == 3
    with pytest.raises(ValueError, match="--normalize"):
        MetricObjective(loss="multi-similarity")

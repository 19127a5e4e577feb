"""Mining, losses and the cross-batch memory on hand-built distance matrices."""

import math

import pytest
import torch

from fingerprint_training.losses import MetricObjective, contrastive_loss, triplet_margin_loss
from fingerprint_training.mining import (CrossBatchMemory, Triplets, mine_algorithm1, mine_all,
                                         mine_batch_hard, pair_masks, pairwise_distances)

INF = 99.0


def _masks(labels):
    labels = torch.tensor(labels)
    return pair_masks(labels, labels)


def test_pairwise_distances_match_cdist_and_have_finite_gradient():
    x = torch.randn(5, 3, requires_grad=True)
    d = pairwise_distances(torch.cat([x, x[:1]]))
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
    pos, neg = _masks([0, 0, 1, 1, 2])
    t = mine_algorithm1(d, pos, neg, torch.Generator().manual_seed(0))
    assert t.candidates == 4
    got = {(int(a), int(p)): int(n) for a, p, n in zip(t.anchor, t.positive, t.negative)}
    assert set(got) == {(0, 1), (2, 3), (3, 2)}  # (1, 0) dropped: no hard negative
    assert got[(0, 1)] in (2, 4)
    assert got[(2, 3)] == 0
    assert got[(3, 2)] in (0, 4)
    for a, p, n in zip(t.anchor, t.positive, t.negative):
        assert d[a, n] <= d[a, p]


def test_algorithm1_no_negative_drops_everything():
    d = torch.tensor([[0.0, 1.0, 5.0, 6.0], [1.0, 0.0, 7.0, 8.0],
                      [5.0, 7.0, 0.0, 1.0], [6.0, 8.0, 1.0, 0.0]])
    pos, neg = _masks([0, 0, 1, 1])
    t = mine_algorithm1(d, pos, neg)
    assert len(t) == 0 and t.candidates == 4
    loss, active = triplet_margin_loss(d.clone().requires_grad_(), t, margin=4.0)
    assert float(loss.detach()) == 0.0 and active == 0


def test_algorithm1_random_choice_covers_the_whole_hard_set_uniformly():
    # anchor 0 (positive 1 at distance 3) has three hard negatives 2, 3, 4 and one easy 5.
    d = torch.full((6, 6), INF)
    d.fill_diagonal_(0)
    d[0, 1] = d[1, 0] = 3.0
    d[0, 2], d[0, 3], d[0, 4], d[0, 5] = 0.5, 2.0, 3.0, 3.5
    pos, neg = _masks([0, 0, 1, 2, 3, 4])
    g = torch.Generator().manual_seed(1)
    counts = {}
    for _ in range(600):
        t = mine_algorithm1(d, pos, neg, g)
        row = (t.anchor == 0).nonzero()[0, 0]
        n = int(t.negative[row])
        counts[n] = counts.get(n, 0) + 1
    assert set(counts) == {2, 3, 4}
    assert all(150 < c < 250 for c in counts.values()), counts
    # same generator seed -> same choices (reproducible training)
    a = mine_algorithm1(d, pos, neg, torch.Generator().manual_seed(7)).negative
    b = mine_algorithm1(d, pos, neg, torch.Generator().manual_seed(7)).negative
    assert torch.equal(a, b)


def test_batch_hard_takes_farthest_positive_and_closest_negative():
    d = torch.tensor([
        [0.0, 1.0, 3.0, 2.5, 9.0],
        [1.0, 0.0, 2.0, 4.0, 1.5],
        [3.0, 2.0, 0.0, 6.0, 7.0],
        [2.5, 4.0, 6.0, 0.0, 0.7],
        [9.0, 1.5, 7.0, 0.7, 0.0],
    ])
    pos, neg = _masks([0, 0, 0, 1, 1])
    t = mine_batch_hard(d, pos, neg)
    got = {int(a): (int(p), int(n)) for a, p, n in zip(t.anchor, t.positive, t.negative)}
    # anchor 3 (subject 1): only positive 4, closest negative 0 (2.5); anchor 4: 3 and 1 (1.5)
    assert got == {0: (2, 3), 1: (2, 4), 2: (0, 3), 3: (4, 0), 4: (3, 1)}


def test_all_miner_enumerates_every_triplet():
    pos, neg = _masks([0, 0, 1, 1, 2])
    t = mine_all(torch.rand(5, 5), pos, neg)
    assert len(t) == 4 * 3  # 4 anchor-positive pairs x 3 negatives each


def test_triplet_loss_hand_computed():
    d = torch.tensor([[0.0, 2.0, 1.0], [2.0, 0.0, 3.0], [1.0, 3.0, 0.0]])
    t = Triplets(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2, 2]))
    loss, active = triplet_margin_loss(d, t, margin=0.5)
    # anchor 0: 2 - 1 + .5 = 1.5 ; anchor 1: 2 - 3 + .5 = -0.5 -> 0
    assert math.isclose(float(loss), 0.75) and active == 1
    loss, _ = triplet_margin_loss(d, t, margin=0.5, reduction="nonzero")
    assert math.isclose(float(loss), 1.5)


def test_contrastive_loss_hand_computed():
    d = torch.tensor([[0.0, 0.4, 0.3, 1.5], [0.4, 0.0, 0.9, 0.2],
                      [0.3, 0.9, 0.0, 0.1], [1.5, 0.2, 0.1, 0.0]])
    pos, neg = _masks([0, 0, 1, 1])
    loss, active = contrastive_loss(d, pos, neg, pos_margin=0.0, neg_margin=1.0)
    # positives (both directions): 0.4, 0.4, 0.1, 0.1 -> mean 0.25
    # negatives: 1-0.3, 1-1.5->0, 1-0.9, 1-0.2 (x2 directions): 0.7, 0.1, 0.8 non-zero -> mean 1.6/3
    assert math.isclose(float(loss), 0.25 + 1.6 / 3, rel_tol=1e-5)
    assert active == 4 + 6


def test_cross_modal_mask_excludes_same_modality_positives():
    labels = torch.tensor([0, 0, 0, 1])
    groups = torch.tensor([1, 1, 2, 1])
    pos, _ = pair_masks(labels, labels, labels.new_tensor([0, 1, 2, 3]), labels.new_tensor([0, 1, 2, 3]),
                        groups, groups, cross_modal=True)
    assert pos.nonzero().tolist() == [[0, 2], [1, 2], [2, 0], [2, 1]]


def test_cross_batch_memory_is_a_fifo_queue_and_round_trips():
    mem = CrossBatchMemory(size=5, dim=2)
    for step in range(3):  # 3 batches of 2 -> the oldest entry falls out
        emb = torch.full((2, 2), float(step)) + torch.tensor([[0.0], [0.5]])
        mem.enqueue(emb, torch.tensor([step, step]), torch.tensor([2 * step, 2 * step + 1]))
    e, labels, ids, _ = mem.get()
    assert len(mem) == 5
    assert ids.tolist() == [1, 2, 3, 4, 5]
    assert labels.tolist() == [0, 1, 1, 2, 2]
    assert e[0, 0] == 0.5 and e[-1, 0] == 2.5
    other = CrossBatchMemory(size=5, dim=2)
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.get()[0], e)
    with pytest.raises(ValueError):
        CrossBatchMemory(4, 2).load_state_dict(mem.state_dict())


def test_objective_with_memory_uses_past_embeddings_as_negatives():
    torch.manual_seed(0)
    obj = MetricObjective(loss="triplet", miner="all", margin=10.0, xbm_size=8, embedding_dim=4)
    emb = torch.randn(4, 4, requires_grad=True)
    labels, ids = torch.tensor([0, 0, 1, 1]), torch.arange(4)
    _, first = obj(emb, labels, ids)
    assert first.memory == 0 and first.used_triplets == 4 * 2
    emb2 = torch.randn(4, 4, requires_grad=True)
    loss, second = obj(emb2, torch.tensor([2, 2, 3, 3]), torch.arange(4, 8))
    assert second.memory == 4 and second.used_triplets == 4 * (2 + 4)
    loss.backward()
    assert emb2.grad is not None and emb.grad is None  # memory is detached
    assert len(obj.memory) == 8


def test_objective_normalize_and_contrastive_run():
    emb = torch.randn(6, 3, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    for miner in ("algorithm1", "batch-hard", "all"):
        obj = MetricObjective(loss="contrastive", miner=miner, margin=1.0, normalize=True)
        loss, stats = obj(emb, labels, torch.arange(6), generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(loss) and stats.used_triplets >= stats.active
    with pytest.raises(ValueError):
        MetricObjective(miner="nope")

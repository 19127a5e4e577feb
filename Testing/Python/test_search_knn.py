"""Exact blocked kNN and ranked lookup against a brute-force reference."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from subject_fingerprint.errors import ModelMismatchError
from subject_fingerprint.library import EmbeddingLibrary
from subject_fingerprint.records import ImageRecord
from subject_fingerprint.search import knn, rank


def brute_force(gallery, queries, k):
    diff = queries[:, None, :].astype(np.float64) - gallery[None, :, :].astype(np.float64)
    dist = np.sqrt((diff ** 2).sum(-1))
    index = np.broadcast_to(np.arange(len(gallery)), dist.shape)
    order = np.lexsort((index, dist), axis=1)[:, :k]
    return np.take_along_axis(dist, order, axis=1), order


@pytest.mark.parametrize("n,q,k,block", [
    (1000, 1, 10, None),
    (1000, 7, 10, 64),      # many blocks
    (1000, 7, 10, 1000),    # one block exactly
    (1001, 3, 5, 100),      # last block of one row
    (257, 4, 300, 50),      # k > N
    (40, 2, 40, 7),         # k == N
    (500, 5, 1, 3),         # k = 1, block smaller than the carried candidates
])
def test_knn_matches_brute_force(n, q, k, block):
    rng = np.random.default_rng(n + q + k)
    gallery = rng.standard_normal((n, 16)).astype(np.float32)
    queries = rng.standard_normal((q, 16)).astype(np.float32)
    dist, idx = knn(gallery, queries, k, block_size=block)
    ref_d, ref_i = brute_force(gallery, queries, k)
    assert dist.shape == idx.shape == (q, min(k, n))
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-9, atol=1e-9)


def test_knn_ties_are_stable_and_exact_copies_at_zero():
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((300, 8)).astype(np.float32)
    gallery[[17, 150, 299]] = gallery[5]      # four identical rows
    query = gallery[5:6].copy()
    dist, idx = knn(gallery, query, 6, block_size=32)
    assert list(idx[0, :4]) == [5, 17, 150, 299]
    assert (dist[0, :4] == 0).all() and dist[0, 4] > 0


def test_knn_empty_and_single_vector():
    gallery = np.zeros((0, 4), np.float32)
    d, i = knn(gallery, np.ones((2, 4), np.float32), 5)
    assert d.shape == (2, 0) and i.shape == (2, 0)
    d, i = knn(np.eye(4, dtype=np.float32), np.ones(4, np.float32), 2)
    assert d.shape == (1, 2)
    with pytest.raises(ValueError):
        knn(np.eye(4, dtype=np.float32), np.ones((1, 3), np.float32), 2)


def build_library(path, n_subjects, per_subject, dim=8, seed=0, datasets=("a",)):
    """Subjects whose images cluster, plus noise; same subject IDs repeated across datasets."""
    rng = np.random.default_rng(seed)
    records, embeddings = [], []
    for ds in datasets:
        for s in range(n_subjects):
            centre = rng.standard_normal(dim) * 3
            for j in range(rng.integers(1, per_subject + 1)):
                records.append(ImageRecord(source=f"/{ds}/{s}/{j}.png", subject_id=f"s{s}",
                                           image_id=f"{ds}-{s}-{j}", dataset=ds))
                embeddings.append(centre + rng.standard_normal(dim))
    embeddings = np.asarray(embeddings, np.float32)
    model = SimpleNamespace(model_id="m", metadata={}, embedding_dim=dim)
    with EmbeddingLibrary.open(path, "a", model=model) as lib:
        lib.add(records, [f"h{i}" for i in range(len(records))], embeddings)
    return records, embeddings


def reference_subjects(records, embeddings, query, k):
    dist = np.sqrt(((embeddings.astype(np.float64) - query.astype(np.float64)) ** 2).sum(1))
    best = {}
    for i in np.lexsort((np.arange(len(dist)), dist)):
        key = (records[i].dataset, records[i].subject_id)
        if key not in best:
            best[key] = (dist[i], records[i].image_id)
    ranked = sorted(best.items(), key=lambda kv: kv[1][0])[:k]
    return [(key[1], key[0], d, iid) for key, (d, iid) in ranked]


@pytest.mark.parametrize("per_subject,k", [(3, 5), (40, 10), (200, 4)])
def test_rank_matches_brute_force(tmp_path, per_subject, k):
    path = tmp_path / "lib.h5"
    records, embeddings = build_library(path, 30, per_subject, datasets=("a", "b"))
    rng = np.random.default_rng(7)
    queries = (embeddings[rng.choice(len(embeddings), 4)] +
               0.3 * rng.standard_normal((4, embeddings.shape[1]))).astype(np.float32)
    with EmbeddingLibrary.open(path) as lib:
        results = rank(lib, queries, k=k, block_size=97)
    ref_d, ref_i = brute_force(embeddings, queries, k)
    for qi, result in enumerate(results):
        assert [m.image_id for m in result.images] == [records[i].image_id for i in ref_i[qi]]
        np.testing.assert_allclose([m.distance for m in result.images], ref_d[qi], rtol=1e-9)
        assert [m.rank for m in result.images] == list(range(1, k + 1))
        expected = reference_subjects(records, embeddings, queries[qi], k)
        got = [(m.subject_id, m.dataset, m.distance, m.image_id) for m in result.subjects]
        assert [g[:2] for g in got] == [e[:2] for e in expected]
        assert [g[3] for g in got] == [e[3] for e in expected]
        np.testing.assert_allclose([g[2] for g in got], [e[2] for e in expected], rtol=1e-9)
        assert all(m.probability is None for m in result.images + result.subjects)


def test_rank_fewer_subjects_than_k(tmp_path):
    path = tmp_path / "lib.h5"
    records, embeddings = build_library(path, 3, 5)
    with EmbeddingLibrary.open(path) as lib:
        (result,) = rank(lib, embeddings[:1], k=50)
    assert len(result.images) == len(records)
    assert len(result.subjects) == 3
    assert result.images[0].distance == 0 and result.subjects[0].distance == 0


class FakeCalibration:
    def probability(self, distances):
        return 1.0 / (1.0 + np.exp(4.0 * (np.asarray(distances) - 1.0)))


def test_rank_with_calibration_and_json(tmp_path):
    path = tmp_path / "lib.h5"
    records, embeddings = build_library(path, 6, 3)
    with EmbeddingLibrary.open(path) as lib:
        results = rank(lib, embeddings[:2], k=3, calibration=FakeCalibration())
    d = results[0].to_dict()
    assert set(d) == {"images", "subjects"}
    assert set(d["images"][0]) == {"rank", "subject_id", "image_id", "dataset", "distance",
                                   "probability"}
    assert {"rank", "subject_id", "dataset", "distance", "probability"} <= set(d["subjects"][0])
    probs = [m["probability"] for m in d["images"]]
    assert probs == sorted(probs, reverse=True) and 0 < probs[-1] <= probs[0] <= 1
    results[0].query = "q.png"
    assert results[0].to_dict()["query"] == "q.png"
    with EmbeddingLibrary.open(path) as lib:
        plain = rank(lib, embeddings[:1], k=3)[0].to_dict()
    assert "probability" not in plain["images"][0]


def test_rank_refuses_wrong_dimension(tmp_path):
    path = tmp_path / "lib.h5"
    build_library(path, 2, 2)
    with EmbeddingLibrary.open(path) as lib:
        with pytest.raises(ModelMismatchError):
            rank(lib, np.zeros((1, 5), np.float32))


@pytest.mark.parametrize("k", [3, 8])
def test_rank_exhaustive_subject_path_matches_brute_force(tmp_path, monkeypatch, k):
    """Few subjects with many images each: rank() switches to a per-subject minimum."""
    import subject_fingerprint.search as search

    monkeypatch.setattr(search, "_WIDEN_LIMIT", 50)
    path = tmp_path / "lib.h5"
    records, embeddings = build_library(path, 6, 120, seed=3, datasets=("a", "b"))
    rng = np.random.default_rng(11)
    queries = rng.standard_normal((3, embeddings.shape[1])).astype(np.float32) * 3
    queries[0] = embeddings[5]
    with EmbeddingLibrary.open(path) as lib:
        results = search.rank(lib, queries, k=k, block_size=64)
    ref_d, ref_i = brute_force(embeddings, queries, k)
    for qi, result in enumerate(results):
        assert [m.image_id for m in result.images] == [records[i].image_id for i in ref_i[qi]]
        expected = reference_subjects(records, embeddings, queries[qi], k)
        got = [(m.subject_id, m.dataset, m.distance, m.image_id) for m in result.subjects]
        assert [g[:2] for g in got] == [e[:2] for e in expected]
        assert [g[3] for g in got] == [e[3] for e in expected]
        np.testing.assert_allclose([g[2] for g in got], [e[2] for e in expected], rtol=1e-9)
    assert results[0].subjects[0].distance == 0


def test_knn_large_k_bounded_tiles():
    rng = np.random.default_rng(5)
    gallery = rng.standard_normal((20000, 4)).astype(np.float32)
    queries = rng.standard_normal((2, 4)).astype(np.float32)
    dist, idx = knn(gallery, queries, 20000, block_size=3000)
    ref_d, ref_i = brute_force(gallery, queries, 20000)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-9)
    # Near-equal distances may swap under float32 pre-selection only if exactly tied.
    assert (np.sort(idx, axis=1) == np.arange(20000)).all()
    np.testing.assert_array_equal(idx[:, :100], ref_i[:, :100])

"""The fast kernels give exactly what a brute-force float64 computation gives: the pruned
batched top-k of search.knn and the blocked range search of dedup close_pairs."""

from __future__ import annotations

import numpy as np
import pytest

from subject_fingerprint import search
from subject_fingerprint.dedup.engine import close_pairs
from subject_fingerprint.distances import euclidean


@pytest.mark.parametrize("block,use_faiss", [(None, False), (37, False), (None, True)])
def test_pruned_knn_matches_brute_force(block, use_faiss, monkeypatch):
    if use_faiss:
        pytest.importorskip("faiss")
    monkeypatch.setattr(search, "_USE_FAISS", use_faiss)
    rng = np.random.default_rng(3)
    gallery = rng.standard_normal((1500, 16)).astype(np.float32)
    gallery[700:710] = gallery[0]  # exact ties: ordered by gallery index
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    queries[5] = gallery[0]
    assert len(queries) >= search._PRUNED_MIN_QUERIES
    d, i = search.knn(gallery, queries, 12, block_size=block)
    full = euclidean(queries, gallery)
    order = np.lexsort((np.broadcast_to(np.arange(1500), full.shape), full), axis=1)[:, :12]
    np.testing.assert_array_equal(i, order)
    np.testing.assert_allclose(d, np.take_along_axis(full, order, axis=1), atol=1e-9)
    assert list(i[5, :11]) == [0] + list(range(700, 710))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
@pytest.mark.parametrize("same", [False, True])
def test_close_pairs_match_brute_force(same, precision):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((900, 8)).astype(np.float32)
    y = x if same else rng.standard_normal((700, 8)).astype(np.float32)
    if not same:
        y[:30] = x[:30] + 0.01
    full = euclidean(x, y)
    threshold = float(np.quantile(full, 0.002))
    ii, jj, dd = close_pairs(x, y, threshold, same=same, block=64, precision=precision)
    want = np.argwhere(full <= threshold)
    if same:
        want = want[want[:, 0] < want[:, 1]]
    got = sorted(zip(ii.tolist(), jj.tolist()))
    assert got == sorted(map(tuple, want.tolist())) and len(got) > 30
    np.testing.assert_allclose(dd, full[ii, jj], atol=1e-9)


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_bf16_first_pass_keeps_pairs_at_the_threshold(scale):
    """Pairs a hair inside and outside the threshold, at two norm scales and with uneven norms:
    the bf16 first pass (an approximate GEMM) must not lose a single one of the inside pairs."""
    rng = np.random.default_rng(6)
    threshold = 0.9 * scale
    x = (rng.standard_normal((400, 128)) * scale / 4).astype(np.float32)
    x[:50] *= 3.0  # uneven norms: the margin is per row, against the largest |y|
    direction = rng.standard_normal((400, 128))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    factor = np.where(np.arange(400) % 2 == 0, 1 - 1e-3, 1 + 1e-3)  # inside / outside
    y = (x + direction * (threshold * factor)[:, None]).astype(np.float32)
    want = close_pairs(x, y, threshold, precision="fp32")
    got = close_pairs(x, y, threshold, precision="bf16", block=128)
    pairs = lambda r: sorted(zip(r[0].tolist(), r[1].tolist()))  # noqa: E731
    assert pairs(got) == pairs(want)
    assert {(i, i) for i in range(0, 400, 2)} <= set(pairs(got))
    assert not {(i, i) for i in range(1, 400, 2)} & set(pairs(got))
    order = lambda r: np.lexsort((r[1], r[0]))  # noqa: E731
    np.testing.assert_array_equal(got[2][order(got)], want[2][order(want)])  # both exact float64


def test_rank_reads_only_the_rows_it_reports(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from subject_fingerprint.library import EmbeddingLibrary
    from subject_fingerprint.records import ImageRecord

    rng = np.random.default_rng(5)
    model = SimpleNamespace(model_id="m" * 16, metadata={}, embedding_dim=8)
    records = [ImageRecord(source=f"/x/{i}.png", subject_id=f"s{i // 3}", image_id=f"{i}.png")
               for i in range(300)]
    with EmbeddingLibrary.open(tmp_path / "l.h5", "a", model=model) as lib:
        lib.add(records, [f"{i:064x}" for i in range(300)],
                rng.standard_normal((300, 8)).astype(np.float32))
    with EmbeddingLibrary.open(tmp_path / "l.h5", "r") as lib:
        whole = []
        original = lib.column
        monkeypatch.setattr(lib, "column", lambda name, rows=None: (
            whole.append(name) if rows is None else None, original(name, rows))[1])
        for _ in range(3):
            result = search.rank(lib, rng.standard_normal((2, 8)).astype(np.float32), k=5)
        assert whole == [] and len(result[0].subjects) == 5

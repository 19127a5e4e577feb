"""Posteriors, priors and the false-pair rule of ``dedup``: units on synthetic scores, and the
shipped model on exports with a known answer (planted shared subjects and copies)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from subject_fingerprint import posterior as post
from subject_fingerprint.cli import main
from runners import load_script

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "Resources/Models/starter-2d-cxr.pt"
SPLIT = REPO / "Resources/Splits/cxr14-subset-64px-seed42.json"


def _bench():
    return load_script("benchmark_dedup_planted")


# -- units -------------------------------------------------------------------------------------

def test_calibration_p_value_is_the_exact_poisson_binomial_tail():
    import itertools

    p_value = _bench().calibration_p_value
    rng = np.random.default_rng(3)
    posteriors = rng.uniform(0.2, 0.95, 6)
    pmf = np.zeros(7)
    for outcome in itertools.product((0, 1), repeat=6):  # every way the pairs can turn out
        pmf[sum(outcome)] += np.prod(np.where(outcome, posteriors, 1 - posteriors))
    for right in range(7):
        assert p_value(posteriors, right) == pytest.approx(pmf[pmf <= pmf[right] + 1e-12].sum())
    assert p_value([0.5] * 10, 5) == pytest.approx(1.0)
    # Five right pairs stated at 0.3 each: an underconfident model the check rejects ...
    assert p_value([0.3] * 5, 5) == pytest.approx(0.3 ** 5) and p_value([0.3] * 5, 5) < 0.01
    # ... as it rejects ten pairs stated at 0.95 of which three are right.
    assert p_value([0.95] * 10, 3) < 0.01


def test_score_matrix_matches_brute_force():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(23, 5)), rng.normal(size=(17, 5))
    cx, cy = rng.integers(0, 6, 23), rng.integers(0, 4, 17)
    cx[:6], cy[:4] = np.arange(6), np.arange(4)
    got = post.score_matrix(x, cx, y, cy, 6, 4, block=5)
    for a in range(6):
        for b in range(4):
            assert got[a, b] == pytest.approx(post.pair_score(x[cx == a], y[cy == b]))


def test_decide_keeps_expected_false_pairs_within_the_target():
    p = np.array([0.999, 0.99, 0.9, 0.6, 0.3, 0.01])
    mask, expected = post.decide(p, 0.2)
    assert mask.tolist() == [True, True, True, False, False, False]
    assert expected == pytest.approx(0.001 + 0.01 + 0.1)
    mask, expected = post.decide(p, 1e-4)
    assert not mask.any() and expected == 0
    # A loose budget never reports pairs more likely false than not.
    mask, expected = post.decide(p, 10)
    assert mask.tolist() == [True, True, True, True, False, False]


def test_mixture_fit_recovers_the_number_of_matches():
    rng = np.random.default_rng(1)
    n, k = 20000, 40
    # Known components: same ~ N(0.2, 0.05), different ~ N(0.5, 0.05).
    s = np.r_[rng.normal(0.2, 0.05, k), rng.normal(0.5, 0.05, n - k)]
    fit = post.DataFit(0.2, 0.05, 0.5, 0.05)
    est = post.estimate_matches(fit.log_lr(s), n)
    assert abs(est - k) < 6
    # And a cap (mutual nearest subjects) is respected.
    assert post.estimate_matches(fit.log_lr(s), n, cap=10) <= 10


def test_null_cap_follows_the_empirical_null():
    null = np.linspace(0.3, 0.7, 1000)  # different-ID scores: none below 0.3
    scores = np.r_[[0.1, 0.2], np.linspace(0.3, 0.7, 100)]
    cap = post.null_cap(scores, 100, null)
    assert cap[0] == cap[1] == 1.0  # nothing of the null that low
    assert cap[-1] == pytest.approx(0.0, abs=0.02)  # all explained by the null


def test_posterior_uses_the_prior():
    assert post.posterior(np.log(1000.0), 0.5) == pytest.approx(1000 / 1001)
    assert post.posterior(np.log(1000.0), 1e-4) == pytest.approx(1000e-4 / (1000e-4 + 1 - 1e-4))


# -- the shipped model on planted exports -------------------------------------------------------

def _run(exports, out, *extra):
    code = main(["dedup", str(exports / "site-a"), str(exports / "site-b"), "--model", str(MODEL),
                 "--out", str(out), "--quiet", "--device", "cpu", *map(str, extra)])
    assert code == 0


def _check_calibration(result):
    """Observed false pairs within twice the stated expectation (the issue's bound: below an
    expectation of 0.5 it demands none), and the number of right pairs among those reported
    one that their posteriors make plausible (two-sided p >= 0.01, exact). A fixed tolerance on
    mean posterior against precision was no test at five to seven pairs: one binomial standard
    deviation there is 0.15-0.2."""
    assert result["false"] <= 2 * result["expected_false"], result
    if result["reported"]:
        right = result["reported"] - result["false"]
        assert _bench().calibration_p_value(result["posteriors"], right) >= 0.01, result


def _planted_case(shared_data, tmp_path, source, per_site, n_shared):
    bench = _bench()
    if source == "nih-test":
        data = shared_data / "cxr14-subset-64px"
        subjects = set(json.loads(SPLIT.read_text())["test"])
    else:
        data = shared_data / "kermany-peds-128px"
        subjects = None
        if not (data / "manifest.csv").exists():
            pytest.skip(f"{data} not present")
    truth = bench.build_sites(data, tmp_path / "exports", per_site, n_shared, n_copies=2,
                              subjects=subjects, seed=per_site)
    libs = tmp_path / "libs"
    _run(tmp_path / "exports", tmp_path / "default", "--save-libraries", libs)
    default = bench.score_report(tmp_path / "default", truth)
    # The copies are always found, as exact duplicates.
    assert default["summary"]["exact_duplicate_pairs"] >= 2
    # A looser level where twice the expectation is a real bound, on the same embeddings.
    main(["dedup", str(libs / "site-a.h5"), str(libs / "site-b.h5"), "--model", str(MODEL),
          "--out", str(tmp_path / "loose"), "--quiet", "--max-false-pairs", "3"])
    loose = bench.score_report(tmp_path / "loose", truth)
    assert loose["expected_false"] <= 3 + 1e-9
    assert default["expected_false"] <= default["summary"]["max_false_pairs"] + 1e-9
    for result in (default, loose):
        _check_calibration(result)
    summary = default["summary"]
    assert summary["self_check"]["auc"] is not None
    assert 0 <= summary["estimated_shared_subjects"] <= per_site
    return default, loose


@pytest.mark.skipif(not MODEL.exists(), reason="starter model not in the checkout")
@pytest.mark.parametrize("source,per_site,n_shared", [("nih-test", 20, 6), ("kermany", 100, 20)])
def test_planted_exports_false_pairs_within_stated_expectation(shared_data, tmp_path, one_torch_thread,
                                                               source, per_site, n_shared):
    _planted_case(shared_data, tmp_path, source, per_site, n_shared)


@pytest.mark.slow
@pytest.mark.skipif(not MODEL.exists(), reason="starter model not in the checkout")
def test_planted_exports_250_subjects_per_site(shared_data, tmp_path, one_torch_thread):
    _planted_case(shared_data, tmp_path, "kermany", 250, 40)


def test_readme_main_job_on_the_sample_exports(sample_data, tmp_path, one_torch_thread):
    exports = sample_data / "exports"
    key = json.loads((exports / "planted.json").read_text())
    _run(exports, tmp_path / "r")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    bench = _bench()
    truth = {"shared": {(s["site-a"], s["site-b"]) for s in key["shared_subjects"]},
             "copies": {frozenset(("B-copy0001", Path(c["site-b"][0]).parts[1]))
                        for c in key["exact_copies"]}}
    result = bench.score_report(tmp_path / "r", truth)
    assert result["false"] == 0, result
    images = (tmp_path / "r" / "images.csv").read_text().splitlines()
    exact = [line for line in images if ",True," in line]
    assert len(exact) == 1 and "B-copy0001" in exact[0]
    unconfirmed = summary["unconfirmed_shared_subjects"]
    assert unconfirmed == max(0, round(summary["estimated_shared_subjects"]) -
                              summary["suspected_shared_subjects"])
    page = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    assert f"About {unconfirmed} shared subject(s)" in page
    assert "starter-2d-cxr.pt" in page and summary["model_id"] in page
    # The copied pair is reported, with a Grad-CAM heatmap beside each thumbnail.
    assert summary["heatmaps"] >= 1 and "class='heat'" in page


def test_pair_heatmaps_explain_the_similarity(sample_data, one_torch_thread):
    from subject_fingerprint.lookup import resolve_model
    from subject_fingerprint.pair_heatmap import overlay_uri, pair_heatmaps

    model = resolve_model(MODEL)
    a, b = sorted((sample_data / "exports/site-a").rglob("IM*"))[:2]
    ha, hb, xa, xb = pair_heatmaps(model, str(a), str(b))
    size = tuple(model.preprocessing.size)
    assert ha.shape == hb.shape == xa.shape == xb.shape == size
    for h in (ha, hb):
        assert np.isfinite(h).all() and h.min() >= 0 and h.max() <= 1 + 1e-6
    assert ha.max() > 0 or hb.max() > 0  # something drives the similarity
    assert overlay_uri(xa, ha).startswith("data:image/png;base64,")


def test_large_blocks_score_only_close_pairs_and_decide_the_same(monkeypatch):
    from subject_fingerprint.dedup import decide as dec
    from subject_fingerprint.dedup.engine import EmbeddedDataset

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 8))

    def dataset(name, subjects):
        rows = [(s, centres[s] + 0.3 * rng.normal(size=8)) for s in subjects for _ in range(2)]
        ids = np.array([f"{name}{i}" for i in range(len(rows))], dtype=object)
        subj = np.array([f"s{s}" if s < 10 else f"{name}{s}" for s, _ in rows], dtype=object)
        return EmbeddedDataset(name, np.array([v for _, v in rows], np.float32), subj, ids, ids, ids)

    # Subjects 0-9 are in both datasets under the same ID (the planted answer).
    data = [dataset("a", range(25)), dataset("b", list(range(10)) + list(range(25, 40)))]
    ref = post.reference_scores(data)
    link = post.combine(ref, None)
    dense = dec.decide(data, link, ref, max_false_pairs=1)
    monkeypatch.setattr(dec, "DENSE_LIMIT", 0)
    sparse = dec.decide(data, link, ref, max_false_pairs=1)
    scores = {(p.a, p.subject_a, p.b, p.subject_b): p.score for p in dense.pairs}
    for p in sparse.pairs:
        key = (p.a, p.subject_a, p.b, p.subject_b)
        if key in scores:
            assert p.score == pytest.approx(scores[key])
    reported = lambda d: sorted((p.subject_a, p.subject_b) for p in d.reported)
    assert reported(dense) == reported(sparse)
    shared = {(f"s{s}", f"s{s}") for s in range(10)}
    assert len(shared & set(reported(dense))) >= 8
    assert dense.expected_false_pairs <= 1


@pytest.mark.parametrize("sd1,sd0", [(0.05, 0.1), (0.1, 0.05), (0.07, 0.07)])
def test_data_likelihood_ratio_never_rises_with_the_score(sd1, sd0):
    fit = post.DataFit(0.3, sd1, 0.5, sd0)
    values = fit.log_lr(np.linspace(0, 3, 3001))
    assert np.all(np.diff(values) <= 1e-12)
    assert values[0] > 0 > values[-1] or sd1 > sd0  # same-like scores favour "same"

"""Open-set ``query``: a subject who is not in the library gets "no subject of the library
matches", with the best candidate's posterior, on the ChestX-ray14 test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from subject_fingerprint import lookup
from subject_fingerprint.cli import main
from subject_fingerprint.library import EmbeddingLibrary

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "Resources/Models/starter-2d-cxr.pt"
SPLIT = REPO / "Resources/Splits/cxr14-subset-64px-seed42.json"


@pytest.mark.skipif(not MODEL.exists() or not SPLIT.exists(), reason="model or split missing")
def test_subjects_not_in_the_library_get_no_match(shared_data, tmp_path, one_torch_thread):
    from subject_fingerprint.embed import Embedder
    from subject_fingerprint.io import discover

    model = lookup.resolve_model(MODEL)
    test = set(json.loads(SPLIT.read_text())["test"])
    found = discover([str(shared_data / "cxr14-subset-64px")])
    records = [r for r in found.records if r.subject_id in test]
    embedded = Embedder(model, device="cpu", progress=False).embed_records(records)
    subjects = sorted({r.subject_id for r in embedded.records})
    # Four folds: each subject is queried against a library of the other test subjects
    # (three quarters of them), with its first image.
    folds = [subjects[k::4] for k in range(4)]
    answers = []
    for k, held in enumerate(folds):
        keep = [n for n, r in enumerate(embedded.records) if r.subject_id not in held]
        path = tmp_path / f"fold{k}.h5"
        with EmbeddingLibrary.open(path, mode="a", model=model) as lib:
            lib.add([embedded.records[n] for n in keep],
                    [embedded.content_hashes[n] for n in keep], embedded.embeddings[keep])
        queries = [next(r.source for r in embedded.records if r.subject_id == s) for s in held]
        answers += lookup.query(queries, path, model=model, k=5, device="cpu")
    assert len(answers) == len(subjects)
    no_match = [a for a in answers if a.open_set["match"] is None]
    assert len(no_match) >= 0.95 * len(answers), [a.open_set for a in answers if a.open_set["match"]]
    for a in no_match:
        assert a.open_set["answer"].startswith("no subject of the library matches")
        assert 0 <= a.open_set["best_posterior"] < a.open_set["level"]
    # Posteriors over the candidates and "none of them" sum to at most one.
    for a in answers:
        assert sum(m.probability for m in a.subjects) <= 1 + 1e-9


def test_open_set_posteriors_and_answer_in_cli(sample_data, tmp_path, capsys):
    library = tmp_path / "a.h5"
    assert main(["index", str(sample_data / "exports/site-a"), "--library", str(library),
                 "--dataset", "site-a"]) == 0
    image = sorted((sample_data / "exports/site-a").rglob("IM*"))[0]
    capsys.readouterr()
    assert main(["query", str(image), "--library", str(library), "--json", "-k", "3"]) == 0
    answer = json.loads(capsys.readouterr().out)[0]
    # The very image is in the library: distance 0, a sure match.
    top = answer["subjects"][0]
    assert top["distance"] == pytest.approx(0, abs=1e-2)
    assert answer["open_set"]["match"] == top["subject_id"]
    assert answer["open_set"]["best_posterior"] >= answer["open_set"]["level"]
    assert sum(s["probability"] for s in answer["subjects"]) <= 1 + 1e-9


def test_open_set_no_candidate_close_enough():
    from subject_fingerprint.calibration import Calibration
    from subject_fingerprint.search import QueryResult, SubjectMatch

    cal = Calibration(coef=-20.0, intercept=8.0, threshold=0.3, target_fpr=0.01)
    far = QueryResult(subjects=[SubjectMatch(1, "s1", "d", 0.6), SubjectMatch(2, "s2", "d", 0.7)])
    near = QueryResult(subjects=[SubjectMatch(1, "s1", "d", 0.01), SubjectMatch(2, "s2", "d", 0.7)])
    counts = {("d", f"s{i}"): 1 for i in range(100)}
    lookup.open_set([far, near], counts, cal)
    assert far.open_set["match"] is None and far.subjects[0].probability < 0.01
    assert near.open_set["match"] == "s1" and near.subjects[0].probability > 0.9
    # More images of a candidate make a close image less telling.
    many = QueryResult(subjects=[SubjectMatch(1, "s1", "d", 0.2)])
    few = QueryResult(subjects=[SubjectMatch(1, "s1", "d", 0.2)])
    lookup.open_set([many], {**counts, ("d", "s1"): 20}, cal)
    lookup.open_set([few], counts, cal)
    assert many.subjects[0].probability < few.subjects[0].probability
    assert np.isfinite(many.subjects[0].probability)

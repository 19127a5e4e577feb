"""Testing/reproduce_models.py: every recipe builds a valid train / evaluate command line over
committed split files (nothing is trained here)."""

import json
from pathlib import Path

import pytest
from runners import load_script

REPO = Path(__file__).resolve().parents[2]


def _module():
    return load_script("reproduce_models")


def test_every_recipe_parses_as_a_train_and_evaluate_command(tmp_path):
    from fingerprint_training.cli import build_parser

    r = _module()
    assert set(r.SHIPPED) <= set(r.RECIPES)
    for name in r.RECIPES:
        cmd = r.train_command(name, tmp_path / "data", tmp_path / "out", 1, "cpu")
        assert cmd[:3] == r.CLI
        args = build_parser().parse_args(cmd[3:])
        if "derive" in r.RECIPES[name]:  # another recipe's model with test-time views
            assert args.model == str(tmp_path / "out" / r.RECIPES[name]["derive"] / "best.pt")
            assert args.out == str(tmp_path / "out" / name / "best.pt") and args.test_shift > 0
            cal = build_parser().parse_args(r.calibrate_command(name, tmp_path / "data", tmp_path / "out",
                                                                "cpu")[3:])
            assert cal.write_calibration and cal.model == [f"{name}={args.out}"]
            # Calibrated on its own sources only: a model that never saw Kermany, without it.
            assert [s.partition("=")[0] for s in cal.source] == r.RECIPES[name]["sources"]
            ev = build_parser().parse_args(r.eval_command(name, tmp_path / "data", tmp_path / "out", "cpu")[3:])
            assert not ev.write_calibration and ev.out == str(tmp_path / "out" / name / "eval")
            continue
        if "ensemble" in r.RECIPES[name]:  # other recipes' models combined, then calibrated
            assert args.models == [str(tmp_path / "out" / m / "best.pt") for m in r.RECIPES[name]["ensemble"]]
            assert set(r.RECIPES[name]["ensemble"]) <= set(r.RECIPES)
            assert args.out == str(tmp_path / "out" / name / "best.pt")
            cal = build_parser().parse_args(r.calibrate_command(name, tmp_path / "data", tmp_path / "out",
                                                                "cpu")[3:])
            assert cal.write_calibration and [s.partition("=")[0] for s in cal.source] == r.RECIPES[name]["sources"]
            continue
        assert args.out == str(tmp_path / "out" / name) and args.threads == 1 and not args.resume
        resumed = r.train_command(name, tmp_path, tmp_path, 1, "cpu", resume=True)
        assert build_parser().parse_args(resumed[3:]).resume
        if "init" in r.RECIPES[name]:  # starts from another recipe's best checkpoint
            assert r.RECIPES[name]["init"] in r.RECIPES
            assert args.init_from == str(tmp_path / "out" / r.RECIPES[name]["init"] / "best.pt")
        for spec in args.split:
            assert Path(spec.partition("=")[2]).is_file(), spec     # committed split files
        ev = build_parser().parse_args(r.eval_command(name, tmp_path / "data", tmp_path / "out", "cpu")[3:])
        assert ev.model[0].endswith(f"{name}/best.pt")
        assert ev.moved_queries == (r.RECIPES[name]["dims"] == 3)
        if r.RECIPES[name]["dims"] == 2:  # the shipped float16 file is calibrated in place
            cal = build_parser().parse_args(r.calibrate_command(name, tmp_path / "data", tmp_path / "out", "cpu",
                                                                model=tmp_path / "m.pt")[3:])
            assert cal.write_calibration and cal.model == [f"{name}={tmp_path / 'm.pt'}"]


def test_unknown_recipe_and_missing_data_are_clear_errors(tmp_path, capsys):
    r = _module()
    with pytest.raises(SystemExit):
        r.main(["--recipes", "nope", "--out", str(tmp_path)])
    assert "unknown recipe" in capsys.readouterr().err
    assert r.main(["--recipes", "ker64", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def _empty_data(r, tmp_path):
    """A --data folder with an empty manifest per source: enough for main() when _run is faked."""
    data = tmp_path / "data"
    for folder in r.FOLDERS.values():
        (data / folder).mkdir(parents=True)
        (data / folder / "manifest.csv").write_text("subject_id,image_path\n")
    return data


def test_a_recipe_starting_from_another_trains_that_one_first_only_when_missing(tmp_path, monkeypatch):
    r = _module()
    data, out = _empty_data(r, tmp_path), tmp_path / "out"
    ran = []
    monkeypatch.setattr(r, "_run", lambda cmd: ran.append(cmd[cmd.index("--out") + 1]) or 0.0)
    assert r.main(["--recipes", "joint64-sslft", "--data", str(data), "--out", str(out)]) == 0
    assert ran == [str(out / "ker64-ssl-xl"), str(out / "joint64-sslft")]
    (out / "ker64-ssl-xl").mkdir(parents=True, exist_ok=True)
    (out / "ker64-ssl-xl" / "best.pt").write_bytes(b"")
    ran.clear()
    assert r.main(["--recipes", "joint64-sslft", "--data", str(data), "--out", str(out)]) == 0
    assert ran == [str(out / "joint64-sslft")]


def test_an_ensemble_recipe_makes_only_its_missing_members_first_then_calibrates(tmp_path, monkeypatch):
    r = _module()
    data, out = _empty_data(r, tmp_path), tmp_path / "out"
    monkeypatch.setitem(r.RECIPES, "ens", {"dims": 2, "sources": ["NIH"], "ensemble": ["nih64-ssl", "ker64"]})
    (out / "ker64").mkdir(parents=True)
    (out / "ker64" / "best.pt").write_bytes(b"")
    ran = []
    monkeypatch.setattr(r, "_run", lambda cmd: ran.append(cmd) or 0.0)
    assert r.main(["--recipes", "ens", "--data", str(data), "--out", str(out)]) == 0
    outs = [cmd[cmd.index("--out") + 1] for cmd in ran]
    assert outs == [str(out / "nih64-ssl"), str(out / "ens" / "best.pt"), str(out / "ens" / "calibration")]
    assert ran[1][3] == "ensemble" and "--write-calibration" in ran[2]


def test_resume_continues_runs_and_adds_to_their_recorded_time(tmp_path, monkeypatch):
    r = _module()
    data, out = _empty_data(r, tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "timings.json").write_text(json.dumps({"ker64": {"train_s": 100.0, "evaluate_s": 7.0}}))
    ran = []
    monkeypatch.setattr(r, "_run", lambda cmd: ran.append(cmd) or 2.5)
    assert r.main(["--recipes", "ker64", "--data", str(data), "--out", str(out), "--resume"]) == 0
    assert ran[0][-1] == "--resume"
    entry = json.loads((out / "timings.json").read_text())["ker64"]
    assert entry["train_s"] == 102.5 and entry["evaluate_s"] == 7.0


def test_resume_of_a_run_killed_before_recording_its_time_adds_to_the_trainers_log(tmp_path, monkeypatch):
    r = _module()
    data, out = _empty_data(r, tmp_path), tmp_path / "out"
    (out / "ker64").mkdir(parents=True)
    (out / "ker64" / "log.csv").write_text("step,phase,loss,seconds\n1,train,0.5,40.0\n2,train,0.4,81.5\n")
    monkeypatch.setattr(r, "_run", lambda cmd: 2.5)
    assert r.main(["--recipes", "ker64", "--data", str(data), "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "timings.json").read_text())["ker64"]["train_s"] == 84.0


def test_resume_of_a_finished_run_trains_nothing_and_keeps_its_time(tmp_path, monkeypatch):
    r = _module()
    data, out = _empty_data(r, tmp_path), tmp_path / "out"
    (out / "ker64").mkdir(parents=True)
    (out / "ker64" / "best.pt").write_bytes(b"")
    (out / "ker64" / "log.csv").write_text("step,phase,seconds\n599,train,90.0\n600,train,91.0\n")
    (out / "timings.json").write_text(json.dumps({"ker64": {"train_s": 95.0}}))
    ran = []
    monkeypatch.setattr(r, "_run", lambda cmd: ran.append(cmd) or 2.5)
    assert r.main(["--recipes", "ker64", "--data", str(data), "--out", str(out), "--resume"]) == 0
    assert ran == []
    assert json.loads((out / "timings.json").read_text())["ker64"]["train_s"] == 95.0


def test_timings_recorded_meanwhile_by_another_run_are_kept(tmp_path, monkeypatch):
    r = _module()
    data, out = _empty_data(r, tmp_path), tmp_path / "out"

    def other_run_finishes_meanwhile(cmd):
        (out / "timings.json").write_text(json.dumps({"ker64-ssl": {"train_s": 5.0}}))
        return 1.0
    monkeypatch.setattr(r, "_run", other_run_finishes_meanwhile)
    assert r.main(["--recipes", "ker64", "--data", str(data), "--out", str(out)]) == 0
    assert set(json.loads((out / "timings.json").read_text())) == {"ker64", "ker64-ssl"}


def test_table_has_a_row_per_test_split_with_pixel_correlation_beside(tmp_path):
    from subject_fingerprint.checkpoint import FingerprintModel, save_checkpoint
    from subject_fingerprint.preprocess import Preprocessing

    r = _module()
    run = tmp_path / "nih64-ssl-xl"
    (run / "eval").mkdir(parents=True)
    model = FingerprintModel.create(2, depth=10, embedding_dim=8,
                                    preprocessing=Preprocessing(spatial_dims=2, size=(16, 16)))
    model.metadata.update(training={"best_step": 200, "hyperparameters": {"steps": 300}},
                          metrics={"validation": {"mean_recall_at_k": 0.5}})
    save_checkpoint(model, run / "best.pt")

    def row(source, seen, m, px):
        return {"source": source, "trained_on_source": seen,
                "settings": [{"n_way": 20, "k_shot": 1, "model": m, "pixel_correlation": px}],
                "retrieval": {"model": {"precision_at_1": m, "map_at_r": m / 2},
                              "pixel_correlation": {"precision_at_1": px, "map_at_r": px / 2}},
                "calibration": {"fpr": 0.012}}

    (run / "eval" / "cross_domain.json").write_text(json.dumps(
        {"rows": [row("NIH", True, 0.55, 0.184), row("KER", False, 0.3, 0.196)]}))
    lines = r.table([run], {"nih64-ssl-xl": {"train_s": 2234.4}}).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 12
    assert "| nih64-ssl-xl | NIH | 16x16 | 200 / 300 | 2234 | 50.0 | NIH | 55.0 (18.4) | 55.0 (18.4) | 27.5 (9.2) | 1.2 |" == lines[2]
    assert "| KER (unseen) | 30.0 (19.6) |" in lines[3]
    # The float16 file --ship wrote and evaluated gets rows of its own (what its model card shows).
    (run / "calibration-shipped").mkdir()
    (run / "calibration-shipped" / "cross_domain.json").write_text(json.dumps({"rows": [row("NIH", True, 0.56, 0.184)]}))
    lines = r.table([run]).splitlines()
    assert len(lines) == 5 and lines[4].startswith("| nih64-ssl-xl, as shipped (float16) | NIH |")
    assert "| 56.0 (18.4) |" in lines[4]


def test_a_recipe_is_preceded_by_the_chain_it_starts_from_where_missing(tmp_path):
    r = _module()
    chain = r.with_prerequisites(["joint128-sslft"], tmp_path)
    assert chain == ["ker64-ssl-xl", "joint64-sslft", "joint128-sslft"]
    (tmp_path / "joint64-sslft").mkdir()
    (tmp_path / "joint64-sslft" / "best.pt").write_bytes(b"")
    assert r.with_prerequisites(["joint128-sslft-views", "joint128-sslft"], tmp_path) == [
        "joint128-sslft", "joint128-sslft-views"]

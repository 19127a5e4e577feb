"""Testing/device_check.py, the GPU checks run on a lent machine: here its pieces on the CPU, at
tiny sizes (it measures nothing here; it must not break before it gets a GPU)."""

from dataclasses import replace

import numpy as np
import pytest
from runners import load_script


def _module():
    return load_script("device_check")


def test_recipe_configs_are_the_recipes_own_arguments():
    dc = _module()
    repro = dc.repro
    chain = repro.with_prerequisites(list(repro.SHIPPED), repro.ROOT / "no-such-folder")
    assert chain[-1] in repro.SHIPPED and set(repro.SHIPPED) <= set(chain)
    for name in chain:
        cfg = dc.recipe_config(name, "cuda")
        args = repro.RECIPES[name]["args"]
        last = max(i for i, a in enumerate(args) if a == "--steps")  # the one argparse keeps
        assert cfg.steps == int(args[last + 1])
        assert cfg.device == "cuda" and cfg.init_from is None and not cfg.write_outputs
    three_d = dc.recipe_config("lgg3d-canon-r10", "cuda")
    assert three_d.dims == 3 and tuple(three_d.size) == (32, 32, 32) and three_d.cross_modal
    assert three_d.canonical_pose and three_d.depth == 10 and three_d.batch_subjects == 16
    assert tuple(dc.recipe_config("joint128-sslft-long", "cuda").size) == (128, 128)


def test_synthetic_batches_have_the_recipe_shape_and_modalities():
    dc = _module()
    cfg = replace(dc.recipe_config("lgg3d-canon-r10", "cpu"), size=(8, 8, 8))
    ds = dc.synthetic_like(cfg, n_subjects=5)
    assert tuple(ds.images.shape[1:]) == (1, 8, 8, 8) and len(ds.subjects) == 5
    # Cross-modal mining needs every subject seen in more than one sequence.
    for s in range(5):
        assert len(set(ds.groups[ds.labels == s].tolist())) == 3


def test_a_tiny_recipe_step_is_timed_on_the_cpu(one_torch_thread):
    dc = _module()
    cfg = replace(dc.recipe_config("joint128-sslft-long", "cpu"), size=(32, 32), depth=10,
                  batch_subjects=4, images_per_subject=2, cpu_bf16=False)
    seconds = dc.seconds_per_step(cfg, steps=2, warm=1)
    assert np.isfinite(seconds) and 0 < seconds < 30


def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    dc = _module()
    ran = []
    monkeypatch.setattr(dc, "section_train", lambda args, device: 1 / 0)
    monkeypatch.setattr(dc, "section_index", lambda args, device: ran.append(str(device)))
    code = dc.main(["--device", "cpu", "--out", str(tmp_path), "--only", "train,index"])
    out = capsys.readouterr().out
    assert code == 1 and ran == ["cpu"]
    assert "### train: FAILED" in out and "ZeroDivisionError" in out and "failed sections: train" in out


@pytest.mark.shared_data
def test_inference_section_runs_tiny_with_the_shipped_starter(shared_data, tmp_path, capsys):
    dc = _module()
    assert dc.main(["--tiny", "--device", "cpu", "--data", str(shared_data), "--out", str(tmp_path),
                    "--only", "inference", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 2D 64x64 | 8 |" in out and "shipped 2D starter, 64 NIH images" in out

"""Calibration maths and device resolution."""

import json
import math

import numpy as np
import pytest
import torch

from subject_fingerprint.calibration import Calibration
from subject_fingerprint.device import resolve_device


def _cal():
    return Calibration(coef=-8.0, intercept=4.0, threshold=0.5, target_fpr=0.01,
                       fpr_table=[[0.1, 0.8], [0.001, 0.3], [0.01, 0.5]])


def test_probability_is_sigmoid_and_decreasing():
    cal = _cal()
    assert cal.probability(0.5) == pytest.approx(0.5)
    assert cal.probability(0.0) == pytest.approx(1 / (1 + math.exp(-4.0)))
    d = np.linspace(0, 2, 21)
    p = cal.probability(d)
    assert p.shape == d.shape and np.all(np.diff(p) < 0)


def test_probability_stable_for_extremes():
    cal = _cal()
    with np.errstate(all="raise"):
        p = cal.probability(np.array([-1e6, 1e6]))
    assert p[0] == pytest.approx(1.0) and p[1] == pytest.approx(0.0)


def test_threshold_for_fpr_interpolates_and_clamps():
    cal = _cal()
    assert cal.threshold_for_fpr(0.01) == pytest.approx(0.5)
    mid = cal.threshold_for_fpr(math.sqrt(0.01 * 0.1))  # halfway in log scale
    assert mid == pytest.approx(0.65)
    assert cal.threshold_for_fpr(1e-6) == pytest.approx(0.3)
    assert cal.threshold_for_fpr(0.9) == pytest.approx(0.8)


def test_threshold_without_table():
    cal = Calibration(-5, 2, 0.4, 0.01)
    assert cal.threshold_for_fpr(0.01) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        cal.threshold_for_fpr(0.05)


def test_dict_round_trip():
    cal = _cal()
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again == cal


def test_resolve_device():
    dev, notice = resolve_device("cpu")
    assert dev == torch.device("cpu") and notice is None
    dev, notice = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu") and notice is None
    with pytest.raises(ValueError):
        resolve_device("tpu")
    with pytest.raises(ValueError):
        resolve_device("cuda:x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
def test_cuda_falls_back_to_cpu_with_notice():
    for spec in ("cuda", "cuda:0", "cuda:3"):
        dev, notice = resolve_device(spec)
        assert dev == torch.device("cpu")
        assert notice == "CUDA is not available; using the CPU"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_missing_gpu_index_falls_back():
    dev, notice = resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert dev.type == "cpu" and "no GPU" in notice

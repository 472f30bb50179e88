"""calibration.py: Platt scaling by hand, cross-fitting, the constant for an attribute not learnt, ECE."""
import math

import numpy as np
import pytest

import calibration


def test_platt_recovers_the_logistic_model_that_made_the_labels():
    """Labels drawn from sigmoid(2 z - 1): the fit gives slope 2, intercept -1 (within sampling error)."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 200_000)
    positive = rng.random(z.size) < calibration.sigmoid(2 * z - 1)
    slope, intercept = calibration.fit_platt(z, positive)
    assert slope == pytest.approx(2, abs=0.03) and intercept == pytest.approx(-1, abs=0.03)


def test_the_constant_is_platts_smoothed_prevalence_and_a_negative_slope_falls_back_to_it():
    positive = np.array([True] * 3 + [False] * 7)
    # Platt's targets: (3 + 1) / (3 + 2) = 0.8 for positives, 1 / (7 + 2) for negatives; their mean:
    mean_target = (3 * 0.8 + 7 / 9) / 10
    slope, intercept = calibration.fit_platt(np.arange(10.0), positive, constant=True)
    assert slope == 0 and calibration.sigmoid(intercept) == pytest.approx(mean_target)
    # The positives have the lowest logits: a slope below 0 would reward a ranking worse than chance.
    assert calibration.fit_platt(np.arange(10.0), positive)[0] == 0


def test_an_overconfident_head_is_tempered_and_a_shifted_one_moved_back():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1, 50_000)
    positive = rng.random(z.size) < calibration.sigmoid(z)
    # The head says 5 z + 3: overconfident and shifted (what pos_weight and memorising do); Platt undoes both.
    cal = calibration.fit(np.c_[5 * z + 3], np.c_[positive.astype(np.int8)], [True])
    assert cal["slope"][0] == pytest.approx(0.2, abs=0.01) and cal["intercept"][0] == pytest.approx(-0.6, abs=0.03)
    p = calibration.apply(np.c_[5 * z + 3], cal)[:, 0]
    assert calibration.reliability(p, positive)[1] < 0.01


def test_cross_fit_calibrates_each_fold_by_the_other_folds_only():
    """Two folds whose labels disagree completely: each fold's calibration, fitted on the other fold, is the
    other fold's (constant) prevalence, so no row's own label shaped its probability."""
    z = np.zeros((1, 4, 1))
    y = np.array([[1], [1], [0], [0]], dtype=np.int8)
    folds = np.array([[0], [0], [1], [1]])
    p = calibration.cross_fit(z, y, folds, [True])[:, 0]
    # Fold 0 is calibrated on fold 1 (two negatives): Platt's smoothed target 1 / (2 + 2) = 0.25.
    assert p[:2] == pytest.approx([0.25, 0.25]) and p[2:] == pytest.approx([0.75, 0.75])


def test_ece_and_log_loss_by_hand():
    p = np.array([0.1, 0.1, 0.9, 0.9])
    positive = np.array([False, True, True, True])
    rows, ece = calibration.reliability(p, positive, bins=10)
    # bin 1: mean 0.1, share 0.5; bin 9: mean 0.9, share 1.0 -> ECE = (2 * 0.4 + 2 * 0.1) / 4 = 0.25
    assert ece == pytest.approx(0.25) and [r[2] for r in rows] == [2, 2]
    assert calibration.log_loss(p, positive) == pytest.approx(-(math.log(0.9) + math.log(0.1) + 2 * math.log(0.9)) / 4)


def test_tta_logits_are_the_logit_of_the_mean_probability():
    a, b = np.array([2.0, -30.0]), np.array([-1.0, -40.0])
    mean = (calibration.sigmoid(a) + calibration.sigmoid(b)) / 2
    out = calibration.tta_logits(a, b)
    assert out[0] == pytest.approx(math.log(mean[0] / (1 - mean[0])))
    assert out[1] == pytest.approx(math.log((math.exp(-30) + math.exp(-40)) / 2), rel=1e-9)  # exact far out


def test_the_warning_names_the_attributes_not_learnt_and_is_none_otherwise():
    facts = {"attributes": ["Attr1", "Attr2", "Attr3"], "learnt": [True, False, False]}
    line = calibration.not_learnt_warning(facts, "model.pth")
    assert line.startswith("warning: model.pth: Attr2, Attr3 were not learnt") and "\n" not in line
    assert calibration.not_learnt_warning(dict(facts, learnt=[True] * 3), "m") is None
    assert calibration.not_learnt_warning({"attributes": ["A"]}, "old.pth") is None  # made before verdicts

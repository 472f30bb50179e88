"""metrics.py: AP, F1, curves and tuned thresholds against scikit-learn and hand numbers; NA ignored."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from metrics import (attribute_metrics, average_precision, f1_at, format_table, known_columns,
                     precision_recall_curve, to_json, tune_threshold)


def make_data(seed, n=40, k=4, na_rate=0.2):
    """Scores rounded to 0.1 (many ties), targets 1/0 with ~20% NA; every attribute has both classes known."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, k)) < 0.4).astype(np.int64)
    scores = np.clip(np.round(0.3 * targets + 0.7 * rng.random((n, k)), 1), 0, 1)
    targets[rng.random((n, k)) < na_rate] = -1
    targets[0], targets[1] = 1, 0
    return scores, targets


def known(scores, targets, k):
    mask = targets[:, k] >= 0
    return scores[mask, k], targets[mask, k] == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_matches_sklearn_with_ties_and_na(seed):
    scores, targets = make_data(seed)
    assert len(np.unique(scores[:, 0])) < 12  # ties really are there
    for k in range(targets.shape[1]):
        s, y = known(scores, targets, k)
        assert average_precision(s, y) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)


def test_average_precision_hand_computed_with_a_tie():
    # scores 0.9(+) 0.8(-) 0.8(+) 0.3(-): cuts 0.9 -> P=1, R=1/2; 0.8 -> P=2/3, R=1; 0.3 -> P=1/2, R=1
    # AP = 1/2 * 1 + 1/2 * 2/3 + 0 * 1/2 = 0.833333 (the tie is one cut, not two)
    s = np.array([0.9, 0.8, 0.8, 0.3])
    y = np.array([True, False, True, False])
    assert average_precision(s, y) == pytest.approx(5 / 6)
    assert math.isnan(average_precision(s, np.zeros(4, bool)))


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("threshold", [0.5, 0.0, 0.3, 0.75, 1.01])
def test_f1_precision_recall_match_sklearn(seed, threshold):
    scores, targets = make_data(seed)
    for k in range(targets.shape[1]):
        s, y = known(scores, targets, k)
        predicted = s >= threshold
        f1, precision, recall = f1_at(s, y, threshold)
        assert f1 == pytest.approx(skm.f1_score(y, predicted, zero_division=0))
        assert precision == pytest.approx(skm.precision_score(y, predicted, zero_division=0))
        assert recall == pytest.approx(skm.recall_score(y, predicted, zero_division=0))


def test_f1_at_hand_computed():
    # threshold 0.5: predicted 0.9(+) 0.6(-) 0.5(+) -> tp 2, fp 1, fn 1 (0.2 +): P = 2/3, R = 2/3, F1 = 4/6
    s = np.array([0.9, 0.6, 0.5, 0.2, 0.1])
    y = np.array([True, False, True, True, False])
    assert f1_at(s, y, 0.5) == pytest.approx((2 / 3, 2 / 3, 2 / 3))


@pytest.mark.parametrize("seed", [0, 4])
def test_attribute_metrics_match_sklearn_and_ignore_na(seed):
    scores, targets = make_data(seed)
    names = ["a", "b", "c", "d"]
    thresholds = [0.5, 0.4, 0.6, 0.5]
    result = attribute_metrics(scores, targets, thresholds, names)
    aps, f1s = [], []
    for k, row in enumerate(result["attributes"]):
        s, y = known(scores, targets, k)
        assert row["attribute"] == names[k]
        assert (row["positives"], row["negatives"]) == (y.sum(), (~y).sum())
        assert row["threshold"] == thresholds[k]
        assert row["ap"] == pytest.approx(skm.average_precision_score(y, s))
        assert row["f1"] == pytest.approx(skm.f1_score(y, s >= thresholds[k], zero_division=0))
        assert row["precision"] == pytest.approx(skm.precision_score(y, s >= thresholds[k], zero_division=0))
        assert row["recall"] == pytest.approx(skm.recall_score(y, s >= thresholds[k], zero_division=0))
        assert row["prevalence"] == pytest.approx(y.mean())
        aps.append(row["ap"])
        f1s.append(row["f1"])
    assert result["map"] == pytest.approx(np.mean(aps))
    assert result["macro_f1"] == pytest.approx(np.mean(f1s))

    # Scores under NA targets are not looked at: flip them all and nothing moves.
    changed = scores.copy()
    changed[targets < 0] = 1.0 - changed[targets < 0]
    assert not np.array_equal(changed, scores)
    assert to_json(attribute_metrics(changed, targets, thresholds, names)) == to_json(result)


def test_attribute_without_known_positives_is_left_out_of_map_and_macro_f1():
    scores = np.array([[0.9, 0.2, 0.7], [0.4, 0.6, 0.1], [0.8, 0.3, 0.9], [0.1, 0.7, 0.4]])
    targets = np.array([[1, 0, -1], [0, 1, 0], [1, 0, -1], [0, 1, 0]])
    result = attribute_metrics(scores, targets, [0.5, 0.5, 0.5], ["x", "y", "none"])
    rows = result["attributes"]
    # x and y are separated perfectly: AP 1, F1 1; "none" has negatives only (and 2 NA).
    assert [r["ap"] for r in rows[:2]] == [1.0, 1.0]
    assert math.isnan(rows[2]["ap"])
    assert (rows[2]["positives"], rows[2]["negatives"]) == (0, 2)
    assert result["map"] == 1.0  # mean(1, 1); averaging in NaN would give NaN, counting it as 0 would give 2/3
    assert result["macro_f1"] == 1.0  # the "none" F1 of 0 is not averaged in


def test_attribute_metrics_all_na_attribute():
    scores = np.array([[0.9, 0.5], [0.1, 0.5]])
    targets = np.array([[1, -1], [0, -1]])
    rows = attribute_metrics(scores, targets, [0.5, 0.5], ["x", "gone"])["attributes"]
    assert (rows[1]["positives"], rows[1]["negatives"]) == (0, 0)
    assert math.isnan(rows[1]["prevalence"]) and math.isnan(rows[1]["ap"])


def test_majority_baseline_and_prevalence():
    # attribute 0: P=789, N=106 (+5 NA): majority says "yes" always -> F1 = 2*789 / (2*789 + 106) = 1578/1684 = 0.937
    # attribute 1: P=3, N=5 -> majority says "no" -> F1 = 0;  attribute 2: P=N=4 -> 2*4 / (2*4 + 4) = 2/3
    n = 900
    targets = np.full((n, 3), -1)
    targets[:789, 0], targets[789:895, 0] = 1, 0
    targets[:3, 1], targets[3:8, 1] = 1, 0
    targets[:4, 2], targets[4:8, 2] = 1, 0
    scores = np.full((n, 3), 0.5)
    rows = attribute_metrics(scores, targets, [0.5] * 3, ["a", "b", "c"])["attributes"]
    assert rows[0]["majority_f1"] == pytest.approx(1578 / 1684)
    assert rows[0]["majority_f1"] == pytest.approx(0.937, abs=5e-4)
    assert rows[0]["prevalence"] == pytest.approx(789 / 895)  # 0.8816
    assert rows[1]["majority_f1"] == 0.0
    assert rows[1]["prevalence"] == pytest.approx(3 / 8)
    assert rows[2]["majority_f1"] == pytest.approx(2 / 3)


# ---- tune_threshold ----

def brute_force_best_f1(s, y):
    """F1 = 2TP / (2TP + FP + FN) at every distinct score as the cut, plus 'predict nothing' (F1 0)."""
    best = 0.0
    for t in np.unique(s):
        predicted = s >= t
        tp, fp, fn = (predicted & y).sum(), (predicted & ~y).sum(), (~predicted & y).sum()
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def test_brute_force_agrees_with_sklearn():
    scores, targets = make_data(0)
    s, y = known(scores, targets, 0)
    assert brute_force_best_f1(s, y) == pytest.approx(
        max(skm.f1_score(y, s >= t, zero_division=0) for t in np.unique(s)))


def test_tune_threshold_hand_computed():
    # cuts 0.9: tp1 fp0 -> F1 2/(1+0+2) = 2/3; 0.7: tp1 fp1 -> 2/4; 0.6: tp2 fp1 -> 4/5 (best); 0.2: tp2 fp2 -> 4/6
    # threshold halfway between 0.6 and the next lower score 0.2 = 0.4
    s = np.array([0.9, 0.7, 0.6, 0.2])
    y = np.array([True, False, True, False])
    t, note = tune_threshold(s, y)
    assert t == pytest.approx(0.4)
    assert note == ""
    assert f1_at(s, y, t)[0] == pytest.approx(0.8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tune_threshold_reaches_brute_force_maximum(seed):
    scores, targets = make_data(seed)
    for k in range(targets.shape[1]):
        s, y = known(scores, targets, k)
        t, _ = tune_threshold(s, y)
        assert f1_at(s, y, t)[0] == pytest.approx(brute_force_best_f1(s, y))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.booleans()), min_size=1, max_size=15))
def test_tune_threshold_property(pairs):
    s = np.array([v / 20 for v, _ in pairs])  # a coarse grid forces ties
    y = np.array([b for _, b in pairs])
    t, note = tune_threshold(s, y)
    if not y.any():
        assert t == 0.5 and note
        return
    best = f1_at(s, y, t)[0]
    assert best == pytest.approx(brute_force_best_f1(s, y))
    assert best >= f1_at(s, y, 0.5)[0] - 1e-12
    assert 0.0 <= t <= 1.0


def test_tune_threshold_adjacent_float32_scores():
    # The best cut is a = 0.7f (its positive alone: F1 1); the next score b is the float32 just below.
    # A threshold strictly between b and a needs more precision than float32 has: computed in
    # float32, (a + b) / 2 rounds to a or to b, and rounding to b also predicts the negative (F1 2/3).
    bad = []
    for start in [0.7, 0.3, 0.9, 0.55, 0.123, 0.999]:
        a = np.float32(start)
        b = np.nextafter(a, np.float32(0))
        s = np.array([a, b], dtype=np.float32)
        y = np.array([True, False])
        t, _ = tune_threshold(s, y)
        if not float(b) < float(t) <= float(a):
            bad.append((float(a), float(b), float(t)))
    assert bad == []


def test_tune_threshold_without_positives():
    t, note = tune_threshold(np.array([0.2, 0.9]), np.array([False, False]))
    assert t == 0.5
    assert "no known positives" in note


# ---- precision_recall_curve ----

def test_precision_recall_curve_hand_computed_and_none_without_positives():
    # scores 0.9 (pos), 0.7 (neg), 0.6 (pos), 0.2 (neg); cuts increasing, then the (1, 0) end point
    precision, recall, cuts = precision_recall_curve(np.array([0.9, 0.7, 0.6, 0.2]),
                                                     np.array([True, False, True, False]))
    np.testing.assert_allclose(cuts, [0.2, 0.6, 0.7, 0.9])
    np.testing.assert_allclose(precision, [2 / 4, 2 / 3, 1 / 2, 1, 1])
    np.testing.assert_allclose(recall, [1, 1, 1 / 2, 1 / 2, 0])
    assert precision_recall_curve(np.array([0.3, 0.4]), np.array([False, False])) is None


# ---- format_table / to_json ----


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.booleans()), min_size=1, max_size=40),
       st.sampled_from([np.float32, np.float64, np.int64]))
def test_precision_recall_curve_equals_sklearns(pairs, dtype):
    # Ours is one sort in the scores' own dtype; scikit-learn's is a float64 mergesort. Same arrays, ties included.
    s = np.array([v for v, _ in pairs]).astype(dtype) / (30 if dtype != np.int64 else 1)
    y = np.array([p for _, p in pairs])
    if not y.any():
        assert precision_recall_curve(s, y) is None
        return
    ours, theirs = precision_recall_curve(s, y), skm.precision_recall_curve(y, s.astype(np.float64))
    for a, b in zip(ours, theirs):
        assert a.dtype == np.float64 and np.array_equal(a, b)


def test_float32_scores_one_ulp_apart_stay_two_cuts():
    s = np.array([0.5, np.nextafter(np.float32(0.5), np.float32(1))], dtype=np.float32)
    precision, recall, cuts = precision_recall_curve(s, np.array([False, True]))
    assert len(cuts) == 2 and precision.tolist() == [0.5, 1.0, 1.0] and recall.tolist() == [1.0, 1.0, 0.0]

def test_format_table_and_to_json():
    scores = np.array([[0.9, 0.2, 0.7], [0.4, 0.6, 0.1], [0.8, 0.3, 0.9]])
    targets = np.array([[1, 0, -1], [0, 1, 0], [1, 0, -1]])
    names = ["sleeve", "collar", "a_very_long_attribute_name"]
    result = attribute_metrics(scores, targets, [0.5] * 3, names)
    table = format_table(result)
    for name in names:
        assert name in table
    assert table.splitlines()[-1].startswith("mAP 1.000")
    assert "n/a" in table  # the NaN AP of the attribute without positives

    clean = to_json(result)
    assert clean["attributes"][2]["ap"] is None
    assert clean["attributes"][0]["ap"] == 1.0
    text = json.dumps(clean, allow_nan=False)
    assert json.loads(text)["map"] == 1.0
    with pytest.raises(ValueError):
        json.dumps(result, allow_nan=False)  # the raw result does hold a NaN


def test_known_columns_drop_each_attributes_na_rows():
    scores = np.array([[0.1, 0.6], [0.2, 0.7], [0.3, 0.8]], dtype=np.float32)
    targets = np.array([[1, -1], [-1, 0], [0, 1]], dtype=np.int8)
    (s0, y0), (s1, y1) = known_columns(scores, targets)
    assert s0.tolist() == pytest.approx([0.1, 0.3]) and y0.tolist() == [True, False]
    assert s1.tolist() == pytest.approx([0.7, 0.8]) and y1.tolist() == [False, True]


# ---- the verdict ----

def test_the_permutation_p_value_of_a_tiny_set_is_its_exact_permutation_distribution():
    """4 rows, 2 positives: C(4, 2) = 6 equally likely placements of the positives; ranked first and second, only
    the observed one is as good: p = 1/6. Ranked 1st and 3rd: that one and the best: 2/6."""
    from metrics import rank_p_value

    assert rank_p_value([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == (1.0, pytest.approx(1 / 6))
    auc, p = rank_p_value([0.9, 0.2, 0.8, 0.1], [True, True, False, False])
    assert auc == 0.75 and p == pytest.approx(2 / 6)


def test_holm_by_hand():
    from metrics import holm

    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, max(0.06, 0.04) = 0.06; NaN stays out of the count
    assert np.allclose(holm([0.01, 0.04, 0.03, np.nan])[:3], [0.03, 0.06, 0.06])


def test_verdicts_on_labels_without_signal_hold_the_error_rate_and_find_a_real_signal():
    from metrics import verdicts

    rng = np.random.default_rng(0)
    called = 0
    for _ in range(100):
        y = (rng.random((300, 4)) < 0.2).astype(np.int8)
        called += sum(v["learnt"] for v in verdicts(rng.random((300, 4)), y, list("abcd"), resamples=0))
    assert called <= 12  # 400 pairs; Holm keeps the chance of any call per set at 5%: about 5 expected
    y = (rng.random((300, 1)) < 0.2).astype(np.int8)
    (v,) = verdicts(rng.random((300, 1)) + 0.5 * y, y, ["a"], resamples=200)
    assert v["learnt"] and v["p_value"] < 1e-6 and 0 < v["lift_low"] < v["lift"] < v["lift_high"]


def test_the_bootstrap_interval_of_a_perfect_ranking_is_its_lift_exactly():
    from metrics import ap_lift_interval

    scores = np.arange(10.0)
    positive = scores >= 7  # the top 3: AP 1 whatever is resampled, prevalence varies
    low, high = ap_lift_interval(scores, positive, resamples=500)
    assert 0 < low <= 0.7 <= high < 1


@pytest.mark.parametrize("n, ties", [(12, False), (300, False), (300, True), (5000, True)])
def test_the_rank_p_value_is_scipys_mann_whitney(n, ties):
    from scipy.stats import mannwhitneyu

    from metrics import rank_p_value

    rng = np.random.default_rng(n)
    scores = rng.random(n)
    if ties:
        scores = np.round(scores * 20) / 20
    positive = rng.random(n) < 0.3
    positive[:2], positive[2:4] = True, False
    scores = scores + 0.1 * positive
    expected = mannwhitneyu(scores[positive], scores[~positive], alternative="greater")
    auc, p = rank_p_value(scores, positive)
    assert auc * positive.sum() * (~positive).sum() == pytest.approx(expected.statistic)
    assert p == pytest.approx(expected.pvalue, rel=1e-6, abs=1e-300)


def test_the_bootstrap_of_a_large_set_is_the_rescaled_interval_of_a_subsample():
    """Past BOOTSTRAP_ROWS rows the interval comes from a subsample, scaled by sqrt(m / n): on 4 x BOOTSTRAP_ROWS
    rows about half as wide as on BOOTSTRAP_ROWS rows, and around the lift of every row."""
    import metrics

    rng = np.random.default_rng(0)
    n = 4 * metrics.BOOTSTRAP_ROWS
    positive = rng.random(n) < 0.2
    scores = rng.random(n) + 0.3 * positive
    lift = metrics.average_precision(scores, positive) - positive.mean()
    low, high = metrics.ap_lift_interval(scores, positive, resamples=200)
    small_low, small_high = metrics.ap_lift_interval(scores[:metrics.BOOTSTRAP_ROWS],
                                                     positive[:metrics.BOOTSTRAP_ROWS], resamples=200)
    assert low < lift < high
    assert (high - low) == pytest.approx((small_high - small_low) / 2, rel=0.35)

"""NA-aware multi-label metrics: per-attribute AP, F1, precision, recall, baselines; tuned thresholds.

Scores are probabilities (N, K); targets are 1 / 0 / -1 (NA) and NA cells are ignored everywhere.
"""
import math

import numpy as np


def _known(scores, targets, k):
    mask = targets[:, k] >= 0
    return np.asarray(scores[mask, k], dtype=np.float64), np.asarray(targets[mask, k] == 1)


def _cuts(scores, positive):
    """Counts at every distinct score taken as the cut (predict positive when score >= cut), highest first."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last_of_value]
    fp = (last_of_value + 1) - tp
    return s[last_of_value], tp, fp


def average_precision(scores, positive):
    """Step-wise AP, sum over cuts of (R_n - R_{n-1}) * P_n, as scikit-learn computes it; NaN with no positives."""
    if positive.sum() == 0:
        return math.nan
    _, tp, fp = _cuts(scores, positive)
    precision = tp / (tp + fp)
    recall = tp / positive.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def precision_recall_curve(scores, positive):
    cuts, tp, fp = _cuts(scores, positive)
    return tp / (tp + fp), tp / max(positive.sum(), 1), cuts


def f1_at(scores, positive, threshold):
    predicted = np.asarray(scores, dtype=np.float64) >= threshold
    tp = int((predicted & positive).sum())
    fp = int((predicted & ~positive).sum())
    fn = int((~predicted & positive).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return f1, precision, recall


def tune_threshold(scores, positive, default=0.5):
    """The cut that maximises F1; returns (threshold, note). The threshold sits halfway between the
    lowest score predicted positive and the next lower score, so it does not hug a training point."""
    if positive.sum() == 0:
        return default, "no known positives in validation; threshold kept at 0.5"
    # float64: the midpoint of two adjacent float32 scores would round onto the lower one.
    cuts, tp, fp = _cuts(np.asarray(scores, dtype=np.float64), positive)
    f1 = 2 * tp / (tp + fp + positive.sum())
    best = int(np.argmax(f1))  # first maximum = highest cut among ties
    below = float(cuts[best + 1]) if best + 1 < len(cuts) else 0.0
    threshold = (float(cuts[best]) + below) / 2
    return (threshold if threshold > below else float(cuts[best])), ""


def attribute_metrics(scores, targets, thresholds, attributes):
    """Per-attribute table rows (dicts) plus mAP and macro-F1 over the attributes that have known positives."""
    rows = []
    for k, name in enumerate(attributes):
        s, positive = _known(scores, targets, k)
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        f1, precision, recall = f1_at(s, positive, thresholds[k])
        prevalence = n_pos / (n_pos + n_neg) if n_pos + n_neg else math.nan
        # Always answering the majority class: F1 = 2P / (2P + N) when positives win, else 0.
        majority_f1 = 2 * n_pos / (2 * n_pos + n_neg) if n_pos >= n_neg and n_pos else 0.0
        rows.append({
            "attribute": name, "positives": n_pos, "negatives": n_neg,
            "ap": average_precision(s, positive), "prevalence": prevalence,
            "threshold": float(thresholds[k]), "f1": f1, "precision": precision, "recall": recall,
            "majority_f1": majority_f1,
        })
    scored = [r for r in rows if r["positives"] > 0]
    return {
        "attributes": rows,
        "map": float(np.mean([r["ap"] for r in scored])) if scored else math.nan,
        "macro_f1": float(np.mean([r["f1"] for r in scored])) if scored else math.nan,
    }


def format_table(result):
    def num(x):
        return "   n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:6.3f}"

    lines = [f"{'attribute':<12} {'pos':>5} {'neg':>5} {'AP':>6} {'prev':>6} {'thr':>6} "
             f"{'F1':>6} {'prec':>6} {'recall':>6} {'majF1':>6}"]
    for r in result["attributes"]:
        lines.append(f"{r['attribute']:<12} {r['positives']:>5} {r['negatives']:>5} {num(r['ap'])} "
                     f"{num(r['prevalence'])} {num(r['threshold'])} {num(r['f1'])} {num(r['precision'])} "
                     f"{num(r['recall'])} {num(r['majority_f1'])}")
    lines.append(f"mAP {num(result['map']).strip()}  macro-F1 {num(result['macro_f1']).strip()}")
    return "\n".join(lines)


def to_json(result):
    """Same numbers with NaN as null, so the file is valid JSON."""
    def clean(x):
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean(result)

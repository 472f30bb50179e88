"""NA-aware multi-label metrics: per-attribute AP, F1, precision, recall, baselines; tuned thresholds.

Scores are probabilities (N, K); targets are 1 / 0 / -1 (NA) and NA cells are ignored everywhere.
Each attribute is sorted once (one precision-recall curve), and its AP and F1-best threshold are both read off
that curve.
"""
import math

import numpy as np


def known_columns(scores, targets):
    """(scores, positive) of each attribute's known cells. One transpose first: a column of a (N, K) array is a
    strided read, and at 200k x 228 those reads cost more than the sorts."""
    scores_t, targets_t = np.ascontiguousarray(np.asarray(scores).T), np.ascontiguousarray(np.asarray(targets).T)
    for s, t in zip(scores_t, targets_t):
        mask = t >= 0
        yield s[mask], t[mask] == 1


def precision_recall_curve(scores, positive):
    """scikit-learn's precision_recall_curve, the same arrays (cuts increasing; precision and recall end with the
    point (1, 0)); None without positives, where the curve is undefined (scikit-learn warns and returns NaNs).

    Ours, not scikit-learn's, for speed: its curve checks the input and sorts twice (np.unique to find the label
    type, then a stable float64 mergesort), 90 ms an attribute at 200k rows, 20 s an epoch at 228 attributes;
    this is one sort in the scores' own dtype (tests/test_metrics.py holds it equal to scikit-learn's)."""
    positive = np.asarray(positive, dtype=bool)
    if not positive.any():
        return None
    scores = np.asarray(scores)
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float64)
    order = np.argsort(scores)[::-1]  # descending; ties are grouped below, so the sort need not be stable
    scores, positive = scores[order], positive[order]
    ends = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # the last row of each run of equal scores
    tps = np.cumsum(positive, dtype=np.int64)[ends]
    fps = ends + 1 - tps
    precision, recall = tps / (tps + fps), tps / tps[-1]
    return (np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0],
            scores[ends][::-1].astype(np.float64))


def _average_precision(curve):
    # scikit-learn's average_precision_score: sum over cuts of (R_n - R_{n-1}) * P_n.
    precision, recall, _ = curve
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def average_precision(scores, positive):
    """AP as scikit-learn computes it; NaN with no positives (the guard scikit-learn lacks)."""
    curve = precision_recall_curve(scores, positive)
    return math.nan if curve is None else _average_precision(curve)


def _best_cut(curve):
    """The F1-best threshold on a curve: halfway between the lowest score predicted positive and the next lower
    score, so it does not hug a training point. float64: the midpoint of two adjacent float32 scores would
    round onto the lower one."""
    precision, recall, cuts = curve
    p, r = precision[:-1], recall[:-1]
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    best = int(np.flatnonzero(f1 >= f1.max() - 1e-12)[-1])  # the highest cut among ties
    below = float(cuts[best - 1]) if best > 0 else 0.0
    threshold = (float(cuts[best]) + below) / 2
    return threshold if threshold > below else float(cuts[best])


NO_POSITIVES = "no known positives in validation; threshold kept at 0.5"


def tune_threshold(scores, positive, default=0.5):
    """The cut that maximises F1; returns (threshold, note)."""
    curve = precision_recall_curve(scores, positive)
    if curve is None:
        return default, NO_POSITIVES
    return _best_cut(curve), ""


def f1_at(scores, positive, threshold):
    predicted = np.asarray(scores, dtype=np.float64) >= threshold
    tp = int((predicted & positive).sum())
    fp = int((predicted & ~positive).sum())
    fn = int((~predicted & positive).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return f1, precision, recall


def attribute_metrics(scores, targets, thresholds, attributes):
    """Per-attribute table rows (dicts) plus mAP and macro-F1 over the attributes that have known positives.

    thresholds None: each attribute's F1-best threshold (tune_threshold) is used, and the reasons it could not
    be tuned are listed under "notes"."""
    rows, notes = [], []
    for k, (name, (s, positive)) in enumerate(zip(attributes, known_columns(scores, targets))):
        curve = precision_recall_curve(s, positive)
        threshold = thresholds[k] if thresholds is not None else (0.5 if curve is None else _best_cut(curve))
        if thresholds is None and curve is None:
            notes.append(f"{name}: {NO_POSITIVES}")
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        f1, precision, recall = f1_at(s, positive, threshold)
        prevalence = n_pos / (n_pos + n_neg) if n_pos + n_neg else math.nan
        # Always answering the majority class: F1 = 2P / (2P + N) when positives win, else 0.
        majority_f1 = 2 * n_pos / (2 * n_pos + n_neg) if n_pos >= n_neg and n_pos else 0.0
        rows.append({
            "attribute": name, "positives": n_pos, "negatives": n_neg,
            "ap": math.nan if curve is None else _average_precision(curve), "prevalence": prevalence,
            "threshold": float(threshold), "f1": f1, "precision": precision, "recall": recall,
            "majority_f1": majority_f1,
        })
    scored = [r for r in rows if r["positives"] > 0]
    return {
        "attributes": rows,
        "map": float(np.mean([r["ap"] for r in scored])) if scored else math.nan,
        "macro_f1": float(np.mean([r["f1"] for r in scored])) if scored else math.nan,
        "notes": notes,
    }


def macro_f1(scores, targets, thresholds):
    """Mean F1 over the attributes with known positives, at the given thresholds (no sorting)."""
    f1s = []
    for threshold, (s, positive) in zip(thresholds, known_columns(scores, targets)):
        if positive.any():
            f1s.append(f1_at(s, positive, threshold)[0])
    return float(np.mean(f1s)) if f1s else math.nan


def with_verdicts(result, found):
    """attribute_metrics' result with each row's verdict (metrics.verdicts) merged in."""
    rows = [dict(r, **{k: v[k] for k in ("learnt", "p_value", "p_adjusted", "auc", "lift", "lift_low", "lift_high")})
            for r, v in zip(result["attributes"], found)]
    return dict(result, attributes=rows)


def format_table(result):
    """The per-attribute table; with verdicts (with_verdicts) also each attribute's p-value and whether it was
    learnt, and under it the verdicts in one line. The means stand beside their chance levels."""
    def num(x):
        return "   n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:6.3f}"

    judged = bool(result["attributes"]) and "learnt" in result["attributes"][0]
    lines = [f"{'attribute':<12} {'pos':>5} {'neg':>5} {'AP':>6} {'prev':>6} {'thr':>6} "
             f"{'F1':>6} {'prec':>6} {'recall':>6} {'majF1':>6}" + (f" {'p':>8} {'learnt':>6}" if judged else "")]
    for r in result["attributes"]:
        line = (f"{r['attribute']:<12} {r['positives']:>5} {r['negatives']:>5} {num(r['ap'])} "
                f"{num(r['prevalence'])} {num(r['threshold'])} {num(r['f1'])} {num(r['precision'])} "
                f"{num(r['recall'])} {num(r['majority_f1'])}")
        if judged:
            p = r["p_adjusted"]
            line += f" {'n/a' if math.isnan(p) else f'{p:.1e}' if p < 1e-3 else f'{p:.3f}':>8} " \
                    f"{'yes' if r['learnt'] else 'NO':>6}"
        lines.append(line)
    scored = [r for r in result["attributes"] if r["positives"] > 0]
    chance = float(np.mean([r["prevalence"] for r in scored])) if scored else math.nan
    majority = float(np.mean([r["majority_f1"] for r in scored])) if scored else math.nan
    lines.append(f"mAP {num(result['map']).strip()} (chance {num(chance).strip()})  macro-F1 "
                 f"{num(result['macro_f1']).strip()} (majority answer {num(majority).strip()})")
    if judged:
        lines.append(verdict_line(result["attributes"]) + f" (Holm-adjusted permutation p < {ALPHA})")
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


# ---- the verdict: is an attribute learnt, beyond what chance gives on these labels? ----

ALPHA = 0.05  # family-wise error rate of the verdicts (Holm over the attributes)
RESAMPLES = 1000  # bootstrap resamples of AP - prevalence
BOOTSTRAP_ROWS = 2_000  # per attribute: past this many known cells the bootstrap resamples a subsample (below):
#                         whatever the rows, the interval costs the same
SUBSAMPLE_RESAMPLES = 500  # resamples of that subsample: 60 ms an attribute, 14 s for 228 on 2 cores
EXACT_UP_TO = 8  # positives and negatives: up to this many each (and no ties), the exact permutation distribution


def rank_p_value(scores, positive):
    """(AUC, one-sided p-value) of the scores ranking the positives above the negatives. The p-value is that of
    the permutation test of the ranking against these labels permuted across the rows (the labels against fixed
    out-of-fold scores): the Mann-Whitney rank-sum test is exactly that test, with the permutation distribution
    known in closed form, so a p-value can be as small as K attributes need, where B Monte-Carlo permutations stop
    at 1 / (B + 1). Exact for small sets without ties (scipy's); else the normal approximation with the tie
    correction and the continuity correction, scipy.stats.mannwhitneyu's "asymptotic" method computed here from
    one sort (scipy's took 70 ms an attribute at 45k rows; tests/test_metrics.py holds the two equal)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return math.nan, math.nan
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # the first row of each run of equal scores
    counts = np.diff(np.r_[starts, s.size])
    ranks = np.repeat(starts + (counts + 1) / 2, counts)  # 1-based, ties at their mean rank
    u = float(ranks[positive[order]].sum()) - n_pos * (n_pos + 1) / 2
    if n_pos <= EXACT_UP_TO and n_neg <= EXACT_UP_TO and (counts == 1).all():
        from scipy.stats import mannwhitneyu

        p = float(mannwhitneyu(scores[positive], scores[~positive], alternative="greater", method="exact").pvalue)
        return u / (n_pos * n_neg), p
    n = n_pos + n_neg
    ties = float(np.sum(counts.astype(np.float64) ** 3 - counts))
    variance = n_pos * n_neg / 12 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0:  # every score equal: nothing ranked
        return 0.5, 1.0
    z = (u - n_pos * n_neg / 2 - 0.5) / math.sqrt(variance)
    return u / (n_pos * n_neg), 0.5 * math.erfc(z / math.sqrt(2))


def holm(p_values):
    """Holm's step-down adjustment (controls the chance of calling any unlearnt attribute learnt at ALPHA, whatever
    the dependence between attributes); NaN stays NaN and does not count."""
    p = np.asarray(p_values, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(p.shape, math.nan)
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def ap_lift_interval(scores, positive, *, resamples=RESAMPLES, seed=0, level=0.95):
    """The bootstrap percentile interval of AP - prevalence (rows resampled with Poisson(1) weights: the sort is
    done once and each resample is a weighted cumulative sum along it). Past BOOTSTRAP_ROWS rows, the m-out-of-n
    bootstrap: resamples of a random m = BOOTSTRAP_ROWS rows, their spread around the subsample's own lift scaled by
    sqrt(m / n) and put around the lift of all rows (AP is a smooth statistic of the rows: its spread shrinks as
    1 / sqrt(rows)). It keeps the interval at seconds for 1M x 228 instead of hours (realdev: 550 rows, none)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    if not positive.any() or positive.all() or resamples < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    if scores.size > BOOTSTRAP_ROWS:
        full = average_precision(scores, positive) - positive.mean()
        keep = np.sort(rng.choice(scores.size, BOOTSTRAP_ROWS, replace=False))
        sub_scores, sub_positive = scores[keep], positive[keep]
        if not sub_positive.any() or sub_positive.all():
            return math.nan, math.nan
        sub = average_precision(sub_scores, sub_positive) - sub_positive.mean()
        low, high = ap_lift_interval(sub_scores, sub_positive, resamples=min(resamples, SUBSAMPLE_RESAMPLES),
                                     seed=seed + 1, level=level)
        scale = math.sqrt(BOOTSTRAP_ROWS / scores.size)
        return full + (low - sub) * scale, full + (high - sub) * scale
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], positive[order].astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last row of each run of equal scores
    chunk = max(1, min(resamples, 4_000_000 // s.size))
    lifts = []
    for start in range(0, resamples, chunk):
        w = rng.poisson(1.0, size=(min(chunk, resamples - start), s.size)).astype(np.float64)
        tp = np.cumsum(w * pos, axis=1)[:, ends]
        seen = np.cumsum(w, axis=1)[:, ends]
        total_pos = tp[:, -1]
        precision = np.divide(tp, seen, out=np.zeros_like(tp), where=seen > 0)
        ap = np.sum(np.diff(tp, axis=1, prepend=0.0) * precision, axis=1) / np.maximum(total_pos, 1e-300)
        ok = (total_pos > 0) & (total_pos < seen[:, -1])
        lifts.append((ap - total_pos / np.maximum(seen[:, -1], 1e-300))[ok])
    lifts = np.concatenate(lifts)
    tail = (1 - level) / 2
    return float(np.quantile(lifts, tail)), float(np.quantile(lifts, 1 - tail))


def verdicts(scores, targets, attributes, *, alpha=ALPHA, resamples=RESAMPLES):
    """Per attribute, from out-of-fold scores (n, K) and targets (1 / 0 / -1 = NA): AUC, the permutation p-value,
    its Holm adjustment over the attributes, AP - prevalence with its bootstrap interval, and learnt (the adjusted
    p-value below alpha). An attribute without known positives or negatives cannot be judged: not learnt."""
    rows = []
    for name, (s, positive) in zip(attributes, known_columns(scores, targets)):
        auc, p = rank_p_value(s, positive)
        ap = average_precision(s, positive)
        prevalence = float(positive.mean()) if positive.size else math.nan
        low, high = ap_lift_interval(s, positive, resamples=resamples) if positive.size else (math.nan, math.nan)
        rows.append({"attribute": name, "auc": auc, "p_value": p, "lift": ap - prevalence, "lift_low": low,
                     "lift_high": high})
    for row, adjusted in zip(rows, holm([r["p_value"] for r in rows])):
        row["p_adjusted"] = float(adjusted)
        row["learnt"] = bool(adjusted < alpha)  # NaN < alpha is False
    return rows


def verdict_line(rows):
    """learnt: Attr2, Attr4; not learnt (no better than chance): Attr1, Attr3"""
    learnt = [r["attribute"] for r in rows if r["learnt"]]
    not_learnt = [r["attribute"] for r in rows if not r["learnt"]]
    return f"learnt: {', '.join(learnt) or 'none'}; not learnt (no better than chance): {', '.join(not_learnt) or 'none'}"

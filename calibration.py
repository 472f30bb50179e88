"""Probabilities that mean what they say: Platt scaling of the head's logits, per attribute.

The loss's pos_weight = negatives / positives balances the classes by design, so the head's sigmoid is shifted
towards the rare class, and a head that memorises its training rows is overconfident on new ones. Each
attribute gets p = sigmoid(slope * logit + intercept), fitted on out-of-fold logits (rows the head never trained
on): scikit-learn's CalibratedClassifierCV(method="sigmoid", ensemble=False) does the same, a calibrator fitted on
cross_val_predict's scores and applied to the model refitted on every row. An attribute that was not learnt
(metrics.verdicts) gets slope 0: every image its prevalence, which is all the model knows of it.

numpy only: inference.py and serve.py apply it to an .onnx model's logits without PyTorch.
"""
import numpy as np

NEWTON_STEPS = 50


def sigmoid(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def logit(p, eps=1e-7):
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def tta_logits(a, b):
    """The logit of the mean probability of two views' logits, in log space (model.flip_tta's, in numpy)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.logaddexp(_log_sigmoid(a), _log_sigmoid(b)) - np.logaddexp(_log_sigmoid(-a), _log_sigmoid(-b))


def platt_targets(positive):
    """Platt's (1999) smoothed targets, (N+ + 1) / (N+ + 2) and 1 / (N- + 2): a perfectly separated fold does not
    push the slope to infinity."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    return np.where(positive, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))


def fit_platt(z, positive, *, constant=False):
    """(slope, intercept) of the logistic regression of the smoothed targets on logits z, by Newton's method.
    constant: slope 0, the intercept alone (the smoothed prevalence). A negative slope would turn a ranking worse
    than chance upside down on the strength of these rows alone: it is refitted as the constant."""
    z, positive = np.asarray(z, dtype=np.float64), np.asarray(positive, dtype=bool)
    if z.size == 0:
        return 0.0, 0.0
    t = platt_targets(positive)
    intercept = float(logit(t.mean()))
    if constant or np.ptp(z) == 0:
        return 0.0, intercept
    # Standardised logits keep the Newton steps well conditioned whatever the head's scale.
    mu, sd = float(z.mean()), float(z.std())
    x = (z - mu) / sd
    w = np.array([1.0, intercept])
    for _ in range(NEWTON_STEPS):
        p = sigmoid(w[0] * x + w[1])
        g = np.array([np.dot(p - t, x), np.sum(p - t)])
        h = p * (1 - p)
        hessian = np.array([[np.dot(h, x * x), np.dot(h, x)], [np.dot(h, x), h.sum()]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, g)
        w = w - step
        if np.abs(step).max() < 1e-10:
            break
    slope = w[0] / sd
    if not np.isfinite(slope) or slope < 0:
        return 0.0, intercept
    return float(slope), float(w[1] - slope * mu)


def fit(logits, targets, learnt):
    """The calibration of every attribute from (n, K) logits and targets (1 / 0 / -1 = NA, NA cells ignored):
    {"slope": [K], "intercept": [K]}, constant where learnt[k] is False."""
    logits, targets = np.asarray(logits), np.asarray(targets)
    slope, intercept = [], []
    for k in range(targets.shape[1]):
        known = targets[:, k] >= 0
        a, b = fit_platt(logits[known, k], targets[known, k] == 1, constant=not learnt[k])
        slope.append(a)
        intercept.append(b)
    return {"slope": slope, "intercept": intercept}


def identity(k):
    """The calibration of a model made before calibration existed: the head's own sigmoid."""
    return {"slope": [1.0] * k, "intercept": [0.0] * k}


def apply(logits, calibration):
    """Calibrated probabilities (float32) of (n, K) logits."""
    slope, intercept = np.asarray(calibration["slope"]), np.asarray(calibration["intercept"])
    return sigmoid(np.asarray(logits, dtype=np.float64) * slope + intercept).astype(np.float32)


def cross_fit(logits, targets, folds, learnt):
    """Calibrated out-of-fold probabilities (n, K): logits (R, n, K), one set per repeat of the cross-validation,
    folds (n, R). Each fold's rows are calibrated by a fit on the other folds of its repeat, so no row's own label
    shaped its probability; the mean over the repeats is returned."""
    logits, targets, folds = np.asarray(logits), np.asarray(targets), np.asarray(folds)
    out = np.zeros(logits.shape[1:], dtype=np.float64)
    for r in range(logits.shape[0]):
        for f in np.unique(folds[:, r]):
            held = folds[:, r] == f
            calibration = fit(logits[r][~held], targets[~held], learnt)
            out[held] += apply(logits[r][held], calibration)
    return (out / logits.shape[0]).astype(np.float32)


def log_loss(p, positive):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(np.where(positive, np.log(p), np.log1p(-p)))) if p.size else float("nan")


def reliability(p, positive, bins=10):
    """Per equal-width probability bin: (mean probability, share positive, count); and the expected calibration
    error, the count-weighted mean |share positive - mean probability|."""
    p, positive = np.asarray(p, dtype=np.float64), np.asarray(positive, dtype=bool)
    which = np.minimum((p * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        in_bin = which == b
        n = int(in_bin.sum())
        if n:
            mean_p, share = float(p[in_bin].mean()), float(positive[in_bin].mean())
            rows.append((mean_p, share, n))
            ece += n * abs(share - mean_p)
    return rows, ece / max(p.size, 1)


def of_facts(facts):
    """The calibration a model file (model.pth's facts, an .onnx file's metadata) carries; the head's own sigmoid
    for one made before calibration existed."""
    return facts.get("calibration") or identity(len(facts["attributes"]))


def not_learnt_warning(facts, source):
    """inference.py's and serve.py's one warning line when an attribute of the model was not learnt, else None."""
    learnt = facts.get("learnt")
    if not learnt or all(learnt):
        return None
    missed = [a for a, ok in zip(facts["attributes"], learnt) if not ok]
    return (f"warning: {source}: {', '.join(missed)} {'was' if len(missed) == 1 else 'were'} not learnt (no better "
            f"than chance on images the model never saw): {'its' if len(missed) == 1 else 'their'} probability is the "
            "prevalence of the training labels and the answer the majority's, whatever the image")

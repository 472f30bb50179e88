"""Label audit: which known labels look wrong, and what the NA cells probably are.

    python audit.py --labels labels.txt --images images --backbone efficientnet_lite0
    python audit.py --labels labels.txt --images images --out audit/ --folds 5

Every image is scored by a head that never trained on it: k heads are trained on the cached frozen features
(the same cache as train.py), each on k-1 folds, and each scores the fold it left out (out-of-fold
probabilities). Writes, in --out (default: the current folder):

    label_audit.csv        image, attribute, given, suggested, probability, score: one row per cell, the most
                           suspect known cells first (score = 1 - cleanlab's label quality), then the NA cells,
                           the most confident suggestion first (they have no score: NA is never wrong)
    labels_suggested.txt   the labels with NA cells filled where the model is confident (threshold in its header)

The labels file given is only read.
"""
import argparse
import csv
import os
import sys

import numpy as np
import torch

import train
from data_loader import FeatureBatches
from dataset import load_dataset, write_labels
from model import backbone_spec, build_model
from utils import (Report, UserError, add_runtime_flags, atomic_write, check_writable, keep_freed_memory, log,
                   pick_device, resolve_workers, run_cli, seed_everything, small_matmuls)

FOLDS = 5  # heads trained; each image is scored by the one that left its fold out
CONFIDENT = 0.9  # an NA cell is filled with 1 at an out-of-fold probability >= this, with 0 at <= 1 - this
AUDIT_COLUMNS = ("image", "attribute", "given", "suggested", "probability", "score")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Find suspect labels and suggest values for NA cells.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--labels", default=train.LABELS, help="labels file (read only)")
    p.add_argument("--images", default=train.IMAGES, help="images folder")
    p.add_argument("--out", default=".", help="folder for label_audit.csv and labels_suggested.txt")
    p.add_argument("--backbone", default=train.BACKBONE, type=train.backbone_arg)
    p.add_argument("--weights", default=train.WEIGHTS, help="imagenet | none | PATH to a state dict")
    p.add_argument("--image-size", type=train.size_arg, default=train.IMAGE_SIZE,
                   help="auto (the backbone's own) or pixels")
    p.add_argument("--folds", type=int, default=FOLDS)
    p.add_argument("--epochs", type=int, default=train.EPOCHS, help="epochs of each fold's head")
    p.add_argument("--lr", type=float, default=train.LR)
    p.add_argument("--weight-decay", type=float, default=train.WEIGHT_DECAY)
    p.add_argument("--confident", type=float, default=CONFIDENT, help="probability that fills an NA cell")
    p.add_argument("--seed", type=int, default=train.SEED)
    p.add_argument("--cache-dir", default=train.CACHE_DIR, help="feature cache folder (shared with train.py)")
    p.add_argument("--no-cache", action="store_true", help="keep extracted features in memory only")
    p.add_argument("--strict", action="store_true", help="every warning about the input is an error")
    add_runtime_flags(p, batch_size=train.BATCH_SIZE, num_workers=train.NUM_WORKERS, device=train.DEVICE,
                      keep_freed=train.KEEP_FREED_MEMORY)
    return p.parse_args(argv)


# ---- out-of-fold probabilities ----

def out_of_fold(features, targets, *, folds=FOLDS, seed=0, epochs=train.EPOCHS, lr=train.LR,
                weight_decay=train.WEIGHT_DECAY, batch_size=train.BATCH_SIZE):
    """Probabilities (n, K) of features (n, D), each row from a head trained on the other folds (train.out_of_fold:
    train.py's head, loop and loss), at the epoch whose out-of-fold mAP is best. targets: (n, K), NA = -1."""
    n = len(targets)
    if n < folds or folds < 2:
        raise UserError(f"{n} images cannot be split into {folds} folds; use --folds between 2 and {n}")
    settings = train.parse_args(["--folds", str(folds), "--seed", str(seed), "--epochs", str(epochs), "--lr", str(lr),
                                 "--weight-decay", str(weight_decay), "--batch-size", str(batch_size), "--no-tta"])
    x = np.asarray(features, dtype=np.float32)
    views = np.stack([x, x], 1)  # FeatureBatches' two views: the audit scores the image as is
    rows = np.arange(n)

    def batches(index, shuffle):
        return FeatureBatches(views, rows, index, targets, batch_size=batch_size, shuffle=shuffle, seed=seed)

    with small_matmuls():
        scores = train.out_of_fold(batches, rows, targets, args=settings, feature_dim=x.shape[1],
                                   device=torch.device("cpu"))
    _, best = train.oof_history(scores, np.asarray(targets), [str(k) for k in range(targets.shape[1])])
    return scores[best]


# ---- scores ----

def label_quality(probabilities, targets):
    """(n, K) suspicion score of each known cell, 1 - cleanlab's label quality; NaN for NA cells.

    cleanlab's multi-label scorer takes complete label sets and has no NA, so each attribute is scored as the
    binary problem it is over its known cells only (what cleanlab.multilabel_classification does per class
    before it aggregates per image): self-confidence, the out-of-fold probability of the given label."""
    from cleanlab.rank import get_label_quality_scores

    y = np.asarray(targets)
    score = np.full(y.shape, np.nan)
    for k in range(y.shape[1]):
        known = np.flatnonzero(y[:, k] >= 0)
        if len(known) == 0 or len(np.unique(y[known, k])) < 2:  # one class only: cleanlab needs both
            score[known, k] = np.where(y[known, k] == 1, 1 - probabilities[known, k], probabilities[known, k])
            continue
        p = probabilities[known, k].astype(np.float64)
        quality = get_label_quality_scores(y[known, k], np.stack([1 - p, p], axis=1), method="self_confidence")
        score[known, k] = 1 - quality
    return score


def audit_rows(names, attributes, targets, probabilities, score):
    """One dict per cell: known cells by score (most suspect first), then NA cells by the confidence of their
    suggestion. suggested: the value the model gives (probability >= 0.5, the balanced loss's midpoint)."""
    y = np.asarray(targets)
    rows = []
    for i, name in enumerate(names):
        for k, attribute in enumerate(attributes):
            p = float(probabilities[i, k])
            rows.append({"image": name, "attribute": attribute, "given": "NA" if y[i, k] < 0 else int(y[i, k]),
                         "suggested": int(p >= 0.5), "probability": p,
                         "score": None if y[i, k] < 0 else float(score[i, k])})
    known = sorted((r for r in rows if r["score"] is not None), key=lambda r: -r["score"])
    unknown = sorted((r for r in rows if r["score"] is None), key=lambda r: -abs(r["probability"] - 0.5))
    return known + unknown


def suggested_targets(targets, probabilities, confident):
    """targets with each NA cell set to 1 where p >= confident, 0 where p <= 1 - confident; others stay NA."""
    y = torch.as_tensor(targets).numpy().copy()
    na = y < 0
    y[na & (probabilities >= confident)] = 1
    y[na & (probabilities <= 1 - confident)] = 0
    return y


def flip_known(targets, rate, seed):
    """The measurement of the audit: targets with round(rate x known cells) known cells flipped at random
    (seeded), and the mask of the flipped cells."""
    y = torch.as_tensor(targets).numpy().copy()
    known = np.flatnonzero(y.ravel() >= 0)
    chosen = np.random.default_rng(seed).choice(known, round(rate * len(known)), replace=False)
    flipped = np.zeros(y.size, dtype=bool)
    flipped[chosen] = True
    flipped = flipped.reshape(y.shape)
    y[flipped] = 1 - y[flipped]
    return torch.as_tensor(y), flipped


def recall_in_top(score, flipped, factor=2):
    """Share of the flipped cells among the factor x (number flipped) highest scores (NaN cells never count)."""
    order = np.argsort(-np.nan_to_num(score.ravel(), nan=-np.inf), kind="stable")
    top = order[:factor * int(flipped.sum())]
    return float(flipped.ravel()[top].sum() / max(flipped.sum(), 1))


# ---- outputs ----

def write_audit_csv(path, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(AUDIT_COLUMNS)
            for r in rows:
                out.writerow([r["image"], r["attribute"], r["given"], r["suggested"], f"{r['probability']:.6f}",
                              "" if r["score"] is None else f"{r['score']:.6f}"])

    atomic_write(path, write)


def write_suggested(path, table, targets, probabilities, *, confident, source):
    filled = suggested_targets(targets, probabilities, confident)
    count = int((np.asarray(targets) < 0).sum() - (filled < 0).sum())
    comment = (f"# {os.path.basename(source)} with {count} NA cells filled by audit.py: 1 where the out-of-fold "
               f"probability is >= {confident}, 0 where it is <= {1 - confident:.2f}; the other NA cells stay NA")
    write_labels(path, table.attributes, table.names, torch.as_tensor(filled), comment=comment)
    return count


# ---- main ----

def audit_features(args, report):
    """(table, paths, targets, view-0 features (n, D), ok mask) through train.py's feature cache."""
    from feature_cache import cached_features

    table, paths, targets = load_dataset(args.labels, args.images, report)
    device = pick_device(args.device)
    if args.keep_freed_memory:
        keep_freed_memory(device)
    if args.image_size == "auto":
        args.image_size = backbone_spec(args.backbone).size
    mean, std = backbone_spec(args.backbone).norm
    model = build_model(args.backbone, len(table.attributes), args.weights, "none", args.image_size).to(device)
    features, rows, ok = cached_features(
        model, paths, backbone=args.backbone, image_size=args.image_size, mean=mean, std=std,
        cache_dir=None if args.no_cache else args.cache_dir, batch_size=args.batch_size,
        num_workers=resolve_workers(args.num_workers, device), device=device, amp=False, report=report,
        mirror=np.zeros(len(paths), dtype=bool))
    return table, paths, targets, np.asarray(features[np.where(ok, rows, 0), 0]), ok


def run(args):
    outputs = {"csv": os.path.join(args.out, "label_audit.csv"),
               "labels": os.path.join(args.out, "labels_suggested.txt")}
    if os.path.abspath(outputs["labels"]) == os.path.abspath(args.labels):
        raise UserError(f"{args.labels}: audit.py would overwrite the labels file; give another --out")
    if not 0.5 < args.confident <= 1:
        raise UserError(f"--confident {args.confident} must be in (0.5, 1]")
    check_writable(list(outputs.values()))
    seed_everything(args.seed)
    report = Report(strict=args.strict)
    table, paths, targets, features, ok = audit_features(args, report)
    keep = np.flatnonzero(ok)
    table.names = [table.names[i] for i in keep]
    targets = targets[keep]
    probabilities = out_of_fold(features[keep], targets, folds=args.folds, seed=args.seed, epochs=args.epochs,
                                lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size)
    rows = audit_rows(table.names, table.attributes, targets, probabilities, label_quality(probabilities, targets))
    write_audit_csv(outputs["csv"], rows)
    filled = write_suggested(outputs["labels"], table, targets, probabilities, confident=args.confident,
                             source=args.labels)
    log(f"wrote {outputs['csv']} ({len(rows)} cells, the most suspect first) and {outputs['labels']} "
        f"({filled} of {int((targets < 0).sum())} NA cells filled at probability {args.confident})")
    for r in rows[:10]:
        if r["score"] is not None:
            log(f"  suspect: {r['image']} {r['attribute']} given {r['given']}, the model says {r['probability']:.2f}")
    return 0


def main(argv=None):
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

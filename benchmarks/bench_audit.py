"""Label audit on real photos: how many deliberately flipped labels the audit ranks among its top suspects.

    python benchmarks/bench_audit.py                          # ../shared/realdev/train, 4% flipped, flip seeds 0 1 2
    python benchmarks/bench_audit.py --repeats 1 2 3 5 --second-backbone efficientnet_lite1

For each flip seed, round(4% of the known cells) are flipped at random (audit.flip_known); each recipe's out-of-fold
probabilities of the flipped labels are scored, and the measure is the share of the flipped cells among the
top 2 x (number flipped) suspects (audit.recall_in_top). Recipes, all on the same cached features:
  before   the audit before this change: a linear head on view 0 only (no flip, no TTA), 5 folds, 30 epochs, the
           epoch with the best out-of-fold mAP, one cross-validation (what audit.py trained for itself)
  run xR   train.py's own cross-validation (its defaults: the MLP head, flip, TTA, 5 folds, up to 30 epochs) with
           --repeats R: the mean over R fold assignments, at the epoch it picks (engine.out_of_fold, as train.py
           runs it); R = 1..max are the first R repeats of one cross-validation of the largest R
Each is scored with cleanlab's self_confidence (audit.py's score) and, on the same probabilities, normalized_margin
and confidence_weighted_entropy. --second-backbone adds the run's recipe on two backbones' features side by side.
Also printed: the out-of-fold mAP against the clean labels, and the seconds each cross-validation took.
"""
import argparse
import os
import sys
import time

import numpy as np

from common import machine_lines, table

import torch  # noqa: E402  (after common, which puts the repo root on sys.path)

import audit  # noqa: E402
import engine  # noqa: E402
import train  # noqa: E402
from data_loader import FeatureBatches  # noqa: E402
from dataset import load_dataset  # noqa: E402
from feature_cache import cached_features  # noqa: E402
from metrics import attribute_metrics  # noqa: E402
from model import backbone_spec, build_model  # noqa: E402
from utils import Report, bf16_is_native, keep_freed_memory, small_matmuls  # noqa: E402

REALDEV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "realdev",
                       "train")
SCORES = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=REALDEV, help="folder with labels.txt and images/")
    p.add_argument("--rate", type=float, default=0.04, help="share of the known cells flipped")
    p.add_argument("--flip-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=5, help="the run's recipe with 1 .. this many repeats")
    p.add_argument("--backbone", default="efficientnet_lite0", help="train.py's offline default")
    p.add_argument("--second-backbone", help="also the run's recipe on this backbone's features concatenated")
    p.add_argument("--cache-dir", default=train.CACHE_DIR)
    p.add_argument("--seed", type=int, default=train.SEED)
    p.add_argument("--epoch-rule", default=train.EPOCH_RULE, help="train.py's --epoch-rule for the run's recipe")
    return p.parse_args(argv)


def features_of(backbone, paths, cache_dir):
    """Both views (n, 2, D) of every path at the backbone's train.py size, from train.py's cache."""
    size = backbone_spec(backbone).size
    mean, std = backbone_spec(backbone).norm
    model = build_model(backbone, 1, "imagenet", "none", size)
    amp = bf16_is_native(torch.device("cpu"))  # train.py's --amp auto: the same cache folder as its runs
    features, rows, ok = cached_features(model, paths, backbone=backbone, image_size=size, mean=mean, std=std,
                                         cache_dir=cache_dir, batch_size=32, num_workers=0,
                                         device=torch.device("cpu"), amp=amp, report=Report())
    assert ok.all(), "an image could not be read"
    return np.asarray(features[rows])


def scores_of(probabilities, y):
    """Suspicion of each known cell by each cleanlab method (audit.label_quality's per-attribute scheme)."""
    from cleanlab.rank import get_label_quality_scores

    out = {}
    for method in SCORES:
        score = np.full(y.shape, np.nan)
        for k in range(y.shape[1]):
            known = np.flatnonzero(y[:, k] >= 0)
            p = probabilities[known, k].astype(np.float64)
            score[known, k] = 1 - get_label_quality_scores(y[known, k], np.stack([1 - p, p], 1), method=method)
        out[method] = score
    assert np.allclose(out["self_confidence"], audit.label_quality(probabilities, y), equal_nan=True)
    return out


def cross_validations(features, y, args, *, max_repeats, seed):
    """{repeats: (probabilities at the chosen epoch, seconds, epochs)} for 1 .. max_repeats: one cross-validation
    of max_repeats (its heads side by side, as train.py runs them), every epoch's logits kept (a small set), and
    each R its first R repeats (the seconds: the whole cross-validation's, for every R)."""
    targets = torch.from_numpy(y)
    index = np.arange(len(y))
    rows = np.arange(len(y))

    def batches(idx, shuffle, batch_seed):
        return FeatureBatches(features, rows, idx, targets, batch_size=args.batch_size, shuffle=shuffle,
                              seed=batch_seed, both_views=args.tta and not shuffle)

    args.repeats = max_repeats
    state = engine.start_out_of_fold(y, folds=args.folds, repeats=max_repeats, epochs=args.epochs, seed=seed)
    epochs, started = [], time.perf_counter()
    with small_matmuls():
        assert engine.out_of_fold(batches, index, targets, args=args, feature_dim=features.shape[-1],
                                  device=torch.device("cpu"), state=state,
                                  every_epoch=lambda epoch, logits: epochs.append(logits))
    seconds, scores, results = time.perf_counter() - started, np.stack(epochs, 1), {}
    for r in range(1, max_repeats + 1):
        cv = engine.finish_all_epochs(scores[:r], state.folds[:, :r], index, targets,
                                      attributes=[str(k) for k in range(y.shape[1])], thresholds="0.5",
                                      loss_fn=engine.make_loss_for(args, targets), rule=args.epoch_rule)
        results[r] = (cv.probabilities, seconds, cv.epochs)
    return results


def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory(torch.device("cpu"))
    labels = os.path.join(args.data, "labels.txt")
    table_, paths, targets = load_dataset(labels, os.path.join(args.data, "images"), Report())
    clean = targets.numpy()
    print("\n".join(machine_lines()), flush=True)
    print(f"data      {labels}: {len(paths)} images, {int((clean >= 0).sum())} known cells; flipped "
          f"{args.rate:.0%}, flip seeds {args.flip_seeds}", flush=True)
    started = time.perf_counter()
    features = {args.backbone: features_of(args.backbone, paths, args.cache_dir)}
    if args.second_backbone:
        features[args.second_backbone] = features_of(args.second_backbone, paths, args.cache_dir)
        features["both"] = np.concatenate([features[args.backbone], features[args.second_backbone]], -1)
    print(f"features  {', '.join(f'{k} {v.shape[-1]}' for k, v in features.items())} ({time.perf_counter() - started:.0f}s)",
          flush=True)
    run = train.parse_args(["--epoch-rule", args.epoch_rule])  # train.py's defaults: the run's own recipe
    before = train.parse_args(["--head", "linear", "--no-tta", "--epochs", "30", "--folds", "5"])
    x = features[args.backbone]
    view0 = np.stack([x[:, 0], x[:, 0]], 1)  # the old audit: the image as is, never mirrored
    recall = {}  # (recipe, score) -> [recall per flip seed]
    extra = {}  # recipe -> [(oof mAP vs clean labels, seconds, epochs)]
    for flip_seed in args.flip_seeds:
        y, flipped = audit.flip_known(clean, args.rate, flip_seed)
        print(f"flip seed {flip_seed}: {int(flipped.sum())} cells flipped", flush=True)
        recipes = {"before (linear, view 0, 1 cross-validation)":
                   cross_validations(view0, y, before, max_repeats=1, seed=args.seed)[1]}
        for r, result in cross_validations(x, y, run, max_repeats=args.repeats, seed=args.seed).items():
            recipes[f"run x{r} ({args.backbone})"] = result
        if args.second_backbone:
            for name in (args.second_backbone, "both"):
                result = cross_validations(features[name], y, run, max_repeats=3, seed=args.seed)[3]
                recipes[f"run x3 ({name if name != 'both' else args.backbone + ' + ' + args.second_backbone})"] = \
                    result
        for name, (probabilities, seconds, epochs) in recipes.items():
            for method, score in scores_of(probabilities, y).items():
                recall.setdefault((name, method), []).append(audit.recall_in_top(score, flipped))
            m = attribute_metrics(probabilities, clean, None, [str(k) for k in range(clean.shape[1])])["map"]
            extra.setdefault(name, []).append((m, seconds, epochs))
            print(f"    {name}: recall {recall[(name, 'self_confidence')][-1]:.3f}, oof mAP {m:.4f}, "
                  f"{seconds:.1f}s, epoch {epochs}", flush=True)
    rows = []
    for name in extra:
        cells = [name]
        for method in SCORES:
            values = recall[(name, method)]
            cells.append(f"{np.mean(values):.3f} ({' '.join(f'{v:.2f}' for v in values)})")
        cells += [f"{np.mean([e[0] for e in extra[name]]):.4f}", f"{np.mean([e[1] for e in extra[name]]):.1f}"]
        rows.append(cells)
    print()
    print("\n".join(machine_lines()))
    print(f"recall of the flipped cells among the top 2 x flips suspects, mean (per flip seed); {len(paths)} photos, "
          f"{args.rate:.0%} of the known cells flipped")
    print(table(["recipe", *SCORES, "oof mAP (clean)", "cv seconds"], rows, ["<"] + [">"] * (len(SCORES) + 2)))
    print("cv seconds: the cross-validation's wall time (for run xR: the one of the largest R, all its repeats side "
          "by side), features cached; oof mAP: the "
          "out-of-fold probabilities against the labels before flipping.")
    print(f"total {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model quality on real photos: today's recipe and each change, for several seeds, on ../shared/realdev.

    python benchmarks/bench_quality.py                      # all recipes, seeds 0 1 2
    python benchmarks/bench_quality.py --recipes a,e --seeds 0

Every recipe trains with train.main on realdev's train part only (its validation numbers, a split or out-of-fold,
are what a choice may be based on) and is scored once on the test part, through the checkpoint alone: the
checkpoint's backbone, size, normalization, head, thresholds and TTA, on features from the same feature cache
(the features equal evaluate.py's forward to float rounding: tests/test_feature_cache.py). Prints mean and
spread over the seeds of validation and test mAP and macro-F1, and the change against recipe a.
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time

from common import ROOT, machine_lines

import numpy as np  # noqa: E402
import torch  # noqa: E402

import calibration  # noqa: E402
import model as model_py  # noqa: E402
import engine  # noqa: E402
import train  # noqa: E402
from data_loader import FeatureBatches  # noqa: E402
from dataset import load_dataset  # noqa: E402
from feature_cache import cached_features  # noqa: E402
from metrics import attribute_metrics  # noqa: E402
from model import flip_tta, load_checkpoint, model_from_checkpoint  # noqa: E402
from utils import Report  # noqa: E402

LITE0 = ["--backbone", "efficientnet_lite0", "--weights", "imagenet"]
TODAY = [*LITE0, "--image-size", "224", "--head", "linear", "--folds", "0", "--no-tta", "--thresholds", "tuned"]
# name -> (description, train.py flags, what the backbones did before: ImageNet mean/std for lite0 (before each
# backbone got its own normalization), the last feature map only (before the Lite backbones added their last block's))
BEFORE = {"last_map"}
RECIPES = {
    "a": ("today: lite0 224, ImageNet norm, linear, 20% split, tuned thr", TODAY, {"imagenet_norm", "last_map"}),
    "b": ("a + the backbone's own normalization", TODAY, BEFORE),
    "c": ("b + flip TTA", [*TODAY, "--tta"], BEFORE),
    "d": ("b + 5-fold out-of-fold epochs, final head on all rows", [*TODAY, "--folds", "5"], BEFORE),
    "e": ("d + threshold 0.5", [*TODAY, "--folds", "5", "--thresholds", "0.5"], BEFORE),
    "f": ("e + 288 px", [*TODAY, "--folds", "5", "--thresholds", "0.5", "--image-size", "288"], BEFORE),
    "g": ("f + mlp head (dropout 0.5, wd 1e-2, cosine)",
          [*TODAY, "--folds", "5", "--thresholds", "0.5", "--image-size", "288", "--head", "mlp", "--dropout",
           "0.5", "--weight-decay", "1e-2", "--scheduler", "cosine"], BEFORE),
    "g2": ("f + mlp head (dropout 0.2, wd 1e-4, constant lr)",
           [*TODAY, "--folds", "5", "--thresholds", "0.5", "--image-size", "288", "--head", "mlp", "--dropout",
            "0.2"], BEFORE),
    "h": ("g2 on lite2 at 260", ["--backbone", "efficientnet_lite2", "--weights", "imagenet", "--image-size", "260",
                                 "--head", "mlp", "--dropout", "0.2", "--folds", "5", "--no-tta", "--thresholds",
                                 "0.5"], BEFORE),
    "i": ("g2 at 320 px", [*TODAY, "--folds", "5", "--thresholds", "0.5", "--image-size", "320", "--head", "mlp",
                           "--dropout", "0.2"], BEFORE),
    "j": ("g2 with up to 60 epochs", [*TODAY, "--folds", "5", "--thresholds", "0.5", "--image-size", "288", "--head",
                                      "mlp", "--dropout", "0.2", "--epochs", "60"], BEFORE),
    "k": ("g2 + flip TTA", [*TODAY, "--folds", "5", "--thresholds", "0.5", "--image-size", "288", "--head", "mlp",
                            "--dropout", "0.2", "--tta"], BEFORE),
    "l": ("g2 + the last block's pooled features (multi-level)",
          [*TODAY, "--folds", "5", "--thresholds", "0.5", "--image-size", "288", "--head", "mlp", "--dropout", "0.2"],
          set()),
    "m": ("l + flip TTA", [*TODAY, "--folds", "5", "--thresholds", "0.5", "--image-size", "288", "--head", "mlp",
                           "--dropout", "0.2", "--tta"], set()),
    "default": ("the default command, offline (no flags)", [], set()),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "realdev"),
                   help="folder with train/ and test/, each labels.txt + images/")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "bench_quality_cache"),
                   help="feature cache shared by every recipe and seed")
    return p.parse_args(argv)


class LastMapOnly(torch.nn.Module):
    """A Lite backbone's features as before the last block's were added: its pooled last feature map."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[:, :1280]


@contextlib.contextmanager
def as_before(changes):
    """The backbones as an earlier recipe had them (RECIPES' third field), for the duration of one recipe."""
    saved = dict(model_py.BACKBONES)
    for name, entry in saved.items():
        if "imagenet_norm" in changes and name == "efficientnet_lite0":
            entry = entry._replace(norm=model_py.IMAGENET_NORM)
        if "last_map" in changes and name.startswith("efficientnet_lite"):
            entry = entry._replace(build=lambda weights, size, build=entry.build: LastMapOnly(build(weights, size)),
                                   features=1280)
        model_py.BACKBONES[name] = entry
    try:
        yield
    finally:
        model_py.BACKBONES.update(saved)


def test_scores(model_path, labels, images, cache_dir):
    """Probabilities of the test images through the checkpoint alone, and their targets."""
    ckpt = load_checkpoint(model_path)
    model = model_from_checkpoint(ckpt, model_path)
    report = Report(stream=io.StringIO())
    _, paths, targets = load_dataset(labels, images, report)
    tta = ckpt.get("tta", False)
    with contextlib.redirect_stdout(io.StringIO()):
        features, rows, ok = cached_features(
            model, paths, backbone=ckpt["backbone"], image_size=ckpt["image_size"], mean=ckpt["mean"],
            std=ckpt["std"], cache_dir=cache_dir, batch_size=32, num_workers=0, device=torch.device("cpu"),
            amp=ckpt.get("amp", False), report=report, mirror=np.full(len(paths), tta))
    batches = FeatureBatches(features, rows, np.flatnonzero(ok), targets, batch_size=256, shuffle=False, seed=0,
                             both_views=tta)
    forward = flip_tta(model.head, features=True) if tta else model.head
    logits, index, _ = engine.evaluate(forward, batches, device=torch.device("cpu"), logits=True)
    return calibration.apply(logits, calibration.of_facts(ckpt)), targets[index].numpy(), ckpt


def run_recipe(name, seed, args, folder):
    _, flags, before = RECIPES[name]
    data = args.data
    out = os.path.join(folder, f"{name}_{seed}")
    os.makedirs(out, exist_ok=True)
    argv = [*flags, "--labels", os.path.join(data, "train", "labels.txt"), "--images",
            os.path.join(data, "train", "images"), "--out", os.path.join(out, "model.pth"), "--curve",
            os.path.join(out, "loss_curve.png"), "--seed", str(seed), "--cache-dir", args.cache_dir, "--no-report"]
    started = time.time()
    with as_before(before), contextlib.redirect_stdout(io.StringIO()) as log, \
            contextlib.redirect_stderr(io.StringIO()):
        rc = train.main(argv)
        if rc != 0:
            raise SystemExit(f"recipe {name} seed {seed}: train.main returned {rc}\n{log.getvalue()[-2000:]}")
        scores, y, ckpt = test_scores(os.path.join(out, "model.pth"), os.path.join(data, "test", "labels.txt"),
                                      os.path.join(data, "test", "images"), args.cache_dir)
    elapsed = time.time() - started
    validation = json.load(open(os.path.join(out, "metrics.json")))["validation"]
    test = attribute_metrics(scores, y, ckpt["thresholds"], ckpt["attributes"])
    return {"val_map": validation["map"], "val_f1": validation["macro_f1"], "map": test["map"],
            "f1": test["macro_f1"], "ap": [r["ap"] for r in test["attributes"]], "seconds": elapsed,
            "backbone": f"{ckpt['backbone']} {ckpt['image_size']}"}


def spread(values):
    return f"{statistics.mean(values):.3f}±{statistics.pstdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main(argv=None):
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    for line in machine_lines():
        print(line)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            results[name] = [run_recipe(name, seed, args, folder) for seed in seeds]
            r = results[name]
            print(f"  {name}: test mAP {spread([x['map'] for x in r])}  macro-F1 {spread([x['f1'] for x in r])}  "
                  f"({r[0]['backbone']}, {sum(x['seconds'] for x in r):.0f}s)", flush=True)
    base = results.get("a")
    print(f"\nrealdev: train 600 (choices: validation split or out-of-fold), test 300; seeds {args.seeds}")
    header = f"{'recipe':<58} {'val mAP':>11} {'val F1':>11} {'test mAP':>11} {'test F1':>11} {'dmAP':>7} {'dF1':>7}"
    print(header)
    for name in names:
        r = results[name]
        d_map = statistics.mean(x["map"] for x in r) - statistics.mean(x["map"] for x in base) if base else 0
        d_f1 = statistics.mean(x["f1"] for x in r) - statistics.mean(x["f1"] for x in base) if base else 0
        print(f"{name + ' ' + RECIPES[name][0]:<58.58} {spread([x['val_map'] for x in r]):>11} "
              f"{spread([x['val_f1'] for x in r]):>11} {spread([x['map'] for x in r]):>11} "
              f"{spread([x['f1'] for x in r]):>11} {d_map:>+7.3f} {d_f1:>+7.3f}")
    print("\ntest AP per attribute (mean over seeds):")
    for name in names:
        ap = np.mean([x["ap"] for x in results[name]], axis=0)
        print(f"  {name:<8} " + "  ".join(f"Attr{k + 1} {v:.3f}" for k, v in enumerate(ap)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The verdict, the calibration and the epoch rule on real photos, with and without signal in the labels.

    python benchmarks/bench_verdict.py                          # ../shared/realdev, every part below
    python benchmarks/bench_verdict.py --permutations 5 --parts perm

Every row is the default command (`python train.py`, through train.main: cross-validation 2 x 5, the epoch rule,
the verdict, the calibration, the final head) on realdev's train part, its labels as they are or damaged:
  signal   the labels as given, seeds 0 1 2; scored once on realdev/test through the checkpoint alone
  perm     the label rows permuted across the images (the right answer: nothing learnt), 20 permutations
  weak q   a share q of every attribute's known cells replaced by random draws at the attribute's prevalence
  rows N   N of the rows drawn at random (what fewer labelled images give; train.py's advice cites it)
For each: the verdict and AP - prevalence per attribute, the out-of-fold log-loss against the prevalence's (the
calibration target: at most the prevalence's + 0.01), the expected calibration error, the epochs chosen, and what
audit.py would act on (suspects ranked, NA cells filled at its 0.9).
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

import numpy as np

from common import ROOT, machine_lines

import audit  # noqa: E402
import train  # noqa: E402
from bench_quality import test_scores  # noqa: E402
from calibration import log_loss, reliability  # noqa: E402
from dataset import parse_labels  # noqa: E402
from engine import read_oof  # noqa: E402
from metrics import attribute_metrics  # noqa: E402

REALDEV = os.path.join(os.path.dirname(ROOT), "shared", "realdev")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=REALDEV)
    p.add_argument("--parts", default="signal,perm,weak,rows")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--permutations", type=int, default=20)
    p.add_argument("--shares", default="0.5,0.8,0.9,0.95")
    p.add_argument("--rows", default="150,300", help="the rows part's sizes")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "bench_quality_cache"))
    p.add_argument("--flags", default="", help="extra train.py flags, e.g. '--epoch-rule map'")
    return p.parse_args(argv)


def write_labels_text(path, header, names, rows):
    with open(path, "w") as f:
        f.write(header + "\n" + "".join(f"{n} {' '.join(r)}\n" for n, r in zip(names, rows)))


def damaged(labels, kind, seed, share=0.0):
    """The labels file's (header, names, value rows) with its rows permuted or a share of known cells redrawn."""
    lines = [line for line in open(labels).read().splitlines() if line.strip()]
    header, names = lines[0], [line.split()[0] for line in lines[1:]]
    rows = [line.split()[1:] for line in lines[1:]]
    rng = np.random.default_rng(seed)
    if kind == "perm":
        rows = [rows[i] for i in rng.permutation(len(rows))]
    elif kind == "rows":
        keep = np.sort(rng.choice(len(rows), int(share), replace=False))
        names, rows = [names[i] for i in keep], [rows[i] for i in keep]
    elif kind == "weak":
        values = np.array(rows)
        for k in range(values.shape[1]):
            known = np.flatnonzero(values[:, k] != "NA")
            prevalence = np.mean(values[known, k] == "1")
            redraw = known[rng.random(len(known)) < share]
            values[redraw, k] = np.where(rng.random(len(redraw)) < prevalence, "1", "0")
        rows = values.tolist()
    return header, names, rows


def one_run(labels, images, out, args, seed):
    argv = ["--labels", labels, "--images", images, "--out", os.path.join(out, "model.pth"), "--curve",
            os.path.join(out, "curve.png"), "--seed", str(seed), "--cache-dir", args.cache_dir, "--no-report",
            *args.flags.split()]
    started = time.time()
    with contextlib.redirect_stdout(io.StringIO()) as said, contextlib.redirect_stderr(io.StringIO()):
        if train.main(argv) != 0:
            raise SystemExit(said.getvalue()[-2000:])
    seconds = time.time() - started
    judging = float(said.getvalue().split("the epoch rule, the verdicts and the calibration: ")[1].split("s)")[0])
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    oof = read_oof(os.path.join(out, "oof.npz"))
    y, p = np.asarray(oof.targets), np.asarray(oof.probabilities)
    calibration = []
    for k in range(y.shape[1]):
        known = y[:, k] >= 0
        positive = y[known, k] == 1
        prevalence = np.full(positive.shape, positive.mean())
        calibration.append((log_loss(p[known, k], positive), log_loss(prevalence, positive),
                            reliability(p[known, k], positive)[1]))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        data = audit.audit_data(labels, images, model=os.path.join(out, "model.pth"))
    suspects = int(np.isfinite(data.score).sum())
    filled = int(((audit.suggested_targets(data.targets, data.probabilities, audit.CONFIDENT, data.learnt) >= 0)
                  & (data.targets < 0)).sum())
    rows = metrics["validation"]["attributes"]
    return {"learnt": [r["learnt"] for r in rows], "p": [r["p_adjusted"] for r in rows],
            "lift": [r["lift"] for r in rows], "epochs": metrics["cross_validation"]["epochs"],
            "calibration": calibration, "suspects": suspects, "filled": filled, "seconds": seconds, "judging": judging,
            "map": metrics["validation"]["map"], "f1": metrics["validation"]["macro_f1"],
            "ap": [r["ap"] for r in rows]}


def line(name, r):
    cal = " ".join(f"{a:.3f}/{b:.3f}" for a, b, _ in r["calibration"])
    ece = " ".join(f"{e:.3f}" for _, _, e in r["calibration"])
    return (f"{name:<14} {' '.join('Y' if x else '.' for x in r['learnt']):<8} "
            f"{' '.join(f'{p:.3f}' for p in r['p']):<24} {' '.join(f'{x:+.3f}' for x in r['lift']):<28} "
            f"{r['epochs']:>3} {cal:<48} {ece:<24} {r['suspects']:>5} {r['filled']:>4} {r['seconds']:>5.1f}")


def main(argv=None):
    args = parse_args(argv)
    parts = args.parts.split(",")
    print("\n".join(machine_lines()), flush=True)
    train_labels = os.path.join(args.data, "train", "labels.txt")
    images = os.path.join(args.data, "train", "images")
    header = (f"{'run':<14} {'learnt':<8} {'p (Holm) per attribute':<24} {'AP - prevalence':<28} {'ep':>3} "
              f"{'oof log-loss / prevalence log-loss':<48} {'ECE':<24} {'susp':>5} {'fill':>4} {'s':>5}")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        print(header, flush=True)
        if "signal" in parts:
            for seed in map(int, args.seeds.split(",")):
                out = os.path.join(folder, f"signal{seed}")
                os.makedirs(out)
                r = one_run(train_labels, images, out, args, seed)
                scores, y, ckpt = test_scores(os.path.join(out, "model.pth"), os.path.join(args.data, "test", "labels.txt"),
                                              os.path.join(args.data, "test", "images"), args.cache_dir)
                test = attribute_metrics(scores, y, ckpt["thresholds"], ckpt["attributes"])
                r["test"] = (test["map"], test["macro_f1"])
                results.setdefault("signal", []).append(r)
                print(line(f"signal s{seed}", r) + f"  test mAP {test['map']:.4f} F1 {test['macro_f1']:.4f}"
                      f"  oof AP {' '.join(f'{a:.3f}' for a in r['ap'])}",
                      flush=True)
        for kind, settings in (("perm", [(s, 0.0) for s in range(args.permutations)] if "perm" in parts else []),
                               ("weak", [(0, float(q)) for q in args.shares.split(",")] if "weak" in parts else []),
                               ("rows", [(0, int(n)) for n in args.rows.split(",")] if "rows" in parts else [])):
            for seed, share in settings:
                out = os.path.join(folder, f"{kind}{seed}_{share}")
                os.makedirs(out)
                labels = os.path.join(out, "labels.txt")
                write_labels_text(labels, *damaged(train_labels, kind, 1000 + seed, share))
                r = one_run(labels, images, out, args, 0)
                results.setdefault(kind, []).append(r)
                name = {"perm": f"perm {seed}", "weak": f"weak q={share}", "rows": f"rows {share}"}[kind]
                print(line(name, r) + (f"  oof AP {' '.join(f'{a:.3f}' for a in r['ap'])}" if kind == "rows" else ""),
                      flush=True)
    print()
    if "signal" in results:
        s = results["signal"]
        print(f"signal: learnt {sum(map(sum, (r['learnt'] for r in s)))} of {4 * len(s)} (attribute, seed) pairs; "
              f"test mAP {statistics.mean(r['test'][0] for r in s):.4f}, macro-F1 "
              f"{statistics.mean(r['test'][1] for r in s):.4f} (mean of {len(s)} seeds)")
    if "perm" in results:
        s = results["perm"]
        called = sum(map(sum, (r["learnt"] for r in s)))
        print(f"no signal: {called} of {4 * len(s)} (attribute, permutation) pairs called learnt ({called / (4 * len(s)):.1%}, "
              f"target <= 5%); suspects listed of attributes not learnt: 0 by construction; runs with any suspect "
              f"or fill: {sum(1 for r in s if r['suspects'] or r['filled'])} (only where an attribute was called learnt)")
    runs = [r for part in results.values() for r in part]
    print(f"cost: the epoch rule, the verdicts and the calibration took {statistics.mean(r['judging'] for r in runs):.2f}s "
          f"of a {statistics.mean(r['seconds'] for r in runs):.1f}s run on average "
          f"({statistics.mean(r['judging'] / r['seconds'] for r in runs):.1%}; target <= 10%)")
    every = [c for part in results.values() for r in part for c in r["calibration"]]
    worst = max(a - b for a, b, _ in every)
    print(f"calibration: the largest out-of-fold log-loss minus the prevalence's over every run and attribute: "
          f"{worst:+.4f} (target <= +0.01); the largest ECE on the signal runs: "
          f"{max((c[2] for r in results.get('signal', []) for c in r['calibration']), default=float('nan')):.3f} "
          "(target <= 0.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

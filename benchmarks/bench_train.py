"""Training speed: the project's cached-feature path against the usual loop, on one generated set, in one process.

    python benchmarks/bench_train.py                      # 300 images, 10 epochs, resnet50, --weights none (~9 min, 2 cores)
    python benchmarks/bench_train.py --sweep              # also: extraction over workers/threads/batch
    python benchmarks/bench_train.py --usual-epochs 3     # the usual loop for 3 epochs, extrapolated (labelled)
    python benchmarks/bench_train.py --backbone efficientnet_lite0 --weights imagenet --no-amp   # a meaningful mAP
    python benchmarks/bench_train.py --n 40 --epochs 2 --ceiling-seconds 3   # a quick look that it runs
    python benchmarks/bench_train.py --data ../shared/realdev/train --no-amp --noise-seeds 0   # 600 real photos

Order: (a), (n), (a'), (b), (a) again, (c), (c'), (d), (c''), the mAP noise floor, (a*), (n*), (f*), the sweep. The usual
loop runs before train.main so that nothing train.main changes process-wide (threads, the allocator: train.py keeps
freed memory for reuse, model.keep_freed_memory) helps it; (n) and (n*) say how much that setting would give it.

Rows of the table:
  (a)   the machine's forward ceiling: the backbone alone on random batches, channels_last fp32, inference_mode,
        glibc's default allocator settings
  (a*)  the same after train.main, i.e. with freed memory kept as train.py runs; % ceiling uses the highest (a)/(a*)
  (n)   the same forward in NCHW, the usual loop's layout, default allocator; (n*) with freed memory kept
  (f*)  what the extraction runs: channels_last, BatchNorm folded into the convs, freed memory kept (info)
  (b)   the usual loop: DataLoader (the same --num-workers) + Resize/RandomHorizontalFlip + the full model (NCHW
        fp32) every epoch, a validation pass every epoch; same model, split, loss, optimizer, lr, seed as train.py
  (c)   train.main end to end with a cold feature cache (extraction included)
  (c')  the same again on the warm cache (another --lr, so it is a new run, not a copy)
  (d)   the default command: train.py's defaults (5-fold cross-validation x --repeats, the final head, figures,
        report.html with Grad-CAM and the audit) with a cold cache of its own; its mAP is out of fold. Its
        breakdown and the share of its wall time after the last forward of extraction are the issue's targets
  (c'') train.main --amp (bf16 autocast for the backbone) with its own cold cache
Random ('none') weights give a near-chance mAP on every path and a head that never settles: the noise-floor table
(the same head training under 20 data orders) shows how far two equally good runs land apart.
The machine is shared and noisy: read the ratios of one run, not absolute numbers across runs.
"""
import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

from common import cpu_seconds, fmt, forward_ceiling, load_average, machine_lines, make_set, table, wait_for_quiet

import torch  # noqa: E402  (after common, which puts the repo root on sys.path)

import feature_cache  # noqa: E402
import engine  # noqa: E402
import train  # noqa: E402
from data_loader import FeatureBatches, split_indices  # noqa: E402
from dataset import (IMAGENET_MEAN, IMAGENET_STD, ImageDataset, collate, eval_transform,  # noqa: E402
                     load_dataset, load_image, train_transform)
from utils import Report, StopFlag, resolve_workers, seed_everything, workers_arg  # noqa: E402
from loss import make_loss, pos_weights  # noqa: E402
from metrics import attribute_metrics  # noqa: E402
from model import build_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="generated images")
    p.add_argument("--data", help="a folder with labels.txt and images/ to use instead of generated images (e.g. "
                                  "../shared/realdev/train, 600 photos)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--usual-epochs", type=int, help="run the usual loop for this many epochs and extrapolate "
                                                    "its wall time to --epochs (default: all --epochs, measured)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--weights", default="none", help="none (the issue's setting) | imagenet (e.g. with --backbone "
                                                    "efficientnet_lite0, offline) : pretrained features make mAP meaningful")
    p.add_argument("--num-workers", type=workers_arg, default=train.NUM_WORKERS,
                   help="for (b) and (c) alike; auto: what train.py picks on this machine")
    p.add_argument("--seed", type=int, default=train.SEED)
    p.add_argument("--data-seed", type=int, default=1234, help="make_sample seed")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="first wait up to S seconds for the 1-minute load average to drop below 1")
    p.add_argument("--ceiling-seconds", type=float, default=18.0, help="timed seconds per ceiling measurement")
    p.add_argument("--no-amp", action="store_true", help="skip the --amp run and the bf16 ceiling")
    p.add_argument("--sweep", action="store_true", help="also time extraction over workers/threads/batch settings")
    p.add_argument("--sweep-n", type=int, default=64, help="images per sweep setting")
    p.add_argument("--noise-seeds", type=int, default=20,
                   help="data-order seeds for the mAP noise floor (head-only training on the warm cache); 0: skip")
    p.add_argument("--quiet", action="store_true", help="do not echo train.py's log lines")
    return p.parse_args(argv)


# ---- timing helpers ----

class Timers:
    """Wraps module functions to add up the wall time spent inside them, per label."""

    def __init__(self):
        self.seconds, self.calls, self._undo = {}, {}, []

    def wrap(self, module, name, label=None):
        label = label or name
        original = getattr(module, name, None)
        if original is None:  # the product renamed it: that part just lands in "other"
            return

        def timed(*a, **k):
            started = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(module, name, timed)
        self._undo.append((module, name, original))

    def restore(self):
        for module, name, original in reversed(self._undo):
            setattr(module, name, original)
        self._undo = []


class Tee(io.TextIOBase):
    def __init__(self, echo):
        self.buffer, self.echo, self._line = io.StringIO(), echo, ""

    def write(self, s):
        self.buffer.write(s)
        if self.echo:
            self._line += s
            while "\n" in self._line:
                line, self._line = self._line.split("\n", 1)
                sys.__stdout__.write(f"    | {line}\n")
            sys.__stdout__.flush()
        return len(s)

    def getvalue(self):
        return self.buffer.getvalue()


# ---- (b) the usual loop ----

def usual_loop(labels, images, args, epochs):
    """What a typical script does with a frozen backbone: the backbone runs on every image every epoch."""
    started, cpu_started = time.perf_counter(), cpu_seconds()
    seed_everything(args.seed)
    table_, paths, targets = load_dataset(labels, images, Report())
    attributes = table_.attributes
    train_idx, val_idx = split_indices(targets, train.VAL_FRACTION, args.seed)
    pos_weight, _ = pos_weights(targets[train_idx])
    torch.manual_seed(args.seed)  # as train.py: the same random backbone and head as (c)
    model = build_model(args.backbone, len(attributes), args.weights, "none", args.image_size)
    loss_fn = make_loss("bce", pos_weight)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=train.LR, weight_decay=train.WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(args.seed)
    train_set = ImageDataset([paths[i] for i in train_idx], targets[train_idx], train_transform(args.image_size))
    val_set = ImageDataset([paths[i] for i in val_idx], targets[val_idx], eval_transform(args.image_size))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                               num_workers=args.num_workers, collate_fn=collate,
                                               generator=generator)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, shuffle=False,
                                             num_workers=args.num_workers, collate_fn=collate)
    setup = time.perf_counter() - started
    epoch_times, maps = [], []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()  # the product's train() keeps the frozen backbone (and its BatchNorm) in eval mode
        losses = []
        for indices, x, _ in train_loader:
            logits = model(x)
            loss = loss_fn(logits, train_set.targets[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        parts, kept = [], []
        with torch.no_grad():
            for indices, x, _ in val_loader:
                parts.append(torch.sigmoid(model(x)))
                kept.append(indices)
        scores = torch.cat(parts).numpy()
        y = val_set.targets[torch.cat(kept)].numpy()
        maps.append(attribute_metrics(scores, y, [0.5] * len(attributes), attributes)["map"])
        epoch_times.append(time.perf_counter() - t0)
        print(f"    | usual loop epoch {epoch + 1:>3}/{epochs}  train_loss {np.mean(losses):.4f}  mAP {maps[-1]:.4f}  "
              f"time {epoch_times[-1]:.1f}s  {(len(train_set) + len(val_set)) / epoch_times[-1]:.1f} img/s",
              flush=True)
    wall = time.perf_counter() - started
    return {"wall": wall, "cpu": cpu_seconds() - cpu_started, "setup": setup, "epoch_times": epoch_times, "maps": maps,
            "forwards": (len(train_set) + len(val_set)) * epochs, "n_train": len(train_set), "n_val": len(val_set)}


# ---- (c) the project's path ----

def project_path(labels, images, args, folder, cache_dir, extra=(), default_command=False):
    """train.main in this process; wall time, extraction time and the mAPs from metrics.json, plus a breakdown.
    default_command: train.py's defaults (cross-validation, the report); else a validation split, no report, no
    early stop, whose validation mAP compares with the usual loop's."""
    os.makedirs(folder, exist_ok=True)
    argv = ["--labels", labels, "--images", images, "--out", os.path.join(folder, "model.pth"),
            "--curve", os.path.join(folder, "loss_curve.png"), "--weights", args.weights, "--backbone", args.backbone,
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--image-size",
            str(args.image_size), "--num-workers", str(args.num_workers), "--seed", str(args.seed),
            "--cache-dir", cache_dir, *([] if default_command else ["--patience", "0", "--folds", "0", "--no-report"]),
            *extra]
    import report

    timers = Timers()
    extracted = []  # when train.py's own feature step returned (the last forward of its extraction)
    original_cached = feature_cache.cached_features

    def cached_and_stamped(*a, **k):
        try:
            return original_cached(*a, **k)
        finally:
            extracted.append(time.perf_counter())

    feature_cache.cached_features = cached_and_stamped
    timers.wrap(train, "cross_validate", "cross-validation (heads, oof.npz)")
    timers.wrap(train, "fit", "final head (epochs)")
    timers.wrap(report, "after_training", "report.html (Grad-CAM, audit)")
    timers.wrap(train, "load_dataset", "data")
    timers.wrap(train, "split_indices", "data")
    timers.wrap(train, "build_model", "build model")
    timers.wrap(feature_cache, "cached_features", "cache step")
    timers.wrap(feature_cache, "fingerprint", "fingerprint")
    timers.wrap(train, "save_checkpoint", "checkpoint saves")
    for name in ("loss_curve_figure", "metrics_figure", "save_figure"):
        timers.wrap(train, name, "plots")
    out = Tee(echo=not args.quiet)
    try:
        started, cpu_started = time.perf_counter(), cpu_seconds()
        with contextlib.redirect_stdout(out):
            rc = train.main(argv)
        ended = time.perf_counter()
        wall, cpu = ended - started, cpu_seconds() - cpu_started
    finally:
        timers.restore()
        feature_cache.cached_features = original_cached
    log = out.getvalue()
    if rc != 0:
        raise SystemExit(f"train.main {' '.join(argv)} returned {rc}:\n{log}")
    with open(os.path.join(folder, "metrics.json")) as f:
        metrics = json.load(f)
    history = metrics["cross_validation"]["history"] if default_command else metrics["history"]
    # The log says how many forwards (image views) it ran and how long that took; two wordings are understood.
    m = re.search(r"extracting \S+ features: (\d+) forwards", log)
    forwards = int(m.group(1)) if m else 0
    m = re.search(r"extracted in ([\d.]+)s", log)
    extract_s = float(m.group(1)) if m else None
    m = re.search(r"extracted (\d+) images in ([\d.]+)s", log)
    if m:
        forwards, extract_s = 2 * int(m.group(1)), float(m.group(2))
    epoch_s = [float(t) for t in re.findall(r"^epoch\s+\d+/\d+ .*  time ([\d.]+)s", log, re.M)]
    return {
        "wall": wall, "cpu": cpu, "log": log, "forwards": forwards, "extract_s": extract_s, "epoch_s": sum(epoch_s),
        "map_last": history[-1]["map"], "map_best": max(h["map"] for h in history),
        "best_epoch": metrics["cross_validation"]["epochs"] if default_command else metrics["best_epoch"],
        "maps": [h["map"] for h in history], "timers": dict(timers.seconds),
        "after_extraction": ended - extracted[0] if extracted else None,
    }


def breakdown_rows(name, r):
    t = r["timers"]
    fingerprint = t.get("fingerprint", 0.0)
    cache_step = t.get("cache step", 0.0)
    extraction = r["extract_s"] or 0.0
    parts = [
        ("data (labels, split)", t.get("data", 0.0)),
        ("build model", t.get("build model", 0.0)),
        ("cache: fingerprint", fingerprint),
        ("cache: extraction loop", extraction),
        ("cache: rest (lookup, index)", cache_step - fingerprint - extraction),
        ("cross-validation (heads, oof.npz)", t.get("cross-validation (heads, oof.npz)", 0.0)),
        ("final head (epochs)", t.get("final head (epochs)", 0.0)),
        ("checkpoint saves", t.get("checkpoint saves", 0.0)),
        ("plots", t.get("plots", 0.0)),
        ("report.html (Grad-CAM, audit)", t.get("report.html (Grad-CAM, audit)", 0.0)),
    ]
    parts.append(("other", r["wall"] - sum(s for _, s in parts)))
    return [[name, label, fmt(s, ".2f"), fmt(100 * s / r["wall"], ".0f") + "%"] for label, s in parts]


# ---- the sweep: what makes extraction slower than the ceiling ----

def sweep(paths, args, ceiling):
    """Extraction (feature_cache.extract, both views) of the first sweep_n images under several settings,
    best of two runs each. It runs last, under the process settings train.main made (freed memory kept)."""
    paths = paths[:args.sweep_n]
    torch.manual_seed(args.seed)
    model = build_model(args.backbone, 4, "none", "none", args.image_size)
    transform = eval_transform(args.image_size)
    rows = []
    t0 = time.perf_counter()
    for p in paths:
        transform(load_image(p))
    decode = len(paths) / (time.perf_counter() - t0)
    rows.append(["decode+resize+normalize only, main process", "-", "-", "-", fmt(decode), "-"])
    default_threads = torch.get_num_threads()
    settings = [(2, 2, 32), (1, 2, 32), (0, 2, 32), (2, 1, 32), (0, 2, 16), (2, 2, 16)]
    for workers, threads, batch in settings:
        torch.set_num_threads(threads)
        try:
            # warm-up on this shape so the first-batch kernel set-up is not what is measured
            list(feature_cache.extract(model, paths[:batch], image_size=args.image_size, mean=IMAGENET_MEAN,
                                       std=IMAGENET_STD, batch_size=batch, num_workers=0, device=torch.device("cpu"),
                                       amp=False))
            rate = 0.0
            for _ in range(2):  # best of two: the machine is shared
                started = time.perf_counter()
                for _ in feature_cache.extract(model, paths, image_size=args.image_size, mean=IMAGENET_MEAN,
                                               std=IMAGENET_STD, batch_size=batch, num_workers=workers,
                                               device=torch.device("cpu"), amp=False):
                    pass
                rate = max(rate, 2 * len(paths) / (time.perf_counter() - started))
        finally:
            torch.set_num_threads(default_threads)
        rows.append([f"extract: workers {workers}, torch threads {threads}, batch {batch} (forward {2 * batch})",
                     workers, threads, batch, fmt(rate), fmt(100 * rate / ceiling, ".0f") + "%"])
        print(f"    | sweep {rows[-1][0]}: {rate:.1f} forwards/s", flush=True)
    return table(["setting", "workers", "threads", "batch", "forwards/s", "% ceiling"], rows)


# ---- the mAP noise floor: how far two equally good runs land apart ----

def noise_floor(labels, images, args, cache_dir, seeds):
    """Last-epoch validation mAP of head-only training on the warm feature cache for several data-order seeds,
    everything else fixed: (c)'s own loop (engine.train_one_epoch over FeatureBatches, AdamW, masked BCE) with
    only the batches' seed changed. Seed args.seed repeats (c)'s own order, so its mAP should equal (c)'s."""
    seed_everything(args.seed)
    report = Report(stream=io.StringIO())
    table_, paths, targets = load_dataset(labels, images, report)
    attributes = table_.attributes
    train_idx, val_idx = split_indices(targets, train.VAL_FRACTION, args.seed)
    pos_weight, _ = pos_weights(targets[train_idx])
    torch.manual_seed(args.seed)
    model = build_model(args.backbone, len(attributes), args.weights, "none", args.image_size)
    mirror = np.zeros(len(paths), dtype=bool)
    mirror[train_idx] = True
    messages = []
    with contextlib.redirect_stdout(io.StringIO()) as quiet:
        features, rows, ok = feature_cache.cached_features(
            model, paths, backbone=args.backbone, image_size=args.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            cache_dir=cache_dir, batch_size=args.batch_size, num_workers=0, device=torch.device("cpu"), amp=False,
            report=report, mirror=mirror)
    messages = quiet.getvalue().splitlines()
    if any(m.startswith("extracting") for m in messages):
        print("    | noise floor: the cache was not warm (features extracted again)", flush=True)
    head0 = {k: v.clone() for k, v in model.head.state_dict().items()}
    val_batches = FeatureBatches(features, rows, val_idx, targets, batch_size=args.batch_size, shuffle=False, seed=0)
    cpu = torch.device("cpu")
    maps = []
    for seed in seeds:
        model.head.load_state_dict(head0)
        optimizer = engine.make_optimizer(model.head, train.parse_args(["--lr", str(train.LR)]))
        loss_fn = make_loss("bce", pos_weight)
        batches = FeatureBatches(features, rows, train_idx, targets, batch_size=args.batch_size, shuffle=True,
                                 seed=seed)
        stop = StopFlag()
        for epoch in range(args.epochs):
            batches.set_epoch(epoch)
            model.train()
            engine.train_one_epoch(model.head, batches, loss_fn=loss_fn, optimizer=optimizer, lr_at=lambda step: 1.0,
                                  first_step=0, device=cpu, stop=stop, label="noise floor")
        stop.restore()
        model.eval()
        scores, index, _ = engine.evaluate(model.head, val_batches, device=cpu)
        maps.append(attribute_metrics(scores, targets[index].numpy(), [0.5] * len(attributes), attributes)["map"])
    return np.asarray(maps)


# ---- main ----

def main(argv=None):
    args = parse_args(argv)
    args.num_workers = resolve_workers(args.num_workers, torch.device("cpu"))
    usual_epochs = args.usual_epochs or args.epochs
    total_started = time.perf_counter()
    if args.wait_quiet:
        print(f"waiting up to {args.wait_quiet:.0f}s for a quiet machine: load {wait_for_quiet(args.wait_quiet):.2f}",
              flush=True)
    print("\n".join(machine_lines()), flush=True)
    print(f"setup     {args.n} images, {args.epochs} epochs, batch {args.batch_size}, {args.image_size}px, "
          f"{args.backbone} --weights {args.weights}, {args.num_workers} workers, seed {args.seed}", flush=True)
    ceilings, loads = {}, {}  # row -> images/s measurements; loads: 1-minute load average at each row's end

    def measure(row, what, **options):
        print(f"{row} forward, {what} ...", flush=True)
        rate, batches = forward_ceiling(args.batch_size, args.image_size, args.backbone, args.ceiling_seconds,
                                        **options)
        ceilings.setdefault(row, []).append(rate)
        loads.setdefault(row, []).append(os.getloadavg()[0])
        print(f"    | {rate:.2f} images/s over {batches} batches; load {loads[row][-1]:.2f}", flush=True)

    def measure_ceiling(when):
        measure("(a)", f"fp32 channels_last, default allocator ({when})")

    work = tempfile.mkdtemp(prefix="bench_train-")
    try:
        if args.data:
            labels, images = os.path.join(args.data, "labels.txt"), os.path.join(args.data, "images")
        else:
            labels, images = make_set(os.path.join(work, "data"), args.n, args.data_seed)
        paths = sorted(os.path.join(images, f) for f in os.listdir(images))
        n = len(paths)

        measure_ceiling("first")
        measure("(n)", "fp32 NCHW, default allocator", channels_last=False)
        ceiling_bf16 = None
        if not args.no_amp:
            measure("(a')", "bf16 autocast channels_last, default allocator", amp=True)
            ceiling_bf16 = ceilings["(a')"][0]

        label_b = "(b) usual loop" if usual_epochs == args.epochs else \
            f"(b) usual loop, EXTRAPOLATED from {usual_epochs} of {args.epochs} epochs"
        print(f"{label_b} ...", flush=True)
        b = usual_loop(labels, images, args, usual_epochs)
        loads["b"] = os.getloadavg()[0]
        if usual_epochs != args.epochs:
            per_epoch = sum(b["epoch_times"]) / usual_epochs
            b["cpu"] *= (b["setup"] + per_epoch * args.epochs) / b["wall"]  # roughly: same share per epoch
            b["wall"] = b["setup"] + per_epoch * args.epochs
            b["forwards"] = b["forwards"] // usual_epochs * args.epochs
        measure_ceiling("between")
        print("(c) train.main, cold cache ...", flush=True)
        c = project_path(labels, images, args, os.path.join(work, "c"), os.path.join(work, "cache"))
        loads["c"] = os.getloadavg()[0]
        print("(c') train.main, warm cache, --lr 3e-4 ...", flush=True)
        c_warm = project_path(labels, images, args, os.path.join(work, "c_warm"), os.path.join(work, "cache"),
                              ["--lr", "3e-4"])
        loads["c'"] = os.getloadavg()[0]
        print("(d) train.main, the default command (cross-validation, report), cold cache ...", flush=True)
        d = project_path(labels, images, args, os.path.join(work, "d"), os.path.join(work, "cache_d"),
                         default_command=True)
        loads["d"] = os.getloadavg()[0]
        c_amp = None
        if not args.no_amp:
            print("(c'') train.main --amp, cold cache ...", flush=True)
            c_amp = project_path(labels, images, args, os.path.join(work, "c_amp"), os.path.join(work, "cache_amp"),
                                 ["--amp", "on"])
            loads["c''"] = os.getloadavg()[0]
        floor = None
        if args.noise_seeds:
            print(f"mAP noise floor: {args.noise_seeds} data-order seeds on the warm cache ...", flush=True)
            floor = noise_floor(labels, images, args, os.path.join(work, "cache"),
                                [args.seed] + [1000 + i for i in range(args.noise_seeds - 1)])
            print(f"    | seed {args.seed} (= (c)'s order): {floor[0]:.4f}; others "
                  f"{' '.join(f'{m:.3f}' for m in floor[1:])}", flush=True)

        kept = "(freed memory kept for reuse)" in c["log"].splitlines()[0]
        memory = "freed memory kept" if kept else "default allocator (train.py did not keep freed memory)"
        measure("(a*)", f"fp32 channels_last, {memory}")
        measure("(n*)", f"fp32 NCHW, {memory}", channels_last=False)
        measure("(f*)", f"fp32 channels_last, BatchNorm folded, {memory}", fold=True)
        ceiling = max(ceilings["(a)"] + ceilings["(a*)"])

        sweep_table = sweep(paths, args, ceiling) if args.sweep else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    image_epochs = n * args.epochs

    def pct(rate, of=None):
        return fmt(100 * rate / (of or ceiling), ".0f") + "%"

    def map_cell(maps, best_epoch=None):
        best = int(np.argmax(maps)) + 1 if best_epoch is None else best_epoch
        return f"{maps[-1]:.4f} (best {max(maps):.4f} @{best})"

    b_rate = b["forwards"] / (b["wall"] - b["setup"])  # train + val forwards per second of epoch time
    forward_rows = [
        ("(a)", "(a) ceiling: backbone forward, fp32 channels_last (first / between)"),
        ("(n)", "(n) backbone forward, fp32 NCHW (the layout of (b))"),
        ("(a')", "(a') backbone forward, bf16 autocast channels_last"),
        ("(a*)", "(a*) ceiling, after train.main: freed memory kept"),
        ("(n*)", "(n*) backbone forward, fp32 NCHW, freed memory kept"),
        ("(f*)", "(f*) backbone, BatchNorm folded, channels_last, freed memory kept"),
    ]
    rows = [[label, fmt(args.ceiling_seconds, ".0f"), "-", " / ".join(f"{r:.2f}" for r in ceilings[key]), "-", "-",
             "-", "-", pct(max(ceilings[key])), " / ".join(f"{x:.1f}" for x in loads[key])]
            for key, label in forward_rows if key in ceilings]
    rows.append([label_b + " (NCHW fp32)", fmt(b["wall"]), fmt(b["cpu"]), fmt(image_epochs / b["wall"], ".2f"),
                 map_cell(b["maps"]), "-", "1.00x", "1.00x", pct(b_rate) + " (loop fwd)", f"{loads['b']:.1f}"])

    def c_row(name, key, r, ceiling_for=None):
        extraction = "cached" if not r["forwards"] else pct(r["forwards"] / r["extract_s"], ceiling_for)
        return [name, fmt(r["wall"]), fmt(r["cpu"]), fmt(image_epochs / r["wall"], ".2f"),
                map_cell(r["maps"], r["best_epoch"]), f"{r['map_last'] - b['maps'][-1]:+.4f}",
                f"{b['wall'] / r['wall']:.2f}x", f"{b['cpu'] / r['cpu']:.2f}x", extraction,
                f"{loads[key]:.1f}"]

    rows.append(c_row("(c) train.main, cold cache", "c", c))
    rows.append(c_row("(c') train.main, warm cache (--lr 3e-4)", "c'", c_warm))
    rows.append(c_row("(d) the default command, cold cache (oof mAP)", "d", d))
    if c_amp:
        rows.append(c_row("(c'') train.main --amp, cold cache", "c''", c_amp))
    headers = ["path", "wall s", "cpu s", "images/s", "val mAP last (best @epoch)", "dmAP last vs (b)",
               "(b)/path wall", "(b)/path cpu", "extraction % ceil", "load"]
    print()
    print("\n".join(machine_lines()))
    print(f"setup     {n} images ({b['n_train']} train, {b['n_val']} val), {args.epochs} epochs, batch "
          f"{args.batch_size}, {args.image_size}px, {args.backbone} --weights {args.weights}, {args.num_workers} "
          f"workers, seed {args.seed}")
    print(table(headers, rows, ["<"] + [">"] * (len(headers) - 1)))
    print("images/s: images x epochs / wall for (b) and (c); forward images/s for the forward rows ((a): first / "
          "between (b) and (c)); % ceiling: of the highest (a) or (a*).")
    print("extraction % ceil: forwards (image views: 2 per training image, 1 per validation image) / extraction "
          "time, both from train.py's log, / ceiling; for (b) its in-loop forward rate (train + val images per epoch "
          "/ epoch time).")
    print("cpu s: CPU time of this process and its DataLoader workers during the run; its ratio is the better "
          "guide when the load column shows other work.")
    print(f"load: 1-minute load average at the end of the row's measurement; this benchmark alone makes about "
          f"{torch.get_num_threads()} ({os.cpu_count()} cores): well above that, other work slowed the row.")

    print("\nwhere (c) spends its wall time")
    bd = breakdown_rows("(c)", c) + breakdown_rows("(c')", c_warm) + breakdown_rows("(d)", d) + \
        (breakdown_rows("(c'')", c_amp) if c_amp else [])
    print(table(["run", "part", "seconds", "share"], bd))

    if floor is not None:
        pairs = np.abs(floor[:, None] - floor[None, :])[np.triu_indices(len(floor), 1)]
        print(f"\nmAP noise floor: last-epoch val mAP of the same head training on the same features, "
              f"{len(floor)} data-order seeds")
        print(table(["", "value"], [
            ["seed of (c) re-done here (should equal (c)'s last mAP)", f"{floor[0]:.4f} (c: {c['map_last']:.4f})"],
            ["mean +- std over seeds", f"{floor.mean():.4f} +- {floor.std(ddof=1):.4f}"],
            ["min .. max", f"{floor.min():.4f} .. {floor.max():.4f}"],
            ["median |difference| of two seeds", f"{np.median(pairs):.4f}"],
            ["share of seed pairs within 0.01", f"{100 * np.mean(pairs <= 0.01):.0f}%"],
            ["(b) last mAP, in std from the seed mean",
             fmt((b["maps"][-1] - floor.mean()) / floor.std(ddof=1), "+.2f") if floor.std() > 0 else "-"],
        ], ["<", ">"]))

    speedup = b["wall"] / c["wall"]
    extraction_rate = c["forwards"] / c["extract_s"]
    print("\ntargets")
    checks = [
        (f"training {args.epochs} epochs >= 8x faster than the usual loop", f"{speedup:.2f}x wall "
         f"({b['cpu'] / c['cpu']:.2f}x cpu)", speedup >= 8),
        ("validation mAP (last epoch) within 0.01 of the usual loop", f"{c['map_last'] - b['maps'][-1]:+.4f}",
         abs(c["map_last"] - b["maps"][-1]) <= 0.01),
        ("feature extraction >= 85% of the forward ceiling", pct(extraction_rate), extraction_rate >= 0.85 * ceiling),
        (f"the default command (cross-validation x {train.REPEATS}, report) >= 10x faster than the usual loop",
         f"{b['wall'] / d['wall']:.2f}x wall ({b['cpu'] / d['cpu']:.2f}x cpu)", b["wall"] / d["wall"] >= 10),
        ("the default command's work after the last forward of extraction <= 15% of its run",
         f"{d['after_extraction']:.1f}s of {d['wall']:.1f}s = {100 * d['after_extraction'] / d['wall']:.1f}%",
         d["after_extraction"] <= 0.15 * d["wall"]),
    ]
    for what, value, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {what}: {value}")
    if "(n*)" in ceilings:
        # What (b) would take if it kept freed memory too: its epochs sped up by the NCHW forward's gain.
        gain = max(ceilings["(n*)"]) / max(ceilings["(n)"])
        b_kept = b["setup"] + (b["wall"] - b["setup"]) / gain
        print(f"  info  the usual loop with freed memory kept too (estimated, epochs x (n)/(n*) = 1/{gain:.2f}): "
              f"{b_kept:.1f}s, {b_kept / c['wall']:.2f}x the wall time of (c)")
        print(f"  info  extraction {extraction_rate:.2f} forwards/s = {100 * extraction_rate / max(ceilings['(f*)']):.0f}% "
              f"of the folded forward (f*) it runs")
    if c_amp:
        amp_rate = c_amp["forwards"] / c_amp["extract_s"]
        print(f"  info  --amp: extraction {amp_rate:.2f} vs {extraction_rate:.2f} forwards/s fp32 "
              f"({amp_rate / extraction_rate:.2f}x; bf16 ceiling {ceiling_bf16:.2f} = "
              f"{ceiling_bf16 / ceiling:.2f}x fp32), wall {c_amp['wall']:.1f}s vs {c['wall']:.1f}s, "
              f"mAP last {c_amp['map_last']:.4f} vs {c['map_last']:.4f} ({c_amp['map_last'] - c['map_last']:+.4f})")
    if sweep_table:
        print(f"\nextraction settings ({min(args.sweep_n, n)} images x 2 views each; % of the ceiling above)")
        print(sweep_table)
    print(f"\ntotal benchmark time {time.perf_counter() - total_started:.0f}s; load avg at the end {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

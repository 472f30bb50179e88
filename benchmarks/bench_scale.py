"""Large label sets: time and peak memory of each stage before the model, at iMaterialist (1M x 228) and
DeepFashion (289k x 1,000) sizes, for the code as it is and, where cheap, as it was (commit BEFORE); and the
formats read through pandas: a 1M x 228 csv and an Open Images-like long file (1M images, ~9 labels each, 600
attributes: 9M rows); and after extraction, the cross-validation and the final head on synthetic cached features.

    python benchmarks/bench_scale.py                        # 10k..1M x 4, 228, 1,000 (minutes; 1M rows last)
    python benchmarks/bench_scale.py --sizes 10000x228 100000x228 --before   # also today's code at those sizes
    python benchmarks/bench_scale.py --sizes --no-figures --csv 1000000x228 --long 1000000x600x10   # the formats
    python benchmarks/bench_scale.py --sizes --no-figures --csv --long --cv 100000x228   # after extraction

Synthetic labels: K attributes with positive rates 0.5 / k^0.9 (floor 0.07%, iMaterialist's long tail), 10% NA,
written once into --work (kept between runs), with a folder of hard links to one small JPEG for the end-to-end
stage. Each stage runs in a fresh process and reports its own peak resident memory (ru_maxrss), imports included,
so stages do not pollute each other.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

STARTED = time.time()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

BEFORE = "adff766"  # the last commit with the list-based parser and the float64 refinement
SIZES = ["10000x4", "10000x228", "100000x228", "1000000x4", "10000x1000", "100000x1000", "289000x1000",
         "1000000x228"]
QUOTED = {  # the issue's measurements of the code before (same machine class), where re-running costs too much
    (1_000_000, 228): "before: about 180 s, 12.9 GB peak (issue 14)",
    (289_000, 1000): "before: about 6 min, 15.5 GB (issue 14)",
}


def synthetic_targets(n, k, seed=0, na=0.1):
    rng = np.random.default_rng(seed)
    rate = np.clip(0.5 / np.arange(1, k + 1) ** 0.9, 0.0007, 0.5).astype(np.float32)
    t = np.empty((n, k), dtype=np.int8)
    for s in range(0, n, 50_000):  # in blocks: a float32 (1M, 1,000) draw alone would take 4 GB
        r = rng.random((min(n - s, 50_000), k), dtype=np.float32)
        t[s:s + len(r)] = r < rate
        t[s:s + len(r)][rng.random(r.shape, dtype=np.float32) < na] = -1
    return t


def write_labels_file(path, t):
    cells = np.array([b"NA", b"0", b"1"])
    with open(path + ".tmp", "wb") as f:
        for s in range(0, len(t), 20_000):
            f.write(b"".join(b"img_%07d.jpg " % (s + i) + b" ".join(cells[row + 1]) + b"\n"
                             for i, row in enumerate(t[s:s + 20_000])))
    os.replace(path + ".tmp", path)


def write_csv_file(path, t):
    """The targets as a spreadsheet writes them: a header, `image,Attr1,..`, NA as an empty cell."""
    cells = np.array([b"", b"0", b"1"])
    with open(path + ".tmp", "wb") as f:
        f.write(b"image," + b",".join(b"Attr%d" % (j + 1) for j in range(t.shape[1])) + b"\n")
        for s in range(0, len(t), 20_000):
            f.write(b"".join(b"img_%07d.jpg," % (s + i) + b",".join(cells[row + 1]) + b"\n"
                             for i, row in enumerate(t[s:s + 20_000])))
    os.replace(path + ".tmp", path)


def prepare_csv(work, n, k):
    labels = os.path.join(work, f"labels_{n}x{k}.csv")
    if not os.path.exists(labels):
        write_csv_file(labels, synthetic_targets(n, k))
    return labels


def prepare_long(work, n, k, per, seed=0):
    """Open Images' human-verified labels, in shape: ImageID,Source,LabelName,Confidence, per (image, label) one
    row, `per` labels drawn an image on average (with the long tail of synthetic_targets; a pair drawn twice is one
    row), 70% verified present."""
    labels = os.path.join(work, f"labels_long_{n}x{k}x{per}.csv")
    if not os.path.exists(labels):
        rng = np.random.default_rng(seed)
        weight = np.clip(0.5 / np.arange(1, k + 1) ** 0.9, 0.0007, 0.5)
        weight /= weight.sum()
        with open(labels + ".tmp", "wb") as f:
            f.write(b"ImageID,Source,LabelName,Confidence\n")
            for s in range(0, n, 50_000):
                m = min(n - s, 50_000)
                count = rng.integers(per - 4, per + 5, m)  # per on average
                image = np.repeat(np.arange(s, s + m), count)
                label = rng.choice(k, len(image), p=weight)
                key = np.unique(image.astype(np.int64) * k + label)  # one row per pair, images in order
                value = (rng.random(len(key)) < 0.7).astype(np.int64)
                f.write(b"".join(b"img_%07d.jpg,verification,/m/%05d,%d\n" % (i, j, v)
                                 for i, j, v in zip((key // k).tolist(), (key % k).tolist(), value.tolist())))
        os.replace(labels + ".tmp", labels)
    return labels


def prepare(work, n, k, images_only=False):
    """labels_{n}x{k}.txt, its targets as .npy, and images/ with at least n hard links to one JPEG."""
    labels = os.path.join(work, f"labels_{n}x{k}.txt")
    if not images_only and not os.path.exists(labels):
        t = synthetic_targets(n, k)
        np.save(labels + ".npy", t)
        write_labels_file(labels, t)
    images = os.path.join(work, "images")
    os.makedirs(images, exist_ok=True)
    have = len(os.listdir(images))
    for i in range(have, n):
        one = os.path.join(work, f"one_{i // 60_000}.jpg")  # ext4 allows 65,000 links to one file
        if not os.path.exists(one):
            from PIL import Image
            Image.new("RGB", (64, 64), (120, 60, 30)).save(one)
        os.link(one, os.path.join(images, f"img_{i:07d}.jpg"))
    return labels, images


def before_modules(work):
    """dataset.py and data_loader.py of commit BEFORE, importable as before_dataset / before_data_loader."""
    folder = os.path.join(work, "before")
    os.makedirs(folder, exist_ok=True)
    for name in ("dataset", "data_loader"):
        path = os.path.join(folder, f"before_{name}.py")
        if not os.path.exists(path):
            text = subprocess.run(["git", "show", f"{BEFORE}:{name}.py"], cwd=ROOT, check=True, capture_output=True,
                                  text=True).stdout
            with open(path, "w") as f:
                f.write(text.replace("from dataset import", "from before_dataset import"))
    sys.path.insert(0, folder)


def worst_deviation(t, val):
    """Worst label's relative deviation of its val count from its share (share x total), and in rows."""
    from data_loader import label_counts_of

    total, in_val = label_counts_of(t), label_counts_of(t[val])
    share = len(val) / len(t)
    off = np.abs(in_val - share * total)[total > 0]
    return float((off / (share * total[total > 0])).max()), float(off.max())


# ---- the stages, each run in a child process ----

def stage_start_to_first_image(a, before):
    """train.py's setup up to the first image read: parse, existence check, split, pos_weight, counts."""
    from utils import Report
    report = Report(stream=open(os.devnull, "w"))
    if before:
        before_modules(a.work)
        import before_data_loader
        import before_dataset
        from loss import pos_weights
        from utils import keep_freed_memory
        import torch
        keep_freed_memory(torch.device("cpu"))  # as train.setup did: before the labels
        table, paths, targets = before_dataset.load_dataset(a.labels, a.images, report)
        train_idx, val_idx = before_data_loader.split_indices(targets, 0.2, 0)
        pos_weights(targets[train_idx])
        before_dataset.label_counts(targets)
        before_dataset.load_image(paths[train_idx[0]])
    else:
        import train
        from dataset import load_image
        args = train.parse_args(["--labels", a.labels, "--images", a.images])
        table, paths, targets, train_idx, val_idx, *_ = train.load_data(args, report)
        load_image(paths[train_idx[0]])
    return {"seconds": time.time() - STARTED, "cpu": time.process_time()}


def stage_parse(a, before):
    if before:
        before_modules(a.work)
        from before_dataset import parse_labels
    else:
        from dataset import parse_labels
    started, cpu = time.time(), time.process_time()
    table = parse_labels(a.labels)
    note = {"note": table.format.describe()} if getattr(table, "format", None) else {}
    return {"seconds": time.time() - started, "cpu": time.process_time() - cpu, **note}


def stage_split(a, before):
    import torch
    t = np.load(a.labels + ".npy")
    if before:
        before_modules(a.work)
        from before_data_loader import split_indices
        targets = torch.from_numpy(t.astype(np.int64))  # what the parser gave it
    else:
        from data_loader import split_indices
        targets = torch.from_numpy(t)
    started, cpu = time.time(), time.process_time()
    _, val = split_indices(targets, 0.2, 0)
    seconds, cpu = time.time() - started, time.process_time() - cpu
    relative, rows = worst_deviation(t, val)
    return {"seconds": seconds, "cpu": cpu, "note": f"worst label {100 * relative:.2f}% ({rows:.1f} rows) off"}


def validation_scores(n, k):
    t = synthetic_targets(n, k, seed=1)
    scores = np.random.default_rng(2).standard_normal((n, k), dtype=np.float32)
    scores += 1.5 * (t == 1)  # in place: the scores are the one big array a real run holds here too
    np.negative(scores, out=scores)
    np.exp(scores, out=scores)
    scores += 1
    return np.reciprocal(scores, out=scores), t


def stage_metrics(a, before):
    from metrics import attribute_metrics, macro_f1
    scores, y = validation_scores(a.n, a.k)
    attributes = [f"Attr{i + 1}" for i in range(a.k)]
    started, cpu = time.time(), time.process_time()
    result = attribute_metrics(scores, y, None, attributes)
    macro_f1(scores, y, [0.5] * a.k)
    return {"seconds": time.time() - started, "cpu": time.process_time() - cpu, "note": f"mAP {result['map']:.3f}"}


def stage_figure(a, before):
    from figures import metrics_figure, save_figure
    scores, y = validation_scores(a.n, a.k)
    attributes = [f"Attr{i + 1}" for i in range(a.k)]
    rng = np.random.default_rng(3)
    history = [{"epoch": e + 1, "map": 0.5 + e / 100, "ap": (0.4 + 0.5 * rng.random(a.k)).tolist()} for e in range(30)]
    started, cpu = time.time(), time.process_time()
    save_figure(metrics_figure(history, scores, y, [0.5] * a.k, attributes), os.path.join(a.work, "metrics.png"))
    return {"seconds": time.time() - started, "cpu": time.process_time() - cpu}


def cv_features(work, n, dim, seed=0):
    """A (n, 2, dim) float32 file shaped like the feature cache's data file (view 0, its mirror), memory-mapped as
    train.py maps the cache: random normal features, written once into work."""
    path = os.path.join(work, f"features_{n}x2x{dim}.f32")
    if not os.path.exists(path):
        rng = np.random.default_rng(seed)
        out = np.memmap(path + ".tmp", dtype=np.float32, mode="w+", shape=(n, 2, dim))
        for s in range(0, n, 20_000):
            out[s:s + 20_000] = rng.standard_normal((min(n - s, 20_000), 2, dim), dtype=np.float32)
        out.flush()
        del out
        os.replace(path + ".tmp", path)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n, 2, dim))


def stage_cross_validation(a, before):
    """After extraction, on cached features: train.py's cross-validation (engine.out_of_fold, its defaults but
    --epochs and --batch-size), the epoch rule, verdicts, calibration and thresholds (finish_out_of_fold), then the
    final head on every row for the chosen epochs, as train.fit trains it. Targets follow one feature each (attribute
    j: feature j of view 0 above its prevalence's quantile, with 10% noise), so there is something to learn."""
    import torch

    import engine
    import train
    from data_loader import FeatureBatches
    from model import build_head, set_dropout_generator
    from utils import keep_freed_memory, small_matmuls

    import metrics

    keep_freed_memory(torch.device("cpu"))
    metrics.RESAMPLES = a.cv_resamples  # judge's bootstrap of AP - prevalence: O(resamples x rows x attributes)
    dim, n, k = a.dim, a.n, a.k
    features = cv_features(a.work, n, dim)
    y = synthetic_targets(n, k)
    # Attribute j is positive where feature j (a standard normal) is above its (1 - rate) quantile, rate its share
    # of positives in synthetic_targets; 10% of those cells flipped; NA kept. In blocks of rows, as the rest.
    rate = np.clip(((y == 1).sum(0) / np.maximum((y >= 0).sum(0), 1)), 1e-4, 0.5)
    cut = np.array([statistics.NormalDist().inv_cdf(1 - r) for r in rate], dtype=np.float32)
    columns, rng = np.arange(k) % dim, np.random.default_rng(4)
    for s in range(0, n, 20_000):
        block = y[s:s + 20_000]
        positive = (np.asarray(features[s:s + 20_000, 0])[:, columns] > cut) ^ (rng.random(block.shape) < 0.1 * rate)
        block[:] = np.where(block >= 0, positive, -1)
    targets = torch.from_numpy(y)
    args = train.parse_args(["--epochs", str(a.cv_epochs), "--batch-size", str(a.cv_batch)])
    index = rows = np.arange(n)

    def batches(idx, shuffle, seed):
        return FeatureBatches(features, rows, idx, targets, batch_size=args.batch_size, shuffle=shuffle, seed=seed,
                              both_views=args.tta and not shuffle)

    peaks, times, started = {}, {}, time.time()

    def mark(name):
        times[name] = time.time() - sum(times.values()) - started
        peaks[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

    state = engine.start_out_of_fold(y, folds=args.folds, repeats=args.repeats, epochs=args.epochs, seed=0)
    with small_matmuls():
        assert engine.out_of_fold(batches, index, targets, args=args, feature_dim=dim, device=torch.device("cpu"),
                                  state=state)
        mark("cv")
        held = sum(t.numel() * t.element_size() for t in state.arrays()) / 1e9
        cv = engine.finish_out_of_fold(state, index, targets, attributes=[f"Attr{j + 1}" for j in range(k)],
                                       thresholds=args.thresholds, rule=args.epoch_rule)
        del state
        mark("judge")
        torch.manual_seed(args.seed)
        head = build_head(args.head, dim, k, hidden=args.hidden, dropout=args.dropout)
        set_dropout_generator(head, torch.Generator().manual_seed(args.seed))
        train_batches = batches(index, True, args.seed)
        optimizer = engine.make_optimizer(head, args)
        lr_at = engine.schedule(args, steps_per_epoch=len(train_batches), epochs=cv.epochs)
        loss_fn = engine.make_loss_for(args, targets)
        head.train()
        for epoch in range(cv.epochs):
            train_batches.set_epoch(epoch)
            engine.train_one_epoch(head, train_batches, loss_fn=loss_fn, optimizer=optimizer, lr_at=lr_at,
                                   first_step=epoch * len(train_batches), device=torch.device("cpu"), label=None)
        mark("final")
    heads = args.repeats * args.folds
    return {"seconds": time.time() - started, "cpu": time.process_time(),
            "note": f"cv {heads} heads x {args.epochs} epochs (batch {args.batch_size}) {times['cv']:.0f} s, peak "
                    f"{peaks['cv']:.2f} GB, its state {held:.2f} GB; rule + verdicts {times['judge']:.0f} s, "
                    f"{peaks['judge']:.2f} GB ({a.cv_resamples} resamples); final head {cv.epochs} epochs "
                    f"{times['final']:.0f} s; "
                    f"features {features.nbytes / 1e9:.2f} GB (D {dim}); mAP {cv.history[cv.epochs - 1]['map']:.3f}"}


def stage_import(a, before):
    import train  # noqa: F401
    return {"seconds": time.time() - STARTED, "cpu": time.process_time()}


STAGES = {"import train": stage_import, "start to first image": stage_start_to_first_image, "parse": stage_parse,
          "split": stage_split,
          "per-epoch metrics": stage_metrics, "metrics.png": stage_figure,
          "cross-validation + final head": stage_cross_validation}


def child(a):
    result = STAGES[a.stage](a, a.before)
    result["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    print(json.dumps(result))


def run_stage(a, stage, n, k, before=False, labels="", images=""):
    command = [sys.executable, os.path.abspath(__file__), "--child", "--stage", stage, "--n", str(n), "--k", str(k),
               "--work", a.work, "--labels", labels, "--images", images, "--dim", str(a.dim),
               "--cv-epochs", str(a.cv_epochs), "--cv-batch", str(a.cv_batch), "--cv-resamples", str(a.cv_resamples)]
    command += ["--before"] if before else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=a.timeout)
    if done.returncode:
        return {"seconds": None, "peak_gb": None, "note": done.stderr.strip().splitlines()[-1][:80]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="*", default=SIZES, help="NxK, e.g. 1000000x228; none: only the metrics rows")
    p.add_argument("--before", action="store_true", help=f"also run the code of {BEFORE} (up to --before-max rows)")
    p.add_argument("--before-max", type=int, default=100_000)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_scale"),
                   help="generated files (GBs at 1M rows), kept between runs")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--stages", nargs="+", default=["start to first image", "parse", "split"],
                   help="of the label stages: 'start to first image' parse split")
    p.add_argument("--no-figures", action="store_true", help="skip the metrics rows (200k and 1M x 228)")
    p.add_argument("--csv", nargs="*", default=["1000000x228"], metavar="NxK",
                   help="csv files (header, empty cells NA) to parse; none: skip")
    p.add_argument("--long", nargs="*", default=["1000000x600x10"], metavar="NxKxL",
                   help="long files (N images, K attributes, L label draws an image, a pair drawn twice one row) to "
                        "parse; none: skip")
    p.add_argument("--format-stages", nargs="+", default=["parse"],
                   help="of the label stages, those run on the --csv and --long files")
    p.add_argument("--cv", nargs="*", default=["100000x228"], metavar="NxK",
                   help="the cross-validation and the final head on synthetic cached features; none: skip")
    p.add_argument("--dim", type=int, default=1280, help="--cv: the features' width (1280: efficientnet_lite0's)")
    p.add_argument("--cv-epochs", type=int, default=2, help="--cv: train.py's --epochs (its default is 30)")
    p.add_argument("--cv-batch", type=int, default=256, help="--cv: train.py's --batch-size (its default is 32)")
    p.add_argument("--cv-resamples", type=int, default=1000,
                   help="--cv: the verdicts' bootstrap resamples (metrics.RESAMPLES, 1000; the time is linear in them)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--labels", help=argparse.SUPPRESS)
    p.add_argument("--images", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    from common import cpu_model, fmt, table

    os.makedirs(a.work, exist_ok=True)
    rows = []

    def add(stage, n, k, labels="", images="", label=None):
        now = run_stage(a, stage, n, k, labels=labels, images=images)
        old = run_stage(a, stage, n, k, True, labels, images) if a.before and n <= a.before_max and \
            stage in ("start to first image", "parse", "split") else {}
        note = now.get("note", "") + "; "
        if old:
            note += f"before: {fmt(old['seconds'], '.1f')} s ({fmt(old.get('cpu'), '.1f')} cpu s), " \
                    f"{fmt(old['peak_gb'], '.2f')} GB" \
                    f"{', ' + old['note'] if old.get('note') else ''}"
        elif (n, k) in QUOTED and stage == "start to first image":
            note += QUOTED[(n, k)]
        rows.append([label or stage, f"{n:,} x {k:,}", fmt(now["seconds"], ".1f"), fmt(now.get("cpu"), ".1f"),
                     fmt(now["peak_gb"], ".2f"), note.strip("; ")])
        print("  ".join(rows[-1]), flush=True)

    print(f"{cpu_model()}, {os.cpu_count()} cores; peak = the stage's process, imports included "
          f"(import train alone: {run_stage(a, 'import train', 0, 0)['peak_gb']:.2f} GB)", flush=True)
    for size in a.sizes:
        n, k = map(int, size.split("x"))
        labels, images = prepare(a.work, n, k)
        for stage in a.stages:
            add(stage, n, k, labels, images)
    for size in a.csv:
        n, k = map(int, size.split("x"))
        labels = prepare_csv(a.work, n, k)
        images = prepare(a.work, n, 0, images_only=True)[1] if "start to first image" in a.format_stages else ""
        for stage in a.format_stages:
            add(stage, n, k, labels, images, label=f"{stage} (csv)")
    for size in a.long:
        n, k, per = map(int, size.split("x"))
        labels = prepare_long(a.work, n, k, per)
        images = prepare(a.work, n, 0, images_only=True)[1] if "start to first image" in a.format_stages else ""
        with open(labels, "rb") as f:
            pairs = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b"")) - 1
        for stage in a.format_stages:
            add(stage, n, k, labels, images, label=f"{stage} (long, {pairs:,} rows)")
    for size in a.cv:
        n, k = map(int, size.split("x"))
        add("cross-validation + final head", n, k)
    if not a.no_figures:
        add("per-epoch metrics", 200_000, 228)
        add("metrics.png", 200_000, 228)
        add("metrics.png", 1_000_000, 228)
    print()
    print(table(["stage", "N x K", "wall s", "cpu s", "peak GB", "notes"], rows, ["<", ">", ">", ">", ">", "<"]))


if __name__ == "__main__":
    main()

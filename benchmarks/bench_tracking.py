"""What --log costs a cached run: train.py's defaults with --log none, tensorboard and mlflow, side by side.

    python benchmarks/bench_tracking.py               # the shipped sample (300 images), 5 rounds
    python benchmarks/bench_tracking.py --rounds 9 --image-size 224 --weights imagenet

Each round runs train.py (in this process, train.main) once per --log, in turn, on the same warm feature cache
(extracted before the first round), with the defaults otherwise: 2 x 5-fold cross-validation of 30 epochs, then
the final head. Timed per run: the whole of train.main, and the time inside tracking.py split into start (the
tracker's store opened, the run created; the warm-up's first run also imports the tracker), epochs (RunLog.epoch,
cross_validation and flush: what the cached path's loop waits for) and end (figures, artifacts, final numbers,
close). MLflow logs to its local default store in a temporary working folder (the warm-up's run creates its SQLite
tables); TensorBoard to the run's folder. The medians of the rounds are printed.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

from common import ROOT, machine_lines, table

import tracking  # noqa: E402
import train  # noqa: E402

LOGS = ("none", "tensorboard", "mlflow")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--labels", default=os.path.join(ROOT, "labels.txt"))
    p.add_argument("--images", default=os.path.join(ROOT, "images"))
    p.add_argument("--backbone", default="mobilenet_v3_large")
    p.add_argument("--weights", default="none")
    p.add_argument("--image-size", default="64")
    p.add_argument("--rounds", type=int, default=5)
    return p.parse_args(argv)


class Clock:
    """Seconds spent in the wrapped functions, per part, since the last reset."""

    def __init__(self):
        self.parts, self.depth = {}, 0

    def wrap(self, owner, name, part):
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            self.depth += 1
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.depth -= 1
                if not self.depth:  # the outermost call alone: epoch() may call flush()
                    self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)


def main(argv=None):
    args = parse_args(argv)
    clock = Clock()
    clock.wrap(tracking, "start", "start")
    clock.wrap(tracking.RunLog, "epoch", "epochs")
    clock.wrap(tracking.RunLog, "cross_validation", "epochs")
    clock.wrap(tracking.RunLog, "flush", "epochs")
    clock.wrap(tracking.RunLog, "end", "end")
    work = tempfile.mkdtemp(prefix="bench_tracking_")
    os.chdir(work)  # MLflow's local default store (mlflow.db, mlruns/) and TensorBoard's runs/ go here
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    common = ["--labels", args.labels, "--images", args.images, "--backbone", args.backbone, "--weights",
              args.weights, "--image-size", args.image_size, "--num-workers", "0", "--no-report",
              "--cache-dir", os.path.join(work, "cache"), "--run-dir", os.path.join(work, "runs")]
    times, cold = {log: [] for log in LOGS}, {}
    for round_ in range(args.rounds + 1):  # round 0: the warm-up (extraction, the SQLite store's tables)
        for log in LOGS:
            clock.parts = {}
            started = time.perf_counter()
            stdout = sys.stdout
            sys.stdout = open(os.devnull, "w")
            try:
                code = train.main(common + ["--log", log])
            finally:
                sys.stdout.close()
                sys.stdout = stdout
            assert code == 0, f"train.py --log {log} ended with {code}"
            cold.setdefault(log, clock.parts.get("start", 0.0))
            if round_:
                times[log].append((time.perf_counter() - started, clock.parts.get("start", 0.0),
                                   clock.parts.get("epochs", 0.0), clock.parts.get("end", 0.0)))
        print(f"round {round_}{' (warm-up)' if not round_ else ''} done", file=sys.stderr)
    base = statistics.median(t[0] for t in times["none"])
    rows = []
    for log in LOGS:
        total, start, epochs, end = (statistics.median(t[i] for t in times[log]) for i in range(4))
        rows.append([log, f"{total:.2f}", f"{total / base:.3f}", f"{cold[log] * 1e3:.0f}", f"{start * 1e3:.0f}",
                     f"{epochs * 1e3:.1f}", f"{end * 1e3:.0f}"])
    print("\n".join(machine_lines()))
    print(f"run       train.py defaults (2 x 5 folds, 30 epochs) on {args.labels}, {args.backbone} at "
          f"{args.image_size} px, warm cache; median of {args.rounds} rounds (in process)")
    print(table(["--log", "run s", "vs none", "first start ms", "start ms", "epochs ms", "end ms"], rows))
    print("first start: the warm-up's, with the tracker's import (and MLflow's new SQLite store); a new process "
          "pays the import every run")


if __name__ == "__main__":
    main()

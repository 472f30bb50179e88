"""review.py on real photos: a scripted reviewer fixes deliberately flipped labels through the API, then the models
trained on the clean, the flipped and the reviewed labels are scored side by side.

    python benchmarks/bench_review.py                     # ../shared/realdev, flip seeds 0 1 2 (tens of minutes)
    python benchmarks/bench_review.py --seeds 0 --work /tmp/bench_review

Per flip seed: 4% of the known cells of realdev's train part flipped (audit.flip_known, readable rows only); `python
train.py` with its defaults on the flipped labels (which writes the run's oof.npz); `python review.py` on that run;
a reviewer that answers each of the top 2 x (number flipped) queue items from the true labels through POST
/api/decisions, then GET /api/export; `python train.py` on the export (it must extract nothing new: the features are
cached). Every model is scored by `python evaluate.py` on realdev's test part. Prints one row per seed (flipped
cells fixed, other cells changed) and the test mAP and macro-F1 of each labels file.
"""
import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, machine_lines, table

import httpx  # noqa: E402
import numpy as np  # noqa: E402

import audit  # noqa: E402
from dataset import parse_labels, write_labels  # noqa: E402

RATE = 0.04  # share of the known cells flipped
TOP = 2  # the reviewer answers the top TOP x (number flipped) queue items
TARGET = 0.85  # share of the flipped cells the export must fix


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "realdev"),
                   help="folder with train/ and test/, each labels.txt + images/")
    p.add_argument("--seeds", default="0,1,2", help="flip seeds")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_review"),
                   help="folder for the labels files, runs and review databases (kept for a look afterwards)")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "bench_review_cache"),
                   help="feature cache shared by every run")
    return p.parse_args(argv)


def step(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def script(name, *args, log):
    """Run one of the project's scripts as the user does; its output goes to log; returns its stdout text."""
    started = time.time()
    done = subprocess.run([sys.executable, os.path.join(ROOT, name), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)
    with open(log, "w") as f:
        f.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}); its output is in {log}")
    return done.stdout + done.stderr, time.time() - started


def train(labels, images, out_dir, cache_dir):
    """train.py with its defaults; (its output, seconds, forwards it extracted)."""
    os.makedirs(out_dir, exist_ok=True)
    text, seconds = script("train.py", "--labels", labels, "--images", images, "--out",
                           os.path.join(out_dir, "model.pth"), "--curve", os.path.join(out_dir, "loss_curve.png"),
                           "--cache-dir", cache_dir, "--no-report", log=os.path.join(out_dir, "train.log"))
    extracted = sum(int(m) for m in re.findall(r"^extracting .* features: (\d+) forwards", text, re.M))
    return text, seconds, extracted


def evaluate(model, test):
    text, _ = script("evaluate.py", "--labels", os.path.join(test, "labels.txt"), "--images",
                     os.path.join(test, "images"), "--model", model, "--json",
                     log=os.path.join(os.path.dirname(model), "evaluate.log"))
    result = json.loads(next(line for line in reversed(text.splitlines()) if line.startswith("{")))
    return result["map"], result["macro_f1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def review_server(labels, images, model, db, cache_dir, log):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, os.path.join(ROOT, "review.py"), "--labels", labels, "--images",
                                   images, "--model", model, "--db", db, "--port", str(port), "--cache-dir",
                                   cache_dir], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 3600
            while time.time() < deadline:
                if server.poll() is not None:
                    raise SystemExit(f"review.py stopped (exit {server.returncode}); its output is in {log}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(url + "/api/state", timeout=5).status_code == 200:
                        break
                time.sleep(0.5)
            else:
                raise SystemExit(f"review.py did not answer within an hour; its output is in {log}")
            yield url
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)


def scripted_review(url, truth, names, attributes, count):
    """Answer the top `count` queue items from the true labels (truth: (n, K) of the reviewed rows, names: their
    image names); returns (items answered, seconds, the exported labels text, the state after)."""
    started, answered, row = time.time(), 0, {n: i for i, n in enumerate(names)}
    with httpx.Client(base_url=url, timeout=60) as client:
        while answered < count:
            page = client.get("/api/queue", params={"offset": answered, "limit": min(500, count - answered)}).json()
            if not page["items"]:
                break
            for item in page["items"]:
                value = {1: "1", 0: "0", -1: "NA"}[int(truth[row[item["image"]], attributes.index(item["attribute"])])]
                r = client.post("/api/decisions", json={"image": item["image"], "attribute": item["attribute"],
                                                        "value": value, "reviewer": "bench"})
                r.raise_for_status()
                answered += 1
        seconds = time.time() - started
        text = client.get("/api/export").text
        state = client.get("/api/state").json()
    return answered, seconds, text, state


def main(argv=None):
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    train_dir, test_dir = os.path.join(args.data, "train"), os.path.join(args.data, "test")
    images = os.path.join(train_dir, "images")
    os.makedirs(args.work, exist_ok=True)
    header = machine_lines()
    print("\n".join(header), flush=True)

    clean = parse_labels(os.path.join(train_dir, "labels.txt"))
    readable = np.array([os.path.isfile(os.path.join(images, n)) for n in clean.names])
    step(f"clean labels: {len(clean.names)} rows ({int(readable.sum())} with an image), "
         f"{int((clean.targets[readable] >= 0).sum())} known cells; training on them")
    _, seconds, _ = train(os.path.join(train_dir, "labels.txt"), images, os.path.join(args.work, "clean"), args.cache_dir)
    scores = {"clean": [evaluate(os.path.join(args.work, "clean", "model.pth"), test_dir)]}
    step(f"clean: trained in {seconds:.0f}s, test mAP {scores['clean'][0][0]:.4f} macro-F1 {scores['clean'][0][1]:.4f}")

    rows, scores["flipped"], scores["reviewed"] = [], [], []
    for seed in seeds:
        work = os.path.join(args.work, f"seed{seed}")
        os.makedirs(work, exist_ok=True)
        flipped_targets = clean.targets.copy()
        part, mask = audit.flip_known(clean.targets[readable], RATE, seed)
        flipped_targets[readable] = np.asarray(part)
        flipped = np.zeros(clean.targets.shape, dtype=bool)
        flipped[readable] = mask
        labels = os.path.join(work, "labels.txt")
        write_labels(labels, clean.attributes, clean.names, flipped_targets)
        n_flipped = int(flipped.sum())
        step(f"seed {seed}: {n_flipped} known cells flipped; training on the flipped labels")
        _, train_s, _ = train(labels, images, os.path.join(work, "flipped"), args.cache_dir)
        scores["flipped"].append(evaluate(os.path.join(work, "flipped", "model.pth"), test_dir))
        db = os.path.join(work, "review.sqlite")
        with contextlib.suppress(FileNotFoundError):
            for suffix in ("", "-wal", "-shm"):
                os.remove(db + suffix)
        started = time.time()
        with review_server(labels, images, os.path.join(work, "flipped", "model.pth"), db, args.cache_dir,
                           os.path.join(work, "review.log")) as url:
            open_s = time.time() - started
            keep = np.flatnonzero(readable)
            answered, review_s, text, state = scripted_review(url, clean.targets[keep], [clean.names[i] for i in keep],
                                                              clean.attributes, TOP * n_flipped)
        reviewed_path = os.path.join(work, "labels_reviewed.txt")
        with open(reviewed_path, "w") as f:
            f.write(text)
        reviewed = parse_labels(reviewed_path)
        assert reviewed.names == clean.names and reviewed.attributes == clean.attributes
        fixed = int((flipped & (reviewed.targets == clean.targets)).sum())
        others = int((~flipped & (reviewed.targets != flipped_targets)).sum())
        _, retrain_s, extracted = train(reviewed_path, images, os.path.join(work, "reviewed"), args.cache_dir)
        scores["reviewed"].append(evaluate(os.path.join(work, "reviewed", "model.pth"), test_dir))
        rows.append([str(seed), str(n_flipped), str(answered), str(fixed), f"{fixed / n_flipped:.1%}", str(others),
                     f"{open_s:.0f}", f"{answered / review_s:.0f}", str(extracted),
                     "the run's oof.npz" if "oof.npz (the run of" in state["source"] else "computed"])
        step(f"seed {seed}: fixed {fixed}/{n_flipped} ({fixed / n_flipped:.1%}), {others} other cells changed; "
             f"flipped model trained in {train_s:.0f}s, reviewed in {retrain_s:.0f}s ({extracted} forwards extracted)")

    print()
    print("\n".join(header))
    print(f"data      {args.data}: train {len(clean.names)} rows, test scored; {RATE:.0%} of the known cells flipped, "
          f"the top {TOP} x flipped queue items answered from the true labels")
    print()
    print(table(["seed", "flipped", "answered", "fixed", "fixed %", "others changed", "review.py up s",
                 "decisions/s", "forwards on reviewed", "queue from"], rows))
    fix_rates = [int(r[3]) / int(r[1]) for r in rows]
    print(f"\nfixed: mean {statistics.mean(fix_rates):.1%}, lowest {min(fix_rates):.1%} (target >= {TARGET:.0%}); "
          f"other cells changed: {sum(int(r[5]) for r in rows)}")
    print()
    out = []
    for name in ("clean", "flipped", "reviewed"):
        maps, f1s = [s[0] for s in scores[name]], [s[1] for s in scores[name]]
        spread = lambda v: f" ± {statistics.stdev(v):.4f}" if len(v) > 1 else ""  # noqa: E731
        out.append([name, str(len(maps)), f"{statistics.mean(maps):.4f}{spread(maps)}",
                    f"{statistics.mean(f1s):.4f}{spread(f1s)}", " ".join(f"{m:.4f}" for m in maps)])
    print(table(["labels", "models", "test mAP", "test macro-F1", "mAP per seed"], out))
    return 0 if min(fix_rates) >= TARGET and all(r[5] == "0" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

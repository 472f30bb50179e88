"""The audit's ranking, review.py's queue and the audit's two files on a synthetic N x K set: time and peak memory.

    python benchmarks/bench_queue.py                          # 1M x 228 (iMaterialist-Fashion's shape), a few minutes
    python benchmarks/bench_queue.py --shape 200000x228 --full --server

Synthetic out-of-fold predictions, no images, no training: targets 20% NA, 70% 0, 10% 1; uniform float32
probabilities; every tenth attribute not learnt. Each stage runs in this process; its memory is the peak resident
memory during the stage above the resident memory when it began (the kernel's high-water mark, reset by
/proc/self/clear_refs), so the inputs (targets, probabilities, scores: 13 bytes a cell) are not counted in it.
The stages: the scores (audit.label_quality), the ranking's top (what a first page needs), the whole ranking
(--full: every cell sorted), review.Queue, the first page of GET /api/queue?limit=100 through the Queue methods the
route calls (and the next page, a page of one attribute, the NA part's first page), label_audit.csv as audit.py
writes it by default (the top 100,000 of each part), labels_suggested.txt (audit.write_suggested, which reads the
labels file again for its format; the labels file is written first, untimed). --server: python review.py itself
on the set (its AuditData read from .npy files instead of oof.npz), timed from its start to its first page.
"""
import argparse
import datetime
import os
import socket
import subprocess
import sys
import tempfile
import time

from common import ROOT, cpu_model, load_average, table

import numpy as np  # noqa: E402

import audit  # noqa: E402
import review  # noqa: E402
from dataset import write_labels  # noqa: E402

PAGE = 100  # items of the first page (the page fetches 50 at a time; 100 is the API's default)
# review.py with its AuditData from the .npy files in argv[1] (no oof.npz, no images), as tests/test_review.py does
SERVER = """
import os, sys, time
import numpy as np
import audit, review
started, folder = float(sys.argv[1]), sys.argv[2]
print(f"bench: imports done at {time.time() - started:.2f} s", flush=True)
y, p, s = (np.load(os.path.join(folder, f + ".npy")) for f in ("targets", "probabilities", "score"))
learnt = np.load(os.path.join(folder, "learnt.npy"))
attributes = [f"Attr{k + 1}" for k in range(y.shape[1])]
names = [f"img_{i:07d}.jpg" for i in range(len(y))]
data = audit.AuditData(labels=os.path.join(folder, "labels.txt"), attributes=attributes, names=names,
                       paths=[""] * len(y), targets=y, probabilities=p, score=s, source="bench_queue", model=None,
                       labels_sha256="",
                       verdicts=[{"attribute": a, "learnt": bool(ok), "p_adjusted": 0.01 if ok else 0.9}
                                 for a, ok in zip(attributes, learnt)])
print(f"bench: arrays read at {time.time() - started:.2f} s", flush=True)
review.load_audit = lambda args: data
sys.exit(review.main(sys.argv[3:]))
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="1000000x228", help="rows x attributes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full", action="store_true", help="also sort every cell (the whole ranking: about a minute at "
                                                       "1M x 228)")
    p.add_argument("--server", action="store_true", help="also time python review.py from its start to its first page")
    p.add_argument("--no-suggested", action="store_true", help="skip labels_suggested.txt (the labels file written "
                                                               "first takes as long)")
    return p.parse_args(argv)


def memory_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class Stages:
    """Each stage's seconds and peak resident memory above its start."""

    def __init__(self):
        self.rows, self.peak = [], 0

    def run(self, name, function, *args, **kw):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the high-water mark back to the resident memory now
        base = memory_kb("VmRSS")
        started = time.perf_counter()
        result = function(*args, **kw)
        seconds = time.perf_counter() - started
        peak = memory_kb("VmHWM")
        self.peak = max(self.peak, peak)
        self.rows.append([name, f"{seconds:.2f}", f"{(peak - base) / 1e6:.2f}"])
        print(f"  {name}: {seconds:.2f} s", flush=True)
        return result


def synthetic(n, k, seed):
    """targets (20% NA, 70% 0, 10% 1), uniform float32 probabilities, every tenth attribute not learnt."""
    g = np.random.default_rng(seed)
    y = np.empty((n, k), dtype=np.int8)
    p = np.empty((n, k), dtype=np.float32)
    rows = max(1, (1 << 24) // k)
    for start in range(0, n, rows):
        draw = g.integers(0, 10, size=(min(rows, n - start), k), dtype=np.int8)
        y[start:start + rows] = np.where(draw < 2, -1, np.where(draw < 9, 0, 1))
        p[start:start + rows] = g.random(draw.shape, dtype=np.float32)
    learnt = np.ones(k, dtype=bool)
    learnt[::10] = False
    return y, p, learnt


def listing(queue, ledger, attribute="", kind="", offset=0, limit=PAGE):
    """What GET /api/queue answers: review.Queue.page, which its route calls."""
    return queue.page(ledger, attribute=attribute, kind=kind, offset=offset, limit=limit)


def server_first_page(folder, data):
    """Seconds from starting python review.py to its first page's answer, and the page's first item."""
    import httpx

    for name in ("targets", "probabilities", "score"):
        np.save(os.path.join(folder, name + ".npy"), getattr(data, name))
    np.save(os.path.join(folder, "learnt.npy"), data.learnt)
    env = {**os.environ, "PYTHONPATH": ROOT}
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started, wall = time.perf_counter(), time.time()
    flags = ["--labels", os.path.join(folder, "labels.txt"), "--db", os.path.join(folder, "review.sqlite"),
             "--port", str(port), "--reviewer", "bench"]
    child = subprocess.Popen([sys.executable, "-c", SERVER, str(wall), folder, *flags], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/queue?limit={PAGE}", timeout=60)
                if r.status_code == 200:
                    seconds, item = time.perf_counter() - started, r.json()["items"][0]
                    break
            except httpx.TransportError:
                if child.poll() is not None:
                    raise SystemExit("review.py stopped:\n" + child.stdout.read())
                time.sleep(0.1)
    finally:
        child.terminate()
        said = child.communicate(timeout=30)[0]
    marks = [line.split(": ", 1)[1] for line in said.splitlines() if line.startswith("bench: ")]
    return seconds, item, marks


def main(argv=None):
    args = parse_args(argv)
    n, k = map(int, args.shape.lower().split("x"))
    print(f"{n:,} x {k} cells: generating", flush=True)
    y, p, learnt = synthetic(n, k, args.seed)
    attributes = [f"Attr{j + 1}" for j in range(k)]
    names = [f"img_{i:07d}.jpg" for i in range(n)]
    stages, server = Stages(), None
    score = stages.run("scores (audit.label_quality)", audit.label_quality, p, y, learnt)
    data = audit.AuditData(labels="", attributes=attributes, names=names, paths=[""] * n, targets=y, probabilities=p,
                           score=score, source="bench_queue", model=None, labels_sha256="",
                           verdicts=[{"attribute": a, "learnt": bool(ok), "p_adjusted": 0.01 if ok else 0.9}
                                     for a, ok in zip(attributes, learnt)])
    top = stages.run(f"ranking, top {PAGE}", audit.ranking, y, p, score, learnt, top=PAGE)
    if args.full:
        whole = stages.run("ranking, every cell (sorted)", audit.ranking, y, p, score, learnt)
        assert whole[:PAGE].tolist() == top.tolist()
        del whole
    queue = stages.run("review.Queue(data)", review.Queue, data)
    with tempfile.TemporaryDirectory(prefix="bench_queue-") as folder:
        ledger = review.Ledger(os.path.join(folder, "review.sqlite"))
        first = stages.run(f"first page (limit {PAGE})", listing, queue, ledger)
        assert [it["row"] * k + it["column"] for it in first["items"]] == top.tolist()
        stages.run(f"next page (offset {PAGE})", listing, queue, ledger, offset=PAGE)
        stages.run(f"first page of Attr8 (ranks its {n:,} cells)", listing, queue, ledger, attribute="Attr8")
        stages.run("next page of Attr8 (positions counted)", listing, queue, ledger, attribute="Attr8", offset=PAGE)
        stages.run("first page of the NA part", listing, queue, ledger, kind="na")
        ledger.close()
        out = os.path.join(folder, "label_audit.csv")
        written = stages.run(f"label_audit.csv, top {audit.TOP:,} of each part", audit.write_audit_csv, out, data,
                             audit.audit_chunks(data, audit.TOP))
        size = os.path.getsize(out)
        labels = os.path.join(folder, "labels.txt")
        if not args.no_suggested or args.server:
            print("  (writing the labels file, untimed)", flush=True)
            write_labels(labels, attributes, names, y)
        data.labels = labels
        if not args.no_suggested:
            stages.run("labels_suggested.txt (audit.write_suggested)", audit.write_suggested,
                       os.path.join(folder, "labels_suggested.txt"), data, confident=audit.CONFIDENT, source=labels)
        if args.server:
            seconds, item, marks = server_first_page(folder, data)
            assert item["row"] * k + item["column"] == int(top[0])
            stages.rows.append(["python review.py: start to first page", f"{seconds:.2f}", "(its own process)"])
            server = f"python review.py: {', '.join(marks)}, first page answered at {seconds:.2f} s"
    print()
    print(f"{datetime.date.today().isoformat()}, {cpu_model()} (lscpu), {os.cpu_count()} cores, load average "
          f"{load_average()}, numpy {np.__version__}")
    print(f"{n:,} x {k} = {n * k:,} cells ({queue.counts['known']:,} known and {queue.counts['na']:,} NA cells of "
          f"the {int(learnt.sum())} attributes learnt in the queue); inputs "
          f"{(y.nbytes + p.nbytes + score.nbytes) / 1e9:.2f} GB; label_audit.csv {written:,} rows, {size / 1e6:.1f} MB")
    print(table(["stage", "seconds", "peak GB above its start"], stages.rows))
    print(f"this process's peak resident memory over the stages: {stages.peak / 1e6:.2f} GB")
    if server:
        print(server)


if __name__ == "__main__":
    main()

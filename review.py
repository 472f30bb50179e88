"""Review the labels the audit finds, in the browser: every decision a row in SQLite, a relabelled file out.

    python review.py --labels labels.txt --images images                  # http://127.0.0.1:8001/ ; Ctrl-C stops it
    python review.py --labels labels.txt --images images --reviewer ana --backbone efficientnet_lite0
    python review.py --labels labels.txt --export labels_reviewed.txt     # the labels with the decisions applied

The queue is every cell of the readable rows: the known cells most likely wrong first (audit.py's score), then
the NA cells with the most confident suggestions (audit.ranking's order). It is built on the run's out-of-fold
predictions (oof.npz beside --model) when they match these labels, else computed as audit.py does: train.py's
cross-validation, with any train.py flag given here (--backbone, --cache-dir, ...), on the same feature cache (so
seconds after a first run); that run (model.pth, oof.npz) is kept in review_run/ beside the database, where its
model draws the Grad-CAMs and the next review finds it.

Every decision is one row of review.sqlite (beside the labels file, or --db): image, attribute, value before,
value after, time, reviewer. It is acknowledged only after its transaction commits (WAL, synchronous=FULL), so
kill -9 loses nothing acknowledged; any number of pages and servers may share one database. An undo is a row too
(it names the decision it takes back), so the table only grows and the history stays whole. The labels file is
only read; --export (or the page's Export button, GET /api/export) writes a copy with the decisions applied.

The JSON API, which the page itself uses:
    GET  /api/state                                      labels, attributes, progress, whether the file changed
    GET  /api/queue?attribute=&kind=known|na&offset=&limit=   items: image, attribute, given, suggested,
                                                         probability, score, decided, ...
    POST /api/decisions  {"image", "attribute", "value": "1"|"0"|"NA", "reviewer"}  -> the stored decision
    POST /api/undo       {"reviewer", "id" (optional: else the reviewer's latest)}  -> the decision taken back
    GET  /api/export                                     the labels text with the decisions applied
    GET  /api/image/ROW, /api/gradcam/ROW/COLUMN         an item's image (by its row), its Grad-CAM for an attribute (PNG)
"""
import argparse
import contextlib
import datetime
import io
import json
import os
import re
import socket
import sqlite3
import sys
import threading
import time
from collections import Counter, OrderedDict

import numpy as np

import web
from dataset import VALUE_TEXT, add_label_flags, label_argv, label_options
from utils import Report, UserError, atomic_write, check_writable, log, run_cli
from web import Refused, error_response, read_json

HOST = "127.0.0.1"  # this machine only; reviewing from others is an explicit --host 0.0.0.0
PORT = 8001  # serve.py has 8000
DB_NAME = "review.sqlite"  # beside the labels file unless --db
SCHEMA_VERSION = 1  # PRAGMA user_version of a review database
BUSY_S = 10.0  # how long a write waits for another server's transaction on the same database
MAX_BODY = 4096  # bytes of a POST body (a decision is ~100)
MAX_LIMIT = 500  # queue items per GET /api/queue
MAX_REVIEWER = 64  # characters of a reviewer's name
CAM_CACHE = 256  # Grad-CAM pictures kept in memory (PNG bytes, ~100 KB each)
CAM_WAITING = 8  # Grad-CAMs being drawn or waiting at most; beyond it: 503 + Retry-After
CAM_SIZE = 640  # pixels on the long side of a Grad-CAM picture
RETRY_AFTER = 1  # seconds a refused client is told to wait
TEXT = VALUE_TEXT  # the targets' int8 -> a decision's value as the API, the database and the labels file write it
VALUES = {text: value for value, text in TEXT.items()}
KINDS = ("known", "na")  # the queue's two parts: known cells by score, NA cells by the suggestion's confidence
PAGE_FILES = {"/": ("review.html", "text/html; charset=utf-8"), "/review.js": ("review.js", "text/javascript"),
              "/review.css": ("review.css", "text/css")}
# No inline script or style anywhere: an injected handler or style could not run.
PAGE_POLICY = "default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp"}  # what browsers show as is; others are sent as PNG


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Review the audit's suspect labels and NA suggestions in the browser.",
        epilog="Any other flag is train.py's (python train.py --help), passed to it when the out-of-fold predictions "
               "must be computed, as audit.py does.")
    p.add_argument("--labels", default="labels.txt", help="labels file (only read)")
    p.add_argument("--images", default="images", help="images folder")
    add_label_flags(p)
    p.add_argument("--db", help=f"the review database (default: {DB_NAME} beside the labels file)")
    p.add_argument("--reviewer", help="the name recorded with each decision (default: the page asks once)")
    p.add_argument("--export", metavar="FILE", help="write the labels with the decisions applied to FILE and exit")
    p.add_argument("--model", default="model.pth",
                   help="the run's checkpoint: its oof.npz gives the queue when it matches, it draws the Grad-CAMs")
    p.add_argument("--host", default=HOST, help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=PORT, help="port to listen on (0: any free one)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args, args.train_flags = p.parse_known_args(argv)
    args.db = args.db or os.path.join(os.path.dirname(os.path.abspath(args.labels)), DB_NAME)
    return args


# ---- the queue's data ----

def load_audit(args):
    """The audit's AuditData for args.labels: the run's out-of-fold predictions (the oof.npz beside --model) when they
    match these labels and images, else computed by train.py's cross-validation (audit.audit_data)."""
    import audit

    # A run made here is kept beside the database: its model draws the Grad-CAMs, and the next review reuses it.
    return audit.audit_data(args.labels, args.images, model=args.model, train_flags=args.train_flags,
                            run_dir=os.path.splitext(args.db)[0] + "_run")


class Queue:
    """The cells of AuditData that the audit ranks, in its order (audit.ranking): the known cells of the attributes
    learnt, the most suspect first, then their NA cells. Nothing per cell is built: a list (all, one kind, one
    attribute, one attribute's kind) is a List of the ranking's flat cell indices, its top found as far as it is
    paged (a 1M x 228 queue opens in seconds), an attribute's cells ranked when first asked for."""

    def __init__(self, data):
        import audit

        self.data = data
        self.names, self.attributes = list(data.names), list(data.attributes)
        self.targets = np.asarray(data.targets, dtype=np.int8)
        self.probabilities = np.asarray(data.probabilities, dtype=np.float32)
        self.score = np.asarray(data.score, dtype=np.float64)
        self.learnt = np.asarray(data.learnt, dtype=bool).reshape(len(self.attributes))
        self.row_of = {name: i for i, name in enumerate(self.names)}
        self.column_of = {a: k for k, a in enumerate(self.attributes)}
        # Cells of an attribute the run did not learn are left out (audit.py: no suspect, no suggestion).
        self.counts = {kind: audit.part_size(self.targets, self.learnt, kind) for kind in KINDS}
        self.lock = threading.Lock()  # the lists grow as they are paged, from the server's threads
        self.parts = {}  # (column or None, kind) -> Part
        self.lists = {}  # (attribute, kind) -> List; at most (K + 1) x 3 of them

    def __len__(self):
        return sum(self.counts.values())

    def part(self, column, kind):
        key = (column, kind)
        if key not in self.parts:
            self.parts[key] = Part(self, column, kind)
        return self.parts[key]

    def select(self, attribute, kind):
        """The List of the cells of attribute (all: '') and kind (both: '')."""
        key = (attribute, kind)
        with self.lock:
            if key not in self.lists:
                column = self.column_of[attribute] if attribute else None
                # The queue's positions of a list of every attribute are known (the known part, then the NA part);
                # an attribute's are counted when its page is shown.
                self.lists[key] = List(self, [self.part(column, k) for k in ((kind,) if kind else KINDS)],
                                       ranked=column is None)
            return self.lists[key]

    def positions(self, cells):
        """The queue position of each cell (flat index i * K + k); -1 where it is not in the queue."""
        import audit

        return audit.rank_of(cells, self.targets, self.probabilities, self.score, self.learnt)

    def cell(self, i, k, ledger):
        """What the page shows of one cell: the given value, the out-of-fold probability, the suggestion, the
        score, the decision that holds (or None) and the value now."""
        given, p, name, attribute = int(self.targets[i, k]), float(self.probabilities[i, k]), self.names[i], \
            self.attributes[k]
        decided = ledger.latest(name, attribute)
        return {"image": name, "attribute": attribute, "given": TEXT[given], "suggested": TEXT[int(p >= 0.5)],
                "probability": round(p, 6), "score": None if given < 0 else round(float(self.score[i, k]), 6),
                "decided": decided, "value": decided["after"] if decided else TEXT[given]}

    def item(self, cell, position, ledger):
        """The page's item of a cell (flat index) at a queue position."""
        i, k = divmod(int(cell), len(self.attributes))
        item = {"index": int(position), "row": i, "column": k, "kind": KINDS[int(self.targets[i, k] < 0)],
                **self.cell(i, k, ledger)}
        item["others"] = [{key: c[key] for key in ("attribute", "given", "value", "probability")}
                          for c in (self.cell(i, j, ledger) for j in range(len(self.attributes)) if j != k)]
        return item

    def decided_cells(self, ledger):
        """Flat indices of the cells a decision holds for (of this queue's images and attributes)."""
        cells = [(self.row_of.get(image), self.column_of.get(attribute)) for image, attribute in ledger.decided()]
        return np.asarray([i * len(self.attributes) + k for i, k in cells if i is not None and k is not None],
                          dtype=np.int64)

    def first_pending(self, selected, ledger):
        """The first offset in the List without a decision, or None: among its first (cells decided + 1) cells."""
        decided = self.decided_cells(ledger)
        head = selected.cells(0, min(len(selected), len(decided) + 1))
        pending = np.flatnonzero(~np.isin(head, decided))
        return int(pending[0]) if len(pending) else None

    def page(self, ledger, *, attribute="", kind="", offset=0, limit):
        """What GET /api/queue lists: limit items of the (attribute, kind) list from offset, its length and its first
        undecided offset."""
        selected = self.select(attribute, kind)
        cells = selected.cells(offset, offset + limit)
        positions = selected.positions(offset, cells)
        with ledger.lock:
            ledger.refresh()
            first_pending = self.first_pending(selected, ledger)
            items = [self.item(c, p, ledger) for c, p in zip(cells.tolist(), positions.tolist())]
        return {"total": len(selected), "first_pending": first_pending, "items": items}

    def progress(self, ledger):
        """Cells reviewed (a decision holds), changed (a known cell given another value), NA filled, kept."""
        counts = Counter(reviewed=0, changed=0, na_filled=0, kept=0)
        for image, attribute in ledger.decided():
            i, k = self.row_of.get(image), self.column_of.get(attribute)
            if i is not None and k is not None:
                counts["reviewed"] += 1
                counts[change_kind(int(self.targets[i, k]), VALUES[ledger.latest(image, attribute)["after"]])] += 1
        return dict(counts)


class Part:
    """One kind's cells (known or na) of one column (None: of every column) in the ranking's order, as far as asked
    for: its top, found without sorting the rest, grows by doubling as it is paged."""

    FIRST = 1000  # cells of a part's first top

    def __init__(self, queue, column, kind):
        import audit

        self.queue, self.column, self.kind = queue, column, kind
        self.size = queue.counts[kind] if column is None else \
            audit.part_size(queue.targets, queue.learnt, kind, column)
        self.top = np.zeros(0, dtype=np.int64)

    def cells(self, start, stop):
        import audit

        stop = min(stop, self.size)
        if stop > len(self.top):
            q = self.queue
            want = min(self.size, max(stop, 2 * len(self.top), self.FIRST))
            self.top = audit.ranking(q.targets, q.probabilities, q.score, q.learnt, kind=self.kind,
                                     column=self.column, top=want)
        return self.top[start:stop]


class List:
    """A list of the queue (what GET /api/queue pages): parts one after another. ranked: its positions in the queue
    are its offsets plus the parts before it (a list of every attribute); else they are counted."""

    def __init__(self, queue, parts, *, ranked):
        self.queue, self.parts, self.ranked = queue, parts, ranked

    def __len__(self):
        return sum(p.size for p in self.parts)

    def cells(self, start, stop):
        """Flat indices of the cells at offsets start to stop."""
        out, offset = [np.zeros(0, dtype=np.int64)], 0
        with self.queue.lock:
            for part in self.parts:
                if start < offset + part.size and stop > offset:
                    out.append(part.cells(max(start - offset, 0), stop - offset).astype(np.int64))
                offset += part.size
        return np.concatenate(out)

    def positions(self, start, cells):
        """The queue positions of cells, the list's cells from offset start on."""
        if not self.ranked:
            return self.queue.positions(cells)
        offsets = np.arange(start, start + len(cells))
        return offsets + (self.queue.counts["known"] if self.parts[0].kind == "na" else 0)


def change_kind(given, value):
    return "kept" if value == given else "na_filled" if given < 0 else "changed"


# ---- the decisions: SQLite ----

SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- commit order: the latest decision of a cell is its largest id
    image TEXT NOT NULL,
    attribute TEXT NOT NULL,
    before TEXT NOT NULL,                   -- '1' | '0' | 'NA': the cell's value when decided
    after TEXT NOT NULL,                    -- the value it was given (an undo: the value it returns to)
    time TEXT NOT NULL,                     -- ISO 8601, UTC
    reviewer TEXT NOT NULL,
    undoes INTEGER REFERENCES decisions(id) -- NULL: a decision, else the decision this row takes back
);
CREATE INDEX IF NOT EXISTS decisions_cell ON decisions(image, attribute, id);
CREATE UNIQUE INDEX IF NOT EXISTS decisions_undone ON decisions(undoes) WHERE undoes IS NOT NULL;
"""
COLUMNS = ("id", "image", "attribute", "before", "after", "time", "reviewer", "undoes")


class Busy(Exception):
    """The database could not take the write (locked by another server past BUSY_S, disk full, ...)."""


class Ledger:
    """The decisions table and, in memory, what it says now: the decisions that hold (not undone) per cell, read
    incrementally by id (the table is append-only, so rows past the last one read are all that is new)."""

    def __init__(self, path, *, create=True):
        self.path, self.lock = path, threading.Lock()
        self.rows, self.live, self.last_id = {}, {}, 0  # id -> decision; (image, attribute) -> [ids that hold]
        if os.path.isdir(path):
            raise UserError(f"{path}: is a folder, not a review database; give a file path with --db")
        if not create and not os.path.isfile(path):
            raise UserError(f"{path}: no review database (review first with `python review.py --labels ... "
                            f"--images ...`, or give its path with --db)")
        try:
            # isolation_level None: no implicit transactions; every write below is its own BEGIN IMMEDIATE .. COMMIT
            self.db = sqlite3.connect(path, timeout=BUSY_S, isolation_level=None, check_same_thread=False)
            if create:
                self.db.execute("PRAGMA journal_mode=WAL")
                self._prepare()
            else:
                self._check()
            self.db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when acknowledged, power cut or not
            self.refresh()
        except sqlite3.DatabaseError as e:
            raise UserError(f"{path}: cannot {'write' if create else 'read'} the review database ({e}); give "
                            f"another --db") from None

    def _prepare(self):
        """The schema, created in a write transaction: a database that cannot be written fails here, at start."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version not in (0, SCHEMA_VERSION) or (version == 0 and tables - {"sqlite_sequence"}):
                raise UserError(f"{self.path}: not a review database of this version (user_version {version}, "
                                f"tables {', '.join(sorted(tables)) or 'none'}); give another --db")
            for statement in SCHEMA.split(";\n"):  # one statement at a time: executescript would commit first
                if statement.strip():
                    self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _check(self):
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise UserError(f"{self.path}: not a review database (user_version {version})")

    def refresh(self):
        """Read the rows committed since the last read (by this process or any other)."""
        for row in self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM decisions WHERE id > ? ORDER BY id",
                                   (self.last_id,)).fetchall():
            d = dict(zip(COLUMNS, row))
            cell = (d["image"], d["attribute"])
            if d["undoes"] is None:
                self.rows[d["id"]] = {k: d[k] for k in COLUMNS[:-1]}
                self.live.setdefault(cell, []).append(d["id"])
            elif d["undoes"] in self.live.get(cell, ()):
                self.live[cell].remove(d["undoes"])
                if not self.live[cell]:
                    del self.live[cell]
            self.last_id = d["id"]

    def latest(self, image, attribute):
        """The decision that holds for a cell (its latest not undone), or None."""
        ids = self.live.get((image, attribute))
        return self.rows[ids[-1]] if ids else None

    def decided(self):
        return list(self.live)

    @contextlib.contextmanager
    def writing(self):
        """A write transaction, holding the database's write lock: what it reads is the last committed state."""
        with self.lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise Busy(f"the review database is busy ({e}): try again shortly") from None
            try:
                self.refresh()
                yield
                self.db.execute("COMMIT")
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                # what this transaction inserted is gone: read everything committed again
                self.rows, self.live, self.last_id = {}, {}, 0
                self.refresh()
                if isinstance(e, sqlite3.OperationalError):
                    raise Busy(f"the review database did not take the decision ({e})") from None
                raise

    def _insert(self, image, attribute, before, after, reviewer, undoes=None):
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        cursor = self.db.execute("INSERT INTO decisions (image, attribute, before, after, time, reviewer, undoes) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)", (image, attribute, before, after, now, reviewer, undoes))
        return cursor.lastrowid

    def decide(self, image, attribute, value, reviewer, *, given):
        """Store one decision; returns it once committed. given: the labels file's value (the before of a first
        decision)."""
        with self.writing():
            held = self.latest(image, attribute)
            self._insert(image, attribute, held["after"] if held else given, value, reviewer)
            self.refresh()
        return self.latest(image, attribute)

    def undo(self, reviewer, decision_id=None, *, given_of):
        """Take back a decision (the reviewer's latest that holds, or the one named): a row that returns the cell to
        the decision before it that still holds, else to the given value. Returns (the decision, the cell's value
        now, the decision that holds now or None); None when there is nothing to undo."""
        with self.writing():
            if decision_id is None:
                holding = [i for ids in self.live.values() for i in ids if self.rows[i]["reviewer"] == reviewer]
                if not holding:
                    return None
                decision_id = max(holding)
            target = self.rows.get(decision_id)
            if target is None:
                return None
            cell = (target["image"], target["attribute"])
            if decision_id not in self.live.get(cell, ()):
                raise Refused(409, f"decision {decision_id} is already undone")
            rest = [i for i in self.live[cell] if i != decision_id]
            after = self.rows[rest[-1]]["after"] if rest else given_of(*cell)
            self._insert(*cell, self.latest(*cell)["after"], after, reviewer, undoes=decision_id)
            self.refresh()
        return target, after, self.latest(*cell)

    def close(self):
        self.db.close()


# ---- the export ----

def reviewed_labels(labels, ledger, options=None):
    """The labels file's bytes with the decisions that hold applied, and what they did: {counts, conflicts,
    skipped}. Only the lines of changed rows are rewritten; a comment line of counts (and one per conflict: a cell
    two reviewers decided differently, where the latest decision is taken) goes first."""
    from dataset import parse_labels, rewrite_labels
    from utils import file_sha256

    before = file_sha256(labels)
    quiet = Report(stream=io.StringIO(), info_stream=io.StringIO())  # what it said was said when reviewing
    table = parse_labels(labels, quiet, options=options)
    row_of = {name: i for i, name in enumerate(table.names)}
    column_of = {a: k for k, a in enumerate(table.attributes)}
    targets, counts, conflicts, skipped = table.targets.copy(), Counter(changed=0, na_filled=0, kept=0), [], 0
    with ledger.lock:
        ledger.refresh()
        holding = sorted((row_of.get(c[0], -1), column_of.get(c[1], -1), ids[:]) for c, ids in ledger.live.items())
        rows = {i: ledger.rows[i] for *_, ids in holding for i in ids}
    for i, k, ids in holding:
        if i < 0 or k < 0:
            skipped += 1
            continue
        latest = rows[ids[-1]]
        targets[i, k] = VALUES[latest["after"]]
        counts[change_kind(int(table.targets[i, k]), int(targets[i, k]))] += 1
        by_reviewer = {rows[j]["reviewer"]: rows[j]["after"] for j in ids}  # each reviewer's latest
        if len(set(by_reviewer.values())) > 1:
            conflicts.append({"image": table.names[i], "attribute": table.attributes[k], "value": latest["after"],
                              "reviewer": latest["reviewer"], "decisions": by_reviewer})
    reviewers = sorted({d["reviewer"] for d in rows.values()})
    head = [f"# review.py: {counts['changed']} cells changed, {counts['na_filled']} NA filled, {counts['kept']} kept "
            f"({sum(counts.values())} cells reviewed by {', '.join(reviewers) or 'nobody'}; "
            f"{len(conflicts)} decided differently by two reviewers, the latest decision taken"
            + (", listed below" if conflicts else "")
            + (f"; {skipped} decided cells are not in this file" if skipped else "") + ")"]
    head += [f"# conflict: {c['image']} {c['attribute']} -> {c['value']} ({c['reviewer']}, the latest); "
             + ", ".join(f"{who} {value}" for who, value in c["decisions"].items()) for c in conflicts]
    text = rewrite_labels(labels, table, targets, comments=head)
    if file_sha256(labels) != before:
        raise UserError(f"{labels}: changed while being exported; export again")
    return text, {"counts": dict(counts), "conflicts": conflicts, "skipped": skipped}


def export(args):
    if os.path.exists(args.export) and os.path.exists(args.labels) and os.path.samefile(args.export, args.labels) \
            or os.path.abspath(args.export) == os.path.abspath(args.labels):
        raise UserError(f"{args.export}: is the labels file, which review.py never modifies; give another path")
    check_writable([args.export])
    ledger = Ledger(args.db, create=False)
    try:
        text, what = reviewed_labels(args.labels, ledger, label_options(args))
    finally:
        ledger.close()
    atomic_write(args.export, text)
    c = what["counts"]
    log(f"wrote {args.export}: {c['changed']} cells changed, {c['na_filled']} NA filled, {c['kept']} kept "
        f"(decisions from {args.db})")
    for conflict in what["conflicts"]:
        log(f"  decided differently: {conflict['image']} {conflict['attribute']}: "
            + ", ".join(f"{who} {v}" for who, v in conflict["decisions"].items())
            + f"; the latest ({conflict['reviewer']}: {conflict['value']}) taken")
    if what["skipped"]:
        log(f"  {what['skipped']} decided cells are not in {args.labels} (images or attributes it no longer has)")
    return 0


# ---- Grad-CAM ----

class Cams:
    """Grad-CAM pictures of (row, attribute), drawn on request from the run's model, one at a time, kept in an LRU
    cache. Without a usable model, .missing says why."""

    def __init__(self, model_path, queue):
        self.queue, self.cache, self.model, self.missing = queue, OrderedDict(), None, None
        self.lock, self.waiting = threading.Lock(), 0
        if not model_path:
            self.missing = "no Grad-CAM: the audit used no trained model (train one with train.py, then review)"
            return
        try:
            from model import load_checkpoint, model_from_checkpoint

            self.ckpt = load_checkpoint(model_path)
            self.model = model_from_checkpoint(self.ckpt, model_path)
        except UserError as e:
            self.missing = f"no Grad-CAM: {e}"
            log(f"warning: {e}; the page shows no Grad-CAM")

    def png(self, row, column):
        key = (row, column)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        picture = self._draw(row, column)
        with self.lock:
            self.cache[key] = picture
            while len(self.cache) > CAM_CACHE:
                self.cache.popitem(last=False)
        return picture

    def _draw(self, row, column):
        from PIL import Image

        from dataset import eval_transform, load_image
        from explain import gradcam
        from figures import display_image, heat_overlay

        attribute = self.queue.attributes[column]
        if attribute not in self.ckpt["attributes"]:
            raise Refused(404, f"the model has no attribute {attribute}: no Grad-CAM for it")
        image = load_image(self.queue.data.paths[row])
        x = eval_transform(self.ckpt["image_size"], self.ckpt["mean"], self.ckpt["std"])(image).unsqueeze(0)
        with self.lock:  # one Grad-CAM at a time: each is a forward and a backward
            cam = gradcam(self.model, x, [self.ckpt["attributes"].index(attribute)], backbone=self.ckpt["backbone"])
        out = io.BytesIO()
        Image.fromarray(heat_overlay(display_image(image, CAM_SIZE), cam[0])).save(out, "PNG")
        return out.getvalue()


# ---- the server ----

def reviewer_of(body, default):
    reviewer = body.get("reviewer", default)
    if reviewer is None or reviewer == "":
        raise Refused(400, "reviewer missing: send \"reviewer\" (or start review.py with --reviewer)")
    if not isinstance(reviewer, str) or not reviewer.strip() or len(reviewer) > MAX_REVIEWER \
            or not reviewer.isprintable():
        raise Refused(400, f"reviewer must be a name of 1 to {MAX_REVIEWER} printable characters")
    return reviewer.strip()


class LabelsWatch:
    """Whether the labels file still has the bytes the queue was built on (hashed again only when its size or
    time changes)."""

    def __init__(self, path, sha256):
        self.path, self.sha256, self.seen, self.changed = path, sha256, None, False

    def check(self):
        from utils import file_sha256

        try:
            st = os.stat(self.path)
            stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
            if stamp != self.seen:
                self.seen, self.changed = stamp, file_sha256(self.path) != self.sha256
        except OSError:
            self.seen, self.changed = None, True
        return self.changed


def create_app(args, queue, ledger, cams, *, hosts=None):
    """The FastAPI app reviewing queue (a Queue of AuditData) into ledger, Grad-CAMs from cams. hosts: the Host
    headers answered (None: any)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool

    data = queue.data
    watch = LabelsWatch(data.labels, data.labels_sha256)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    web.install_errors(app)

    @app.exception_handler(UserError)
    async def user_error(request, e):  # the labels file went away or changed while being read: said, not a 500
        return error_response(409, str(e))

    @app.exception_handler(Busy)
    async def busy(request, e):
        return error_response(503, str(e), {"Retry-After": str(RETRY_AFTER)})


    def given_of(image, attribute):
        i, k = queue.row_of.get(image), queue.column_of.get(attribute)
        return TEXT[int(queue.targets[i, k])] if i is not None and k is not None else "NA"

    def state():
        with ledger.lock:
            ledger.refresh()
            progress = queue.progress(ledger)
        changed = watch.check()
        left, missed = data.not_audited(), [v["attribute"] for v in data.verdicts if not v["learnt"]]
        one = len(missed) == 1
        return {"labels": os.path.basename(data.labels), "attributes": queue.attributes, "source": data.source,
                "not_learnt": missed,
                "not_learnt_message": (f"Not in the queue: {left}. The model did not learn {'it' if one else 'them'} "
                                       "(no better than chance on images it never saw), so it has nothing to "
                                       f"suggest; {'its' if one else 'their'} labels stay as given.") if left else None,
                "queue": len(queue), "known": queue.counts["known"], "na": queue.counts["na"],
                "reviewer": args.reviewer, "gradcam": cams.missing is None, "gradcam_missing": cams.missing,
                "last_id": ledger.last_id, **progress, "labels_changed": changed,
                "labels_message": (f"{os.path.basename(data.labels)} changed on disk since this queue was built: the "
                                   "given values shown are the ones read then; decisions still apply by image and "
                                   "attribute, and the export reads the file as it is now") if changed else None}

    @app.get("/api/state")
    async def get_state():
        return await run_in_threadpool(state)

    def listing(attribute, kind, offset, limit):
        page = queue.page(ledger, attribute=attribute, kind=kind, offset=offset, limit=limit)
        return {"offset": offset, "limit": limit, "attribute": attribute, "kind": kind, **page}

    def number(params, name, default, low, high):
        text = params.get(name) or str(default)
        if not text.isdigit() or not low <= int(text) <= high:
            raise Refused(400, f"{name} must be a whole number from {low} to {high}")
        return int(text)

    @app.get("/api/queue")
    async def get_queue(request: Request):
        params = request.query_params
        attribute, kind = params.get("attribute", ""), params.get("kind", "")
        if attribute and attribute not in queue.column_of:
            raise Refused(400, f"unknown attribute {attribute!r}; the attributes are {', '.join(queue.attributes)}")
        if kind not in ("", *KINDS):
            raise Refused(400, f"unknown kind {kind!r}; use known or na (or leave it out for both)")
        offset = number(params, "offset", 0, 0, len(queue))
        limit = number(params, "limit", 100, 1, MAX_LIMIT)
        return await run_in_threadpool(listing, attribute, kind, offset, limit)

    @app.post("/api/decisions")
    async def post_decision(request: Request):
        body = await read_json(request, MAX_BODY)
        image, attribute, value = body.get("image"), body.get("attribute"), body.get("value")
        if not isinstance(image, str) or image not in queue.row_of:
            raise Refused(400, f"unknown image {image!r}: not a row of the queue")
        if not isinstance(attribute, str) or attribute not in queue.column_of:
            raise Refused(400, f"unknown attribute {attribute!r}; the attributes are {', '.join(queue.attributes)}")
        if not isinstance(value, str) or value not in VALUES:
            raise Refused(400, f"value {value!r} must be \"1\", \"0\" or \"NA\"")
        reviewer = reviewer_of(body, args.reviewer)
        stored = await run_in_threadpool(ledger.decide, image, attribute, value, reviewer,
                                         given=given_of(image, attribute))
        return stored

    @app.post("/api/undo")
    async def post_undo(request: Request):
        body = await read_json(request, MAX_BODY)
        reviewer = reviewer_of(body, args.reviewer)
        decision_id = body.get("id")
        if decision_id is not None and (not isinstance(decision_id, int) or isinstance(decision_id, bool)):
            raise Refused(400, "id must be a decision's number")
        done = await run_in_threadpool(ledger.undo, reviewer, decision_id, given_of=given_of)
        if done is None:
            raise Refused(409 if decision_id is None else 404, f"nothing to undo for {reviewer}" if decision_id is None
                          else f"no decision {decision_id}")
        undone, value, holding = done
        i, k = queue.row_of.get(undone["image"]), queue.column_of.get(undone["attribute"])
        index = None if i is None or k is None else int(queue.positions([i * len(queue.attributes) + k])[0])
        index = None if index is not None and index < 0 else index
        return {"undone": undone, "value": value, "decided": holding, "index": index}

    @app.get("/api/export")
    async def get_export():
        text, what = await run_in_threadpool(reviewed_labels, data.labels, ledger, label_options(args))
        name = os.path.splitext(os.path.basename(data.labels))[0] + "_reviewed.txt"
        ascii_name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        return Response(text, media_type="text/plain; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{ascii_name}"',
                                 "X-Review-Counts": json.dumps(what["counts"]),
                                 "X-Review-Conflicts": str(len(what["conflicts"]))})

    def row_number(row):
        if not row.isdigit() or int(row) >= len(queue.names):
            raise Refused(404, f"no row {row[:20]!r} in the queue's data")
        return int(row)

    def image_bytes(row):
        path = data.paths[row]
        kind = IMAGE_TYPES.get(os.path.splitext(path)[1].lower())
        try:
            if kind is not None:
                with open(path, "rb") as f:
                    return f.read(), kind
            from dataset import load_image

            out = io.BytesIO()
            load_image(path).save(out, "PNG")
            return out.getvalue(), "image/png"
        except (OSError, UserError) as e:
            raise Refused(404, f"the image of row {row} cannot be read ({getattr(e, 'strerror', None) or e})") from None

    @app.get("/api/image/{row}")
    async def get_image(row: str):
        content, kind = await run_in_threadpool(image_bytes, row_number(row))
        return Response(content, media_type=kind, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/gradcam/{row}/{column}")
    async def get_gradcam(row: str, column: str):
        row = row_number(row)
        if not column.isdigit() or int(column) >= len(queue.attributes):
            raise Refused(404, f"no attribute number {column[:20]!r}")
        if cams.missing:
            raise Refused(404, cams.missing)
        if cams.waiting >= CAM_WAITING:
            raise Refused(503, "Grad-CAMs are being drawn: try again shortly", {"Retry-After": str(RETRY_AFTER)})
        cams.waiting += 1
        try:
            picture = await run_in_threadpool(cams.png, row, int(column))
        except UserError as e:
            raise Refused(404, f"no Grad-CAM: {e}") from None
        finally:
            cams.waiting -= 1
        return Response(picture, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    web.add_pages(app, PAGE_FILES, PAGE_POLICY)

    if hosts is not None:
        @app.middleware("http")
        async def own_address(request, call_next):
            # A foreign page whose name is made to resolve to 127.0.0.1 (DNS rebinding) would be same-origin with
            # this server; its requests still name its own host, and are refused.
            if request.headers.get("host", "").lower() not in hosts:
                return error_response(421, "this server answers at its own address only (the Host header names "
                                           "another)")
            return await call_next(request)

    return app


def listen(host, port):
    """The listening socket, bound here so that a port in use is one error line."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); give another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(args):
    import uvicorn

    import audit

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} must be from 0 to 65535")
    if args.reviewer is not None:
        try:
            args.reviewer = reviewer_of({"reviewer": args.reviewer}, None)
        except Refused as e:
            raise UserError(f"--reviewer: {e.message}") from None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.host.startswith("127."):
        print(f"warning: --host {args.host}: anyone who can reach this machine can read the labels and write "
              "decisions (review.py has no login)", file=sys.stderr)
    audit.refuse_without_oof(args.train_flags)
    audit.check_train_flags(args.train_flags, script="review.py")
    ledger = Ledger(args.db)  # before the audit: a database that cannot be written fails at once
    sock = listen(args.host, args.port)
    started = time.time()
    data = load_audit(args)
    queue = Queue(data)
    cams = Cams(data.model, queue)
    host, port = sock.getsockname()[:2]
    loopback = args.host in ("127.0.0.1", "localhost", "::1") or args.host.startswith("127.")
    hosts = {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]", args.host)} if loopback else None
    app = create_app(args, queue, ledger, cams, hosts=hosts)
    log(f"reviewing {data.labels}: {len(queue)} cells ({queue.counts['known']} known, {queue.counts['na']} NA) "
        f"of {len(queue.names)} images; {data.source} ({time.time() - started:.1f}s); decisions in {args.db}")
    log(f"open http://{host}:{port}/ (Ctrl-C or SIGTERM to stop)")

    server = web.server_class()(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        ledger.close()
    return 0


def run(args):
    if args.export:
        if args.train_flags:
            raise UserError(f"{' '.join(args.train_flags)}: not flags of an export (it reads the labels and the "
                            f"database only)")
        return export(args)
    args.train_flags = [*args.train_flags, *label_argv(label_options(args))]  # train.py reads the labels as we do
    return serve(args)


def main(argv=None):
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

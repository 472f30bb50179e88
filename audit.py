"""Label audit: which known labels look wrong, and what the NA cells probably are.

    python audit.py                                          # the labels of the last `python train.py`
    python audit.py --labels labels.txt --images images --model run/model.pth --out audit/
    python audit.py --labels my.txt --images my/ --backbone efficientnet_lite0 --epochs 20   # train.py's flags

Every image is scored by heads that never trained on it: the out-of-fold probabilities of train.py's
cross-validation (the mean over its --repeats), read from the oof.npz beside --model when it was made from these
labels and images. Otherwise audit.py runs that very cross-validation first: `python train.py --no-report` in a
temporary folder, with train.py's defaults and any train.py flag given here, sharing the feature cache (seconds
after a first run). There is no second recipe. Writes, in --out (default: the current folder):

    label_audit.csv        image, attribute, given, suggested, probability, score: one row per cell, the most
                           suspect known cells first (score = 1 - cleanlab's label quality), then the NA cells,
                           the most confident suggestion first (they have no score: NA is never wrong); the first
                           --top of each (default 100,000: what a person reads; review.py pages every cell), or
                           every cell with --all (1M x 228: up to 228M rows, about 10 GB)
    labels_suggested.txt   the labels with NA cells filled where the model is confident (threshold in its header)

An attribute the run did not learn (its verdict: no better than chance out of fold) is not audited: its
probabilities are its prevalence, so a "suspect" of it would be noise, and filling its NA cells would write the
model's noise into the labels. audit.py says which, and so do both files' first lines. The labels file given is
only read.
"""
import argparse
import csv
import io
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

from dataset import add_label_flags, label_argv, label_options, parse_labels, write_labels
from engine import oof_mismatch, read_oof
from utils import Report, UserError, atomic_write, check_writable, log, run_cli

CONFIDENT = 0.9  # an NA cell is filled with 1 at an out-of-fold probability >= this, with 0 at <= 1 - this
TOP = 100_000  # label_audit.csv's known cells and NA cells, each: the most suspect, the most confident (--all: every)
CHUNK = 1 << 18  # cells of label_audit.csv formatted at a time
AUDIT_COLUMNS = ("image", "attribute", "given", "suggested", "probability", "score")
TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Find suspect labels and suggest values for NA cells.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Any other flag is train.py's (python train.py --help) and is passed to it when the out-of-fold "
               "predictions must be computed.")
    p.add_argument("--labels", default="labels.txt", help="labels file (read only)")
    p.add_argument("--images", default="images", help="images folder")
    add_label_flags(p)
    p.add_argument("--model", default="model.pth", help="the run whose oof.npz (beside it) is read when it matches")
    p.add_argument("--out", default=".", help="folder for label_audit.csv and labels_suggested.txt")
    p.add_argument("--confident", type=float, default=CONFIDENT, help="probability that fills an NA cell")
    p.add_argument("--top", type=int, default=TOP, help="label_audit.csv: the N most suspect known cells, then the "
                                                        "N most confident NA cells")
    p.add_argument("--all", action="store_true", help="label_audit.csv: every cell audited (not only the --top)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args, args.train_flags = p.parse_known_args(argv)
    return args


# ---- out-of-fold probabilities: the run's own, or computed by train.py ----

@dataclass
class AuditData:
    """The out-of-fold predictions of a labels file, and each known cell's suspicion."""
    labels: str  # the labels file read
    attributes: list
    names: list  # image names of the scored rows (readable images), in labels-file order
    paths: list  # the image file of each row
    targets: np.ndarray  # (n, K) int8: 1, 0, -1 (= NA), as the labels file says
    probabilities: np.ndarray  # (n, K) float32, out of fold
    score: np.ndarray  # (n, K) suspicion of each known cell (label_quality), NaN for NA cells
    source: str  # one line: which oof.npz, and how it was made
    model: str  # the model.pth of the run that made them (for Grad-CAM), or None
    labels_sha256: str  # the labels file's bytes when read
    verdicts: list  # per attribute: the run's verdict (metrics.verdicts' row)

    @property
    def learnt(self):
        return np.array([bool(v["learnt"]) for v in self.verdicts])

    def not_audited(self):
        """'Attr1 (p 0.41), Attr3 (p 1.00)': the attributes left out, with their adjusted p-values; '' if none."""
        return ", ".join(f"{v['attribute']} (p {v['p_adjusted']:.2f})" for v in self.verdicts if not v["learnt"])


def audit_data(labels, images, *, model="model.pth", train_flags=(), run_dir=None):
    """The out-of-fold predictions of the run beside `model` (its oof.npz) when they match these labels and images
    (or of the run kept in run_dir); else computed by train.py's cross-validation (train_flags pass on: --backbone,
    --cache-dir, ...), its run kept in run_dir when given (its model.pth is then the model, for Grad-CAM), else in a
    temporary folder removed afterwards."""
    for path, what in ((labels, "labels file"), (images, "images folder")):
        if not os.path.exists(path):
            raise UserError(f"{path}: {what} not found (give it with --{what.split()[0]})")
    kept = os.path.join(run_dir, "model.pth") if run_dir else None
    for candidate in (model, kept) if kept else (model,):  # the run beside model, else one made here before
        oof_path = os.path.join(os.path.dirname(os.path.abspath(candidate)), "oof.npz")
        if not os.path.isfile(oof_path):
            continue
        try:
            oof = read_oof(oof_path)
            why = oof_mismatch(oof, labels_path=labels, images=images, model=candidate)
        except UserError as e:
            why = str(e)
        if why is None:
            if train_flags:
                log(f"audit: train.py's flags {' '.join(train_flags)} not used: the run's {oof_path} matches these "
                    "labels (give another --model to compute them anew with those flags)")
            return from_oof(oof, labels, images, source=f"{oof_path} (the run of {candidate})",
                            model=candidate if os.path.isfile(candidate) else None)
        log(f"audit: {oof_path} not used: {why}")
    refuse_without_oof(train_flags)
    with tempfile.TemporaryDirectory(prefix="audit-run-") as temporary:
        folder = run_dir or temporary
        os.makedirs(folder, exist_ok=True)
        run_model = os.path.join(folder, "model.pth")
        log(f"audit: computing the out-of-fold predictions: train.py on {labels} (its log follows)")
        command = [sys.executable, TRAIN_PY, "--labels", labels, "--images", images, "--out", run_model,
                   "--curve", os.path.join(folder, "loss_curve.png"), "--no-report", *train_flags]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
            try:
                for line in child.stdout:  # its log, as it comes (through our streams, which may not be files)
                    print(line, end="", file=sys.stderr, flush=True)
            except KeyboardInterrupt:  # Ctrl-C reached train.py too: it stops after its step and says so
                child.wait()
                raise UserError(f"interrupted: the out-of-fold predictions of {labels} were not finished") from None
        code = child.returncode
        if code != 0:
            raise UserError(f"train.py could not make the out-of-fold predictions of {labels} (exit {code}; its "
                            "message is above)")
        oof = read_oof(os.path.join(folder, "oof.npz"))
        return from_oof(oof, labels, images, source=f"computed now by train.py{' ' if train_flags else ''}"
                        f"{' '.join(train_flags)} ({oof.config.get('repeats', 1)} x {oof.config.get('folds')} folds, "
                        f"{oof.config.get('backbone')})", model=run_model if run_dir else None)


def refuse_without_oof(train_flags):
    """train.py's flags that would make it write no out-of-fold predictions: said before anything runs."""
    path = argparse.ArgumentParser(add_help=False)
    for flag in ("--folds", "--unfreeze", "--augment"):
        path.add_argument(flag, default="")
    given = path.parse_known_args(list(train_flags))[0]
    for flag, value in (("--folds", "0"), ("--unfreeze", "last"), ("--augment", "strong")):
        if getattr(given, flag[2:]).strip() == value:
            raise UserError(f"{flag} {value}: the audit needs the out-of-fold predictions of train.py's cross-"
                            "validation (frozen backbone, flip only, 2 or more folds)")


def check_train_flags(flags, script="audit.py"):
    """Flags meant for train.py, checked by train.py's own parser before anything runs (it lists no backbone and
    exits): a wrong one is said now, also when a matching oof.npz means train.py will not run at all."""
    if not flags:
        return
    done = subprocess.run([sys.executable, TRAIN_PY, *flags, "--list-backbones=-none-"], capture_output=True,
                          text=True)
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or ["exit " + str(done.returncode)])[-1]
        raise UserError(f"{' '.join(flags)}: not flags of {script} nor of train.py ({said.split('error: ')[-1]})")


def from_oof(oof, labels, images, *, source, model):
    return AuditData(labels=labels, attributes=list(oof.attributes), names=list(oof.names),
                     paths=oof.paths(images), targets=np.asarray(oof.targets),
                     probabilities=np.asarray(oof.probabilities),
                     score=label_quality(oof.probabilities, oof.targets, oof.learnt),
                     source=source, model=model, labels_sha256=oof.labels_sha256, verdicts=oof.verdicts)


# ---- scores ----

def label_quality(probabilities, targets, learnt=None):
    """(n, K) suspicion score of each known cell, 1 - cleanlab's label quality; NaN for NA cells, and for every
    cell of an attribute not learnt (learnt[k] False): the model knows nothing of it to suspect a label with.

    cleanlab's multi-label scorer takes complete label sets and has no NA, so each attribute is scored as the
    binary problem it is over its known cells only (what cleanlab.multilabel_classification does per class
    before it aggregates per image): self-confidence, the out-of-fold probability of the given label. That score
    is these few lines; importing cleanlab for it (and scikit-learn with it) cost 1.4 s of every run's report, so it
    is computed here, and tests/test_audit.py holds it equal to cleanlab.rank.get_label_quality_scores."""
    y, p = np.asarray(targets), np.asarray(probabilities)
    score = np.empty(y.shape, dtype=np.float64)
    rows = max(1, BLOCK // max(y.shape[1], 1))
    for start in range(0, len(y), rows):  # by blocks of rows: float64 temporaries of a block, not of every cell
        b = slice(start, start + rows)
        out, yb = score[b], y[b]
        np.copyto(out, p[b])
        np.subtract(1.0, out, out=out, where=yb == 1)
        out[(yb != 1) & (yb != 0)] = np.nan
    if learnt is not None:
        score[:, ~np.asarray(learnt, dtype=bool)] = np.nan
    return score


# ---- the ranking: the audit's order of the cells, on the (N, K) arrays ----

KINDS = ("known", "na")  # the ranking's two parts: known cells by score, then NA cells by |p - 0.5|
BLOCK = 1 << 24  # cells per block of a pass over the (N, K) arrays: a few 100 MB of temporaries at a time
FULL_SORT = 1 << 22  # a part this small is sorted whole; a larger one's top is found without sorting the rest
SAMPLE = 1 << 20  # cells sampled to guess the threshold of a top
MARGIN = 1e-6  # of a float32 comparison of |p - 0.5| before the exact one (its error: at most 3e-8)


def index_dtype(size):
    """Flat cell indices i * K + k: 4 bytes each while they fit (1M x 228: 0.9 GB for every cell, not 1.8)."""
    return np.uint32 if size < 2 ** 32 else np.int64


def _blocks(targets, probabilities, score, learnt, kind, column=None, step=1):
    """Per block of rows (every step-th row): (the block's first row, the mask of the part's cells, the values their
    keys come from: the score (known) or the probability (na), as views, no copy)."""
    n, width = targets.shape
    rows = max(1, BLOCK // (width if column is None else 1)) * step
    ok = np.ones(width, dtype=bool) if learnt is None else np.asarray(learnt, dtype=bool)
    values = score if kind == "known" else probabilities
    for start in range(0, n, rows):
        part = slice(start, min(n, start + rows), step)
        y, on, raw = (targets[part], ok, values[part]) if column is None else \
            (targets[part, column], ok[column], values[part, column])
        yield start, ((y >= 0) if kind == "known" else (y < 0)) & on, raw


def _keys(kind, raw):
    """The exact keys (float64, higher first) of gathered values: the score, NaN as -inf (known); |p - 0.5| (na)."""
    raw = np.asarray(raw, dtype=np.float64)
    return np.where(np.isnan(raw), -np.inf, raw) if kind == "known" else np.abs(raw - 0.5)


def _within(kind, mask, raw, low=-np.inf, high=np.inf):
    """(positions in the block, keys) of its part's cells with a key in [low, high]. The na keys are first compared
    in float32 with a margin (|p - 0.5| is off by at most 3e-8 there), then exactly on the few gathered."""
    cond = mask
    if kind == "known":
        if low > -np.inf:
            cond = cond & (raw >= low)
        if high < np.inf:
            cond = cond & ~(raw > high)  # NaN (key -inf) stays
    elif low > -np.inf or high < np.inf:
        distance = np.abs(raw - np.float32(0.5))
        if low > -np.inf:
            cond = cond & (distance >= np.float64(low) - MARGIN)
        if high < np.inf:
            cond = cond & (distance <= np.float64(high) + MARGIN)
    where = np.flatnonzero(cond)
    keys = _keys(kind, raw.ravel()[where])
    good = (keys >= low) & (keys <= high)
    return (where, keys) if good.all() else (where[good], keys[good])


def _count_above(kind, mask, raw, high):
    """How many of the block's part cells have a key > high."""
    if kind == "known":
        return int(np.count_nonzero(mask & (raw > high)))
    distance = np.abs(raw - np.float32(0.5))
    sure = int(np.count_nonzero(mask & (distance > np.float64(high) + MARGIN)))
    band = np.flatnonzero(mask & (distance > np.float64(high) - MARGIN) & (distance <= np.float64(high) + MARGIN))
    return sure + int(np.count_nonzero(_keys(kind, raw.ravel()[band]) > high))


def _flat(start, where, width, column):
    """Flat indices of the cells at `where` (flatnonzero of a block's mask) of the block starting at row start."""
    return start * width + where if column is None else (start + where) * width + column


def part_size(targets, learnt, kind, column=None):
    """How many cells the part has: the known (or NA) cells of the attributes learnt, of one column when given."""
    y = np.asarray(targets)
    ok = np.ones(y.shape[1], dtype=bool) if learnt is None else np.asarray(learnt, dtype=bool)
    if column is not None:
        return int(np.count_nonzero(y[:, column] >= 0 if kind == "known" else y[:, column] < 0)) if ok[column] else 0
    rows, total = max(1, BLOCK // max(y.shape[1], 1)), 0
    for start in range(0, len(y), rows):
        block = y[start:start + rows]
        total += int(np.count_nonzero(((block >= 0) if kind == "known" else (block < 0)) & ok))
    return total


def _gather(targets, probabilities, score, learnt, kind, column, low=-np.inf, high=np.inf, size=None):
    """(flat indices ascending, keys) of the part's cells with a key in [low, high]; size: how many there are (every
    cell of the part), filled in place of a list of blocks joined (one copy of a part of 1M x 228, not two)."""
    width, dtype = targets.shape[1], index_dtype(targets.size)
    if size is not None:
        flat, keys, at = np.empty(size, dtype=dtype), np.empty(size), 0
        for start, mask, raw in _blocks(targets, probabilities, score, learnt, kind, column):
            where, key = _within(kind, mask, raw, low, high)
            flat[at:at + len(where)], keys[at:at + len(where)] = _flat(start, where, width, column), key
            at += len(where)
        return flat, keys
    flat, keys = [np.zeros(0, dtype=dtype)], [np.zeros(0)]
    for start, mask, raw in _blocks(targets, probabilities, score, learnt, kind, column):
        where, key = _within(kind, mask, raw, low, high)
        flat.append(_flat(start, where, width, column).astype(dtype))
        keys.append(key)
    return np.concatenate(flat), np.concatenate(keys)


def _part(targets, probabilities, score, learnt, kind, column, top):
    """The part's cells, in order (key descending, then flat index ascending: the stable sorts of audit_rows); top:
    its first top only, gathered by a threshold on the key instead of sorting every cell."""
    size = part_size(targets, learnt, kind, column)
    threshold = -np.inf
    if top is not None and top < size and size > FULL_SORT:
        # Guess the key of the top-th cell from a sample of rows; a guess too high gathers fewer than top cells and is
        # lowered. Every cell with a key >= the threshold is gathered, so the first top of them are exact.
        step = max(1, (targets.size if column is None else len(targets)) // SAMPLE)
        sample = np.concatenate([np.zeros(0)] + [_within(kind, mask, raw)[1] for _, mask, raw in
                                                 _blocks(targets, probabilities, score, learnt, kind, column, step)])
        share = top / size
        while True:
            rank = int(np.ceil(len(sample) * share * 2)) + 16
            threshold = -np.inf if rank >= len(sample) else np.partition(sample, len(sample) - rank)[-rank]
            flat, keys = _gather(targets, probabilities, score, learnt, kind, column, low=threshold)
            if len(flat) >= top or threshold == -np.inf:
                break
            share *= 4
    else:
        flat, keys = _gather(targets, probabilities, score, learnt, kind, column, size=size)
    order = np.argsort(np.negative(keys, out=keys), kind="stable")
    return flat[order[:top] if top is not None else order]


def ranking(targets, probabilities, score, learnt=None, *, kind=None, column=None, top=None):
    """Flat indices (i * K + k) of the cells audited, in the audit's order: the known cells of the attributes learnt
    (learnt None: all) by score, the most suspect first, then their NA cells by the confidence of the suggestion
    (|p - 0.5|), the most confident first; equal keys in row-major order. kind known | na: that part only; column:
    that attribute's cells only; top: the first top only, found without sorting the rest (1M x 228: about a second,
    where sorting every cell takes a minute)."""
    targets = np.asarray(targets)
    if targets.dtype != np.int8:
        targets = targets.astype(np.int8)
    probabilities, score = np.asarray(probabilities), np.asarray(score)
    parts = []
    for part in (kind,) if kind else KINDS:
        parts.append(_part(targets, probabilities, score, learnt, part, column, top))
        if top is not None:
            top -= len(parts[-1])
            if top <= 0:
                break
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def rank_of(cells, targets, probabilities, score, learnt=None):
    """The position of each cell (flat index) in ranking(targets, ...), -1 for a cell not audited: the cells ranked
    before it counted (a pass over the arrays per part), not every cell sorted."""
    cells = np.asarray(cells, dtype=np.int64).ravel()
    targets, probabilities, score = np.asarray(targets), np.asarray(probabilities), np.asarray(score)
    width = targets.shape[1]
    rows, columns = np.divmod(cells, width)
    ok = np.ones(width, dtype=bool) if learnt is None else np.asarray(learnt, dtype=bool)
    known = targets[rows, columns] >= 0
    positions = np.full(len(cells), -1, dtype=np.int64)
    before = 0  # the cells of the parts before this one
    for kind, mine in (("known", known & ok[columns]), ("na", ~known & ok[columns])):
        if mine.any():
            key = _keys(kind, (score if kind == "known" else probabilities)[rows[mine], columns[mine]])
            low, high = key.min(), key.max()
            above = sum(_count_above(kind, mask, raw, high)
                        for _, mask, raw in _blocks(targets, probabilities, score, learnt, kind))
            flat, keys = _gather(targets, probabilities, score, learnt, kind, None, low, high)
            order = np.argsort(-keys, kind="stable")
            place = np.empty(len(order), dtype=np.int64)
            place[order] = np.arange(len(order))
            positions[mine] = before + above + place[np.searchsorted(flat, cells[mine])]
        if kind == "known":
            before = part_size(targets, learnt, kind)
    return positions


def audit_cells(cells, names, attributes, targets, probabilities, score):
    """The rows of label_audit.csv (one dict per cell) of the cells given by flat index: for a page or a top, not
    for every cell of a large set."""
    width = len(attributes)
    rows = []
    for c in np.asarray(cells, dtype=np.int64).tolist():
        i, k = divmod(c, width)
        y, p = int(targets[i, k]), float(probabilities[i, k])
        rows.append({"image": names[i], "attribute": attributes[k], "given": "NA" if y < 0 else y,
                     "suggested": int(p >= 0.5), "probability": p, "score": None if y < 0 else float(score[i, k])})
    return rows


def audit_rows(names, attributes, targets, probabilities, score, learnt=None):
    """audit_cells of every cell audited, in ranking's order: for small sets (the tests); large ones are written
    from the ranking in chunks (write_audit_csv)."""
    return audit_cells(ranking(targets, probabilities, score, learnt), names, attributes, np.asarray(targets),
                       probabilities, score)


def suggested_targets(targets, probabilities, confident, learnt=None):
    """targets with each NA cell of an attribute learnt set to 1 where p >= confident, 0 where p <= 1 - confident;
    others stay NA."""
    y = np.asarray(targets).astype(np.int8)
    na = y < 0
    if learnt is not None:
        na[:, ~np.asarray(learnt, dtype=bool)] = False
    y[na & (probabilities >= confident)] = 1
    y[na & (probabilities <= 1 - confident)] = 0
    return y


def flip_known(targets, rate, seed):
    """The measurement of the audit: targets with round(rate x known cells) known cells flipped at random
    (seeded), and the mask of the flipped cells."""
    y = np.asarray(targets).astype(np.int8)
    known = np.flatnonzero(y.ravel() >= 0)
    chosen = np.random.default_rng(seed).choice(known, round(rate * len(known)), replace=False)
    flipped = np.zeros(y.size, dtype=bool)
    flipped[chosen] = True
    flipped = flipped.reshape(y.shape)
    y[flipped] = 1 - y[flipped]
    return y, flipped


def recall_in_top(score, flipped, factor=2):
    """Share of the flipped cells among the factor x (number flipped) highest scores (NaN cells never count)."""
    order = np.argsort(-np.nan_to_num(score.ravel(), nan=-np.inf), kind="stable")
    top = order[:factor * int(flipped.sum())]
    return float(flipped.ravel()[top].sum() / max(flipped.sum(), 1))


# ---- outputs ----

def audit_chunks(data, top=None):
    """The cells of label_audit.csv (flat indices, in the ranking's order) in chunks of CHUNK: the first top known
    cells, then the first top NA cells (top None: every cell)."""
    for kind in KINDS:
        cells = ranking(data.targets, data.probabilities, data.score, data.learnt, kind=kind, top=top)
        for start in range(0, len(cells), CHUNK):
            yield cells[start:start + CHUNK]


def write_audit_csv(path, data, chunks, *, comment=""):
    """label_audit.csv of the cells in chunks (audit_chunks), streamed: a chunk's rows at a time. A first line
    `# comment` when there is one (pandas reads the file with read_csv(path, comment="#")). Returns the rows
    written."""
    names, attributes, width = data.names, data.attributes, len(data.attributes)
    targets, probabilities, score = np.asarray(data.targets), np.asarray(data.probabilities), np.asarray(data.score)
    written = 0

    def write(tmp):
        nonlocal written
        with open(tmp, "w", newline="") as f:
            if comment:
                f.write(f"# {comment}\n")
            out = csv.writer(f)
            out.writerow(AUDIT_COLUMNS)
            for cells in chunks:
                i, k = np.divmod(np.asarray(cells, dtype=np.int64), width)
                y, p, s = targets[i, k].tolist(), probabilities[i, k].astype(np.float64).tolist(), score[i, k].tolist()
                out.writerows([names[row], attributes[column], "NA" if g < 0 else g, int(q >= 0.5), f"{q:.6f}",
                               "" if g < 0 else f"{v:.6f}"]
                              for row, column, g, q, v in zip(i.tolist(), k.tolist(), y, p, s))
                written += len(cells)

    atomic_write(path, write)
    return written


def write_suggested(path, data, *, confident, source, options=None):
    """labels_suggested.txt, in the format of the labels file (options: how it was read)."""
    filled = suggested_targets(data.targets, data.probabilities, confident, data.learnt)
    count = int((np.asarray(data.targets) < 0).sum() - (filled < 0).sum())
    left = data.not_audited()
    comment = (f"# {os.path.basename(source)} with {count} NA cells filled by audit.py: 1 where the out-of-fold "
               f"probability is >= {confident}, 0 where it is <= {1 - confident:.2f}; the other NA cells stay NA"
               + (f"; not filled, not learnt (no better than chance): {left}" if left else ""))
    quiet = Report(stream=io.StringIO(), info_stream=io.StringIO())  # said when the labels were read for the run
    write_labels(path, data.attributes, data.names, filled, comment=comment,
                 fmt=parse_labels(data.labels, quiet, options=options).format)
    return count


# ---- main ----

def run(args):
    outputs = {"csv": os.path.join(args.out, "label_audit.csv"),
               "labels": os.path.join(args.out, "labels_suggested.txt")}
    if os.path.abspath(outputs["labels"]) == os.path.abspath(args.labels):
        raise UserError(f"{args.labels}: audit.py would overwrite the labels file; give another --out")
    if not 0.5 < args.confident <= 1:
        raise UserError(f"--confident {args.confident} must be in (0.5, 1]")
    if args.top < 0:
        raise UserError(f"--top {args.top} must be 0 or more (--all: every cell)")
    check_writable(list(outputs.values()))
    options = label_options(args)
    args.train_flags = [*args.train_flags, *label_argv(options)]  # train.py reads the labels as this script does
    refuse_without_oof(args.train_flags)
    check_train_flags(args.train_flags)
    data = audit_data(args.labels, args.images, model=args.model, train_flags=args.train_flags)
    left = data.not_audited()
    sizes = {kind: part_size(data.targets, data.learnt, kind) for kind in KINDS}
    top = None if args.all else args.top
    comment = [f"not audited, not learnt (no better than chance out of fold): {left}"] if left else []
    if top is not None and max(sizes.values()) > top:
        comment.append(f"the {min(top, sizes['known']):,} most suspect of {sizes['known']:,} known cells and the "
                       f"{min(top, sizes['na']):,} most confident of {sizes['na']:,} NA cells (audit.py --all: "
                       "every cell)")
    written = write_audit_csv(outputs["csv"], data, audit_chunks(data, top), comment="; ".join(comment))
    filled = write_suggested(outputs["labels"], data, confident=args.confident, source=args.labels, options=options)
    log(f"audit of {args.labels} from {data.source}")
    if left:
        log(f"not audited: {left}: not learnt (no better than chance out of fold), so the model has no suspect "
            "and no suggestion for them; their labels are as given")
    log(f"wrote {outputs['csv']} ({written} of {sum(sizes.values())} cells, the most suspect first) and "
        f"{outputs['labels']} ({filled} of {int((data.targets < 0).sum())} NA cells filled at probability "
        f"{args.confident})")
    suspects = ranking(data.targets, data.probabilities, data.score, data.learnt, kind="known", top=10)
    for r in audit_cells(suspects, data.names, data.attributes, data.targets, data.probabilities, data.score):
        log(f"  suspect: {r['image']} {r['attribute']} given {r['given']}, the model says {r['probability']:.2f}")
    return 0


def main(argv=None):
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

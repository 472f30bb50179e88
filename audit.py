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
                           the most confident suggestion first (they have no score: NA is never wrong)
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
    is this one line; importing cleanlab for it (and scikit-learn with it) cost 1.4 s of every run's report, so it
    is computed here, and tests/test_audit.py holds it equal to cleanlab.rank.get_label_quality_scores."""
    y = np.asarray(targets)
    p = np.asarray(probabilities, dtype=np.float64)
    score = np.where(y == 1, 1 - p, np.where(y == 0, p, np.nan))
    if learnt is not None:
        score[:, ~np.asarray(learnt, dtype=bool)] = np.nan
    return score


def audit_rows(names, attributes, targets, probabilities, score, learnt=None):
    """One dict per cell of the attributes learnt (learnt None: all): known cells by score (most suspect first),
    then NA cells by the confidence of their suggestion. suggested: the value the model gives (calibrated
    probability >= 0.5: the likelier one)."""
    y = np.asarray(targets)
    audited = [k for k in range(len(attributes)) if learnt is None or learnt[k]]
    rows = []
    for i, name in enumerate(names):
        for k in audited:
            attribute = attributes[k]
            p = float(probabilities[i, k])
            rows.append({"image": name, "attribute": attribute, "given": "NA" if y[i, k] < 0 else int(y[i, k]),
                         "suggested": int(p >= 0.5), "probability": p,
                         "score": None if y[i, k] < 0 else float(score[i, k])})
    known = sorted((r for r in rows if r["score"] is not None), key=lambda r: -r["score"])
    unknown = sorted((r for r in rows if r["score"] is None), key=lambda r: -abs(r["probability"] - 0.5))
    return known + unknown


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

def write_audit_csv(path, rows, *, not_audited=""):
    """label_audit.csv; a first line `# not audited: ...` when attributes were left out (pandas reads the file with
    read_csv(path, comment="#"))."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            if not_audited:
                f.write(f"# not audited, not learnt (no better than chance out of fold): {not_audited}\n")
            out = csv.writer(f)
            out.writerow(AUDIT_COLUMNS)
            for r in rows:
                out.writerow([r["image"], r["attribute"], r["given"], r["suggested"], f"{r['probability']:.6f}",
                              "" if r["score"] is None else f"{r['score']:.6f}"])

    atomic_write(path, write)


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
    check_writable(list(outputs.values()))
    options = label_options(args)
    args.train_flags = [*args.train_flags, *label_argv(options)]  # train.py reads the labels as this script does
    refuse_without_oof(args.train_flags)
    check_train_flags(args.train_flags)
    data = audit_data(args.labels, args.images, model=args.model, train_flags=args.train_flags)
    rows = audit_rows(data.names, data.attributes, data.targets, data.probabilities, data.score, data.learnt)
    left = data.not_audited()
    write_audit_csv(outputs["csv"], rows, not_audited=left)
    filled = write_suggested(outputs["labels"], data, confident=args.confident, source=args.labels, options=options)
    log(f"audit of {args.labels} from {data.source}")
    if left:
        log(f"not audited: {left}: not learnt (no better than chance out of fold), so the model has no suspect "
            "and no suggestion for them; their labels are as given")
    log(f"wrote {outputs['csv']} ({len(rows)} cells, the most suspect first) and {outputs['labels']} "
        f"({filled} of {int((data.targets < 0).sum())} NA cells filled at probability {args.confident})")
    for r in rows[:10]:
        if r["score"] is not None:
            log(f"  suspect: {r['image']} {r['attribute']} given {r['given']}, the model says {r['probability']:.2f}")
    return 0


def main(argv=None):
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

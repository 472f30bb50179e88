"""One self-contained HTML page about a trained model: where it fails, why, and which labels look wrong.

    python report.py --model model.pth --labels labels.txt --images images   # a cross-validated run (oof.npz)
    python report.py --model model.pth --labels val_labels.txt --images images --oof none   # a validation split
    python report.py --compare runs/*    # a table of train.py's runs side by side (their metrics.json)

train.py writes report.html beside --out at the end of each run (--no-report skips it). The page holds the run's
settings and data counts, the per-attribute table with its baselines (the numbers of metrics.json), the
precision-recall curves with the thresholds, the loss per epoch, per attribute the most confident mistakes with
Grad-CAM overlays, the label audit's top suspects and NA suggestions, and the images that could not be read.
A cross-validated run is reported on its out-of-fold predictions (oof.npz beside the model: every row scored by
heads that never trained on it), which are also what the audit ranks: nothing is trained here. A validation
split is reported on the model's scores of its validation rows (features from train.py's cache); its audit needs
cross-validation (audit.py). Images are small inlined JPEGs and figures inlined PNGs: no network, no scripts.
"""
import argparse
import base64
import html
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch

from audit import audit_cells, label_quality, ranking
from data_loader import FeatureBatches
from dataset import add_label_flags, label_counts, label_options, load_dataset, load_image
from engine import evaluate, oof_mismatch, read_oof
import calibration
from metrics import NO_POSITIVES, attribute_metrics, verdict_line, verdicts
from model import load_checkpoint, model_from_checkpoint
from tracking import compare_runs
from utils import (Report, UserError, add_runtime_flags, atomic_write, check_writable,
                   keep_freed_memory, log, pick_device, resolve_workers, run_cli)

MISTAKES = 6  # per attribute: its most confident mistakes shown (an attribute not learnt: this many given
#              positives beside as many given negatives instead)
SUSPECTS = 12  # label-audit suspects shown
NA_SHOWN = 12  # NA suggestions shown (the most confident)
THUMB = 128  # long side of a thumbnail, pixels
JPEG_QUALITY = 80


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Write an HTML report of a trained model.")
    p.add_argument("--model", default="model.pth", help="checkpoint written by train.py")
    p.add_argument("--labels", help="labelled set to report on (default: a cross-validated run's own labels file, "
                                    "else the val_labels.txt beside --model)")
    p.add_argument("--images", help="images folder (default: the run's)")
    add_label_flags(p)
    p.add_argument("--out", default="report.html", help="the HTML file")
    p.add_argument("--oof", default="auto", help="the run's out-of-fold predictions: auto (oof.npz beside --model, "
                                                 "when made from --labels) | PATH | none")
    p.add_argument("--metrics", help="metrics.json of the run, for the loss per epoch (default: beside --model)")
    p.add_argument("--cache-dir", help="feature cache folder (default: the run's, from the checkpoint)")
    p.add_argument("--no-cache", action="store_true", help="keep extracted features in memory only")
    p.add_argument("--strict", action="store_true", help="every warning about the input is an error")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="print the runs (folders holding metrics.json) side "
                                                                "by side in one table, then exit; no report")
    add_runtime_flags(p, num_workers="auto")
    return p.parse_args(argv)


class Collected(Report):
    """A Report that also keeps each warning's reason, to list unreadable and missing images on the page."""

    def __init__(self, strict=False):
        super().__init__(strict)
        self.by_reason = {}

    def warn(self, reason, message, fatal=True):
        super().warn(reason, message, fatal)
        self.by_reason.setdefault(reason, []).append(message)


# ---- data and scores ----

def validation_scores(model, ckpt, paths, targets, *, args, device, report):
    """The model's calibrated probabilities and its logits of paths (flip TTA when the run used it) from train.py's
    feature cache, through engine.evaluate as in training's validation; and the ok mask."""
    from feature_cache import cached_features
    from model import flip_tta

    tta = bool(ckpt.get("tta", False))
    cache_dir = args.cache_dir or ckpt["config"].get("cache_dir", ".feature_cache")
    features, rows, ok = cached_features(
        model, paths, backbone=ckpt["backbone"], image_size=ckpt["image_size"], mean=ckpt["mean"], std=ckpt["std"],
        cache_dir=None if args.no_cache else cache_dir, batch_size=args.batch_size,
        num_workers=resolve_workers(args.num_workers, device), device=device,
        amp=ckpt.get("amp", ckpt["config"].get("amp") is True), report=report,
        mirror=np.full(len(paths), tta))
    index = np.flatnonzero(ok)
    if len(index) == 0:
        return np.zeros((0, targets.shape[1]), dtype=np.float32), np.zeros((0, targets.shape[1])), ok
    batches = FeatureBatches(features, rows, index, targets, batch_size=1024, shuffle=False, seed=0,
                             both_views=tta)
    forward = flip_tta(model.head, features=True) if tta else model.head
    logits = evaluate(forward, batches, device=device, logits=True)[0]
    return calibration.apply(logits, calibration.of_facts(ckpt)), logits, ok


def given_examples(y, k, count=MISTAKES, seed=0):
    """Rows of count given positives and count given negatives of attribute k, drawn at random (seeded): what
    the labels call the attribute, for a person to judge, where the model learnt nothing to show."""
    rng = np.random.default_rng(seed)
    picks = []
    for value in (1, 0):
        rows = np.flatnonzero(y[:, k] == value)
        picks.append(np.sort(rng.choice(rows, min(count, len(rows)), replace=False)) if len(rows) else rows)
    return picks


def confident_mistakes(scores, y, thresholds, k, count=MISTAKES):
    """Rows of the known cells of attribute k predicted wrongly, the most confident first."""
    known = y[:, k] >= 0
    predicted = scores[:, k] >= thresholds[k]
    wrong = np.flatnonzero(known & (predicted != (y[:, k] == 1)))
    confidence = np.abs(scores[wrong, k] - y[wrong, k])
    return wrong[np.argsort(-confidence, kind="stable")][:count]


# ---- HTML pieces ----

def esc(x):
    return html.escape(str(x), quote=True)


def num(x, digits=3):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def jpeg_uri(array):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def png_uri(fig):
    from figures import pyplot

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def table(header, rows, table_id):
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def metrics_table(result):
    scored = [r for r in result["attributes"] if r["positives"]]
    chance = float(np.mean([r["prevalence"] for r in scored])) if scored else math.nan
    majority = float(np.mean([r["majority_f1"] for r in scored])) if scored else math.nan
    rows = []
    for r in result["attributes"]:
        ap = num(r["ap"]) if r["positives"] else f"n/a ({esc(NO_POSITIVES.split(';')[0])})"
        rows.append([esc(r["attribute"]), r["positives"], r["negatives"], ap, num(r["prevalence"]),
                     num(r["threshold"]), num(r["f1"]), num(r["precision"]), num(r["recall"]),
                     num(r["majority_f1"])])
    return (table(["attribute", "pos", "neg", "AP", "prev", "thr", "F1", "prec", "recall", "majF1"], rows, "metrics")
            + f'<p id="summary">mAP {num(result["map"])} (chance {num(chance)}) &middot; macro-F1 '
              f'{num(result["macro_f1"])} (majority answer {num(majority)})</p>')


def gallery(cards):
    """cards: (name, thumbnail uri, overlay uri or None, caption html) -> a grid of figures."""
    items = []
    for name, thumb, overlay, caption in cards:
        cam = f'<img src="{overlay}" alt="Grad-CAM of {esc(name)}">' if overlay else ""
        items.append(f'<figure><img src="{thumb}" alt="{esc(name)}">{cam}<figcaption><b>{esc(name)}</b><br>'
                     f'{caption}</figcaption></figure>')
    return f'<div class="gallery">{"".join(items)}</div>' if items else "<p>none</p>"


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1300px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
.gallery{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;border:1px solid #ddd;padding:4px;width:270px}
figure img{margin-right:2px}figcaption{font-size:12px;word-break:break-all}.figs img{max-width:49%}
#settings{display:flex;flex-wrap:wrap;gap:2px 18px;list-style:none;padding:0;font-size:13px}
#settings li{max-width:100%;overflow-wrap:anywhere}#settings span{color:#666}#settings span::after{content:" ="}
td{overflow-wrap:anywhere}"""


# ---- the page ----

class Shown:
    """The (image, attribute) pairs the page shows, with Grad-CAM overlays computed for them all at once."""

    def __init__(self):
        self.pairs = []

    def add(self, path, k):
        self.pairs.append((path, k))
        return len(self.pairs) - 1

    def render(self, model, ckpt, *, device):
        from dataset import eval_transform
        from explain import gradcam
        from figures import display_image, heat_overlay

        transform = eval_transform(ckpt["image_size"], ckpt["mean"], ckpt["std"])
        images = [load_image(path) for path, _ in self.pairs]
        x = torch.stack([transform(im) for im in images]).to(device) if images else torch.zeros(0, 3, 1, 1)
        cams = gradcam(model, x, [k for _, k in self.pairs], backbone=ckpt["backbone"]) if images else []
        self.uris = []
        for image, cam in zip(images, cams):
            small = display_image(image, THUMB)
            self.uris.append((jpeg_uri(small), jpeg_uri(heat_overlay(small, cam))))


def cross_validated(ckpt):
    """Whether train.py cross-validated the run of this checkpoint (the cached path with --folds)."""
    config = ckpt["config"]
    return bool(config.get("folds")) and config.get("unfreeze", "none") == "none" and \
        config.get("augment", "flip") == "flip"


def thresholds_named(ckpt):
    """The thresholds the model predicts with, in words for the headings."""
    mode = ckpt["config"].get("thresholds", "0.5")
    if mode == "tuned":
        return "tuned thresholds (each attribute's F1-best" + (" out of fold)" if cross_validated(ckpt) else
                                                               " on validation)")
    values = sorted({round(float(t), 3) for t in ckpt["thresholds"]})
    return f"threshold {values[0]}" if len(values) == 1 else "thresholds " + ", ".join(map(str, values))


def settings_list(pairs):
    """The run's settings as a wrapping list of name = value (a table of them ran off a 1280-pixel window)."""
    items = "".join(f"<li><span>{k}</span> {v}</li>" for k, v in pairs)
    return f'<ul id="settings">{items}</ul>'


def p_text(p):
    return "n/a" if p is None or math.isnan(p) else f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def verdict_section(found, source):
    """The page's first words: which attributes were learnt, with the numbers that say how sure that is."""
    rows = []
    for v in found:
        interval = f"{num(v['lift'])} [{num(v['lift_low'])}, {num(v['lift_high'])}]"
        rows.append([esc(v["attribute"]), "yes" if v["learnt"] else "<b>NO</b>", num(v["auc"]),
                     p_text(v["p_adjusted"]), interval])
    missed = [v["attribute"] for v in found if not v["learnt"]]
    advice = ("<p><b>Not learnt: " + esc(", ".join(missed)) + ".</b> On images the model never saw it ranks them no "
              "better than chance: their probabilities are the prevalence, their answers the majority's, and the "
              "audit and review.py leave them out. Below, instead of mistakes, each shows given positives beside "
              "given negatives: do the labels follow the images?</p>") if missed else ""
    return (f'<h2 id="verdict">Verdict: {esc(verdict_line(found))}</h2>'
            + table(["attribute", "learnt", "AUC", "p (Holm)", "AP - prev [95% bootstrap]"], rows, "verdicts")
            + f"<p>On {esc(source)}. p: the permutation test of the ranking against the labels shuffled across the "
              "rows (Mann-Whitney), Holm-adjusted over the attributes; learnt where p &lt; 0.05.</p>" + advice)


def build_page(ckpt, model_path, *, eval_data, audit_data, metrics, mistakes, suspects, suggestions, shown,
               problems, run_warnings, figures, found, examples):
    """eval_data: (what, paths, targets); audit_data: (source line or None, names, targets); found: the verdicts;
    examples: per attribute not learnt, its (given positives, given negatives) cards' data."""
    attributes, named = ckpt["attributes"], thresholds_named(ckpt)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Report: {esc(model_path)}"
             f"</title><style>{STYLE}</style></head><body><h1>Report: {esc(model_path)}</h1>",
             verdict_section(found, eval_data[0])]
    pairs = [(esc(k), esc(v)) for k, v in sorted(ckpt["config"].items())] + [
        ("epoch of this model", esc(ckpt.get("epoch"))), ("validation mAP at training", num(ckpt.get("val_map")))]
    parts.append("<h2>Run</h2>" + settings_list(pairs))
    counts_rows = []
    for title, counts in (("training part", ckpt.get("label_counts")), ("report set", label_counts(eval_data[2]))):
        if counts:
            for k, a in enumerate(attributes):
                counts_rows.append([esc(title), esc(a), counts["positive"][k], counts["negative"][k], counts["na"][k]])
    parts.append(f"<h2>Data</h2><p>report set: {len(eval_data[1])} images ({esc(eval_data[0])})"
                 + ("; the audit ranks the same rows" if audit_data[0] is not None else "") + "</p>"
                 + table(["set", "attribute", "positive", "negative", "NA"], counts_rows, "counts"))
    parts.append(f"<h2>Per attribute, {esc(named)}</h2>" + metrics_table(metrics)
                 + "<p>pos/neg: known positives and negatives; prev: prevalence, the AP of a random ranker; majF1: "
                   "the F1 of always answering the majority class. NA cells are ignored.</p>")
    parts.append('<h2>Precision-recall, reliability and loss</h2><div class="figs">'
                 + "".join(f'<img src="{uri}" alt="{esc(alt)}">' for alt, uri in figures) + "</div>"
                 + ("" if len(figures) > 2 else "<p>loss per epoch: n/a (no metrics.json of the run found)</p>"))
    parts.append(f"<h2>Most confident mistakes, {esc(named)}</h2>")
    for k, a in enumerate(attributes):
        if k in examples:  # not learnt: its "mistakes" would be noise
            positives, negatives = ([(name, shown.uris[i][0], None, f"given {given}") for name, given, i in side]
                                    for side in examples[k])
            parts.append(f"<h3>{esc(a)}: not learnt, no mistakes shown</h3><p>Given positives:</p>"
                         + gallery(positives) + "<p>Given negatives:</p>" + gallery(negatives))
            continue
        cards = [(name, *shown.uris[i], f"given {given}, predicted {int(p >= ckpt['thresholds'][k])}, p {p:.3f} "
                  f"(thr {ckpt['thresholds'][k]:.3f})") for name, given, p, i in mistakes[k]]
        parts.append(f"<h3>{esc(a)}</h3>" + gallery(cards))
    if audit_data[0] is None:
        parts.append("<h2>Label audit</h2><p>The audit needs out-of-fold predictions, which a validation split does "
                     "not make: train with cross-validation (the default, --folds 5) or run "
                     "<code>python audit.py</code>.</p>")
    else:
        cards = [(r["image"], *shown.uris[i], f"{esc(r['attribute'])}: given {r['given']}, out-of-fold p "
                  f"{r['probability']:.3f}, score {r['score']:.3f}") for r, i in suspects]
        parts.append(f"<h2>Label audit: top suspects</h2><p>Out-of-fold probabilities: {esc(audit_data[0])}; "
                     "score = 1 - cleanlab label quality (self-confidence) over the known cells of each attribute. "
                     "Check these labels first (<code>python review.py</code> goes through them).</p>" + gallery(cards))
        cards = [(r["image"], *shown.uris[i], f"{esc(r['attribute'])}: NA, suggested {r['suggested']} (p >= 0.5), "
                  f"p {r['probability']:.3f}") for r, i in suggestions]
        parts.append("<h2>NA suggestions, threshold 0.5</h2>" + gallery(cards))
    # The run's own warnings (metrics.json: every image it could not read or find, every skipped line), then
    # what this report met that the run did not.
    mine = [m for reason in ("unreadable image", "image not found") for m in problems.get(reason, [])]
    listed = [[esc(m)] for m in dict.fromkeys([*run_warnings, *mine])]
    parts.append("<h2>Images that could not be read, and the run's other warnings</h2>"
                 + (table(["image or line, and reason"], listed, "unreadable") if listed else "<p>none</p>"))
    parts.append("</body></html>")
    return "\n".join(parts)


def find_oof(args, ckpt):
    """The run's OofFile for --labels and --images, or None (a validation split). A cross-validated model trained
    on every row, so without its out-of-fold predictions there is nothing honest to report: an error."""
    if args.oof == "none":
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(args.model)), "oof.npz") if args.oof == "auto" else args.oof
    if args.oof == "auto" and not os.path.isfile(path):
        if cross_validated(ckpt):
            raise UserError(f"{path}: not found; {args.model} trained on every row of its cross-validated run, so "
                            "only that run's out-of-fold predictions can be reported (run train.py again, or give "
                            "--oof PATH)")
        return None
    oof = read_oof(path)
    why = oof_mismatch(oof, labels_path=args.labels, images=args.images, model=args.model)
    if why is None and list(oof.attributes) != list(ckpt["attributes"]):
        why = f"they name other attributes than {args.model}"
    if why is not None:
        if args.oof != "auto" or cross_validated(ckpt):
            raise UserError(f"{path}: not the out-of-fold predictions of {args.model} on {args.labels}: {why}")
        log(f"report: {path} not used: {why}")
        return None
    return oof


def make_report(args):
    """Everything report.py does; returns the HTML's path."""
    started = time.time()
    ckpt = load_checkpoint(args.model)
    device = pick_device(args.device)
    if args.keep_freed_memory:
        keep_freed_memory(device)
    model = model_from_checkpoint(ckpt, args.model).to(device)
    report = Collected(strict=args.strict)
    attributes = ckpt["attributes"]
    config = ckpt["config"]
    args.images = args.images or config.get("images", "images")
    args.labels = args.labels or (config.get("labels", "labels.txt") if cross_validated(ckpt) else
                                  os.path.join(os.path.dirname(os.path.abspath(args.model)), "val_labels.txt"))
    oof = find_oof(args, ckpt)
    if oof is not None:  # a cross-validated run: every row out of fold, the same numbers as metrics.json
        names, scores, y = list(oof.names), np.asarray(oof.probabilities), np.asarray(oof.targets)
        paths = oof.paths(args.images)
        source = f"oof.npz, the mean of {oof.config.get('repeats', 1)} x {oof.config.get('folds')}-fold " \
                 f"cross-validations at epoch {oof.epochs}"
        audit = (source, names, y)
    else:  # a validation split: the model's own scores of its validation rows
        table_, paths, targets = load_dataset(args.labels, args.images, report, options=label_options(args))
        if targets.shape[1] != len(attributes):
            raise UserError(f"{args.labels}: {targets.shape[1]} attributes, but {args.model} predicts "
                            f"{len(attributes)}")
        scores, logits, ok = validation_scores(model, ckpt, paths, targets, args=args, device=device, report=report)
        names = [n for n, good in zip(table_.names, ok) if good]
        paths = [p for p, good in zip(paths, ok) if good]
        y = targets.numpy()[ok]
        audit = (None, [], np.zeros((0, len(attributes)), dtype=np.int8))
    result = attribute_metrics(scores, y, ckpt["thresholds"], attributes)
    # The run's verdicts where the report shows its out-of-fold predictions; else the test on the rows shown, on the
    # model's own ranking (its logits: train.py's validation verdict on the same rows, the same numbers).
    found = oof.verdicts if oof is not None else verdicts(logits, y, attributes)
    learnt = [v["learnt"] for v in found]
    shown = Shown()
    mistakes = [[(names[i], int(y[i, k]), float(scores[i, k]), shown.add(paths[i], k))
                 for i in confident_mistakes(scores, y, ckpt["thresholds"], k)] if learnt[k] else []
                for k in range(len(attributes))]
    examples = {k: [[(names[i], int(y[i, k]), shown.add(paths[i], k)) for i in side] for side in given_examples(y, k)]
                for k in range(len(attributes)) if not learnt[k]}
    suspects, suggestions = [], []
    if audit[0] is not None:
        # The top of the audit's ranking only: its first cells are found without sorting the rest.
        score = label_quality(scores, y, learnt)
        for kind, count, shown_here in (("known", SUSPECTS, suspects), ("na", NA_SHOWN, suggestions)):
            cells = ranking(y, scores, score, learnt, kind=kind, top=count)
            for cell, r in zip(cells.tolist(), audit_cells(cells, names, attributes, y, scores, score)):
                shown_here.append((r, shown.add(paths[cell // len(attributes)], cell % len(attributes))))
    shown.render(model, ckpt, device=device)
    run = read_run(args.metrics or os.path.join(os.path.dirname(os.path.abspath(args.model)), "metrics.json"))
    history = run.get("history") or []
    from figures import epoch_loss_figure, pr_figure, reliability_figure

    figures = [("precision-recall curves", png_uri(pr_figure(scores, y, ckpt["thresholds"], attributes))),
               ("reliability diagram", png_uri(reliability_figure(scores, y, attributes)))]
    if history:
        figures.append(("loss per epoch", png_uri(epoch_loss_figure(history))))
    page = build_page(ckpt, args.model, eval_data=(args.labels, paths, y), audit_data=audit, metrics=result,
                      mistakes=mistakes, suspects=suspects, suggestions=suggestions, shown=shown,
                      problems=report.by_reason, run_warnings=(run.get("warnings") or {}).get("messages", []),
                      figures=figures, found=found, examples=examples)
    atomic_write(args.out, lambda tmp: write_text(tmp, page))
    log(f"wrote {args.out} ({len(page) / 1e6:.2f} MB, {len(shown.pairs)} Grad-CAM overlays, "
        f"{time.time() - started:.1f}s)")
    return args.out


def after_training(args, outputs, *, workers, cross_validated):
    """train.py's report.html beside its --out: a cross-validated run on its out-of-fold predictions (oof.npz),
    a validation split on its validation rows. A report that fails is a warning: the run's own outputs are
    written and stay."""
    try:
        make_report(parse_args([
            "--model", outputs["best"], "--labels", args.labels if cross_validated else outputs["val_labels"],
            "--images", args.images, "--oof", outputs["oof"] if cross_validated else "none",
            "--metrics", outputs["metrics"], "--out", outputs["report"],
            "--cache-dir", args.cache_dir, *(["--no-cache"] if args.no_cache else []),
            "--batch-size", str(args.batch_size), "--num-workers", str(workers), "--device", args.device,
            *([] if args.keep_freed_memory else ["--no-keep-freed-memory"])]))
    except UserError as e:
        log(f"warning: {outputs['report']} not written: {e}")


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def read_run(path):
    """The run's metrics.json (its loss per epoch, its warnings), or {} when there is none."""
    try:
        with open(path) as f:
            run = json.load(f)
        return run if isinstance(run, dict) else {}
    except (OSError, ValueError):
        return {}


def run(args):
    if args.compare:
        print(compare_runs(args.compare))
        return 0
    check_writable([args.out])
    make_report(args)
    return 0


def main(argv=None):
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

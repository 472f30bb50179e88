"""One self-contained HTML page about a trained model: where it fails, why, and which labels look wrong.

    python report.py --model model.pth --labels val_labels.txt --images images --out report.html
    python report.py ... --audit-labels labels.txt     # audit every labelled image, not only --labels

train.py writes report.html beside --out at the end of each run (--no-report skips it). The page holds the run's
settings and data counts, the per-attribute table with its baselines (the numbers of metrics.json), the
precision-recall curves with the thresholds, the loss per epoch, per attribute the most confident mistakes on
--labels with Grad-CAM overlays, the label audit's top suspects and NA suggestions (audit.py, out-of-fold on
--audit-labels), and the images that could not be read. Images are small inlined JPEGs and figures inlined PNGs:
no network, no scripts. Features come from train.py's cache; Grad-CAM runs only for the images shown.
"""
import argparse
import base64
import html
import io
import math
import os
import sys
import time

import numpy as np
import torch

import audit
import train
from data_loader import FeatureBatches
from dataset import label_counts, load_dataset, load_image
from metrics import NO_POSITIVES, attribute_metrics
from model import load_checkpoint, model_from_checkpoint
from utils import (Report, UserError, add_runtime_flags, atomic_write, check_writable, keep_freed_memory, log,
                   pick_device, resolve_workers, run_cli)

MISTAKES = 6  # per attribute: its most confident mistakes shown
SUSPECTS = 12  # label-audit suspects shown
NA_SHOWN = 12  # NA suggestions shown (the most confident)
THUMB = 128  # long side of a thumbnail, pixels
JPEG_QUALITY = 80


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Write an HTML report of a trained model.")
    p.add_argument("--model", default="model.pth", help="checkpoint written by train.py")
    p.add_argument("--labels", default="val_labels.txt", help="labelled set to report on (validation)")
    p.add_argument("--images", default="images", help="images folder")
    p.add_argument("--out", default="report.html", help="the HTML file")
    p.add_argument("--audit-labels", help="labels the audit scores (default: --labels)")
    p.add_argument("--out-of-fold", action="store_true",
                   help="score --labels with the audit's out-of-fold probabilities (for a cross-validated run, "
                        "whose model trained on every row)")
    p.add_argument("--metrics", help="metrics.json of the run, for the loss per epoch (default: beside --model)")
    p.add_argument("--folds", type=int, default=audit.FOLDS, help="heads of the label audit")
    p.add_argument("--cache-dir", default=train.CACHE_DIR, help="feature cache folder (shared with train.py)")
    p.add_argument("--no-cache", action="store_true", help="keep extracted features in memory only")
    p.add_argument("--strict", action="store_true", help="every warning about the input is an error")
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

def features_of(model, ckpt, paths, *, args, device, report):
    """View-0 features (n, D) of paths through train.py's cache (the same numbers training validated on) and
    the ok mask."""
    from feature_cache import cached_features

    features, rows, ok = cached_features(
        model, paths, backbone=ckpt["backbone"], image_size=ckpt["image_size"], mean=ckpt["mean"], std=ckpt["std"],
        cache_dir=None if args.no_cache else args.cache_dir, batch_size=args.batch_size,
        num_workers=resolve_workers(args.num_workers, device), device=device,
        amp=ckpt.get("amp", ckpt["config"].get("amp") is True), report=report,
        mirror=np.zeros(len(paths), dtype=bool))
    return np.asarray(features[np.where(ok, rows, 0), 0]), ok


def head_scores(model, features, targets, device):
    """Probabilities of the head on features, through train.evaluate as in training's validation."""
    from train import evaluate

    n = len(features)
    batches = FeatureBatches(np.stack([features, features], 1), np.arange(n), np.arange(n), targets,
                             batch_size=1024, shuffle=False, seed=0)
    scores, index, _ = evaluate(model.head, batches, device=device)
    return scores[np.argsort(index)] if n else np.zeros((0, targets.shape[1]), dtype=np.float32)


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
    rows = []
    for r in result["attributes"]:
        ap = num(r["ap"]) if r["positives"] else f"n/a ({esc(NO_POSITIVES.split(';')[0])})"
        rows.append([esc(r["attribute"]), r["positives"], r["negatives"], ap, num(r["prevalence"]),
                     num(r["threshold"]), num(r["f1"]), num(r["precision"]), num(r["recall"]),
                     num(r["majority_f1"])])
    return (table(["attribute", "pos", "neg", "AP", "prev", "thr", "F1", "prec", "recall", "majF1"], rows, "metrics")
            + f'<p id="summary">mAP {num(result["map"])} &middot; macro-F1 {num(result["macro_f1"])}</p>')


def gallery(cards):
    """cards: (name, thumbnail uri, overlay uri, caption html) -> a grid of figures."""
    items = []
    for name, thumb, overlay, caption in cards:
        items.append(f'<figure><img src="{thumb}" alt="{esc(name)}"><img src="{overlay}" alt="Grad-CAM of '
                     f'{esc(name)}"><figcaption><b>{esc(name)}</b><br>{caption}</figcaption></figure>')
    return f'<div class="gallery">{"".join(items)}</div>' if items else "<p>none</p>"


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1300px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
.gallery{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;border:1px solid #ddd;padding:4px;width:270px}
figure img{margin-right:2px}figcaption{font-size:12px;word-break:break-all}.figs img{max-width:49%}"""


# ---- the page ----

class Shown:
    """The (image, attribute) pairs the page shows, with Grad-CAM overlays computed for them all at once."""

    def __init__(self):
        self.pairs = []

    def add(self, path, k):
        self.pairs.append((path, k))
        return len(self.pairs) - 1

    def render(self, model, ckpt):
        from dataset import eval_transform
        from explain import gradcam
        from figures import display_image, heat_overlay

        transform = eval_transform(ckpt["image_size"], ckpt["mean"], ckpt["std"])
        images = [load_image(path) for path, _ in self.pairs]
        device = next(model.parameters()).device
        x = torch.stack([transform(im) for im in images]).to(device) if images else torch.zeros(0, 3, 1, 1)
        cams = gradcam(model, x, [k for _, k in self.pairs], backbone=ckpt["backbone"]) if images else []
        self.uris = []
        for image, cam in zip(images, cams):
            small = display_image(image, THUMB)
            self.uris.append((jpeg_uri(small), jpeg_uri(heat_overlay(small, cam))))


def build_page(ckpt, model_path, *, eval_data, audit_data, metrics, mistakes, suspects, suggestions, shown,
               problems, figures):
    attributes = ckpt["attributes"]
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Report: {esc(model_path)}"
             f"</title><style>{STYLE}</style></head><body><h1>Report: {esc(model_path)}</h1>"]
    config = ckpt["config"]
    pairs = [(esc(k), esc(v)) for k, v in sorted(config.items())] + [
        ("epoch of this model", esc(ckpt.get("epoch"))), ("validation mAP at training", num(ckpt.get("val_map")))]
    pairs += [("", "")] * (-len(pairs) % 4)
    parts.append("<h2>Run</h2>" + table(["setting", "value"] * 4, [sum(map(list, pairs[i:i + 4]), [])
                                                                  for i in range(0, len(pairs), 4)], "settings"))
    counts_rows = []
    for title, counts in (("training part", ckpt.get("label_counts")), ("report set", label_counts(eval_data[2])),
                          ("audit set", label_counts(audit_data[2]))):
        if counts:
            for k, a in enumerate(attributes):
                counts_rows.append([esc(title), esc(a), counts["positive"][k], counts["negative"][k], counts["na"][k]])
    parts.append(f"<h2>Data</h2><p>report set: {len(eval_data[1])} images ({esc(eval_data[0])}); audit set: "
                 f"{len(audit_data[1])} images ({esc(audit_data[0])})</p>"
                 + table(["set", "attribute", "positive", "negative", "NA"], counts_rows, "counts"))
    parts.append("<h2>Per attribute, tuned thresholds</h2>" + metrics_table(metrics)
                 + "<p>pos/neg: known positives and negatives; prev: prevalence, the AP of a random ranker; majF1: "
                   "the F1 of always answering the majority class. NA cells are ignored.</p>")
    parts.append('<h2>Precision-recall and loss</h2><div class="figs">'
                 + "".join(f'<img src="{uri}" alt="{esc(alt)}">' for alt, uri in figures) + "</div>"
                 + ("" if len(figures) > 1 else "<p>loss per epoch: n/a (no metrics.json of the run found)</p>"))
    parts.append("<h2>Most confident mistakes</h2>")
    for k, a in enumerate(attributes):
        cards = [(name, *shown.uris[i], f"given {given}, predicted {int(p >= ckpt['thresholds'][k])}, p {p:.3f} "
                  f"(thr {ckpt['thresholds'][k]:.3f})") for name, given, p, i in mistakes[k]]
        parts.append(f"<h3>{esc(a)}</h3>" + gallery(cards))
    cards = [(r["image"], *shown.uris[i], f"{esc(r['attribute'])}: given {r['given']}, out-of-fold p "
              f"{r['probability']:.3f}, score {r['score']:.3f}") for r, i in suspects]
    parts.append("<h2>Label audit: top suspects</h2><p>Out-of-fold probabilities from "
                 f"{audit_data[3]} heads; score = 1 - cleanlab label quality (self-confidence) over the known cells "
                 "of each attribute. Check these labels first.</p>" + gallery(cards))
    cards = [(r["image"], *shown.uris[i], f"{esc(r['attribute'])}: NA, suggested {r['suggested']}, p "
              f"{r['probability']:.3f}") for r, i in suggestions]
    parts.append("<h2>NA suggestions</h2>" + gallery(cards))
    listed = [[esc(m)] for reason in ("unreadable image", "image not found") for m in problems.get(reason, [])]
    parts.append("<h2>Images that could not be read</h2>"
                 + (table(["image and reason"], listed, "unreadable") if listed else "<p>none</p>"))
    parts.append("</body></html>")
    return "\n".join(parts)


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
    eval_table, eval_paths, eval_y = load_dataset(args.labels, args.images, report)
    audit_labels = args.audit_labels or args.labels
    audit_table, audit_paths, audit_y = load_dataset(audit_labels, args.images, report)
    for path, k in ((args.labels, len(eval_y[0])), (audit_labels, len(audit_y[0]))):
        if k != len(attributes):
            raise UserError(f"{path}: {k} attributes, but {args.model} predicts {len(attributes)}")
    union = list(dict.fromkeys(eval_paths + audit_paths))
    features, ok = features_of(model, ckpt, union, args=args, device=device, report=report)
    where = {p: i for i, p in enumerate(union)}
    e_ok = np.array([ok[where[p]] for p in eval_paths], dtype=bool)
    eval_paths, eval_y = [p for p, good in zip(eval_paths, e_ok) if good], eval_y[torch.as_tensor(e_ok)]
    eval_names = [n for n, good in zip(eval_table.names, e_ok) if good]
    a_ok = np.array([ok[where[p]] for p in audit_paths], dtype=bool)
    a_index = np.flatnonzero(a_ok)
    names = [audit_table.names[i] for i in a_index]
    a_y = audit_y[torch.as_tensor(a_ok)]
    folds = min(args.folds, len(a_index))
    probabilities = audit.out_of_fold(features[[where[audit_paths[i]] for i in a_index]], a_y, folds=folds) \
        if folds >= 2 else np.full(a_y.shape, 0.5, dtype=np.float32)
    if args.out_of_fold:  # a cross-validated run: every row trained the model, so score each out of fold
        by_path = dict(zip([audit_paths[i] for i in a_index], probabilities))
        scores = np.array([by_path[p] for p in eval_paths], dtype=np.float32)
    else:
        scores = head_scores(model, features[[where[p] for p in eval_paths]], eval_y, device)
    y = eval_y.numpy()
    result = attribute_metrics(scores, y, ckpt["thresholds"], attributes)
    shown = Shown()
    mistakes = [[(eval_names[i], int(y[i, k]), float(scores[i, k]),
                  shown.add(eval_paths[i], k)) for i in confident_mistakes(scores, y, ckpt["thresholds"], k)]
                for k in range(len(attributes))]
    rows = audit.audit_rows(names, attributes, a_y, probabilities, audit.label_quality(probabilities, a_y))
    paths_by_name = dict(zip(names, [audit_paths[i] for i in a_index]))
    suspects = [(r, shown.add(paths_by_name[r["image"]], attributes.index(r["attribute"])))
                for r in [r for r in rows if r["score"] is not None][:SUSPECTS]]
    suggestions = [(r, shown.add(paths_by_name[r["image"]], attributes.index(r["attribute"])))
                   for r in [r for r in rows if r["score"] is None][:NA_SHOWN]]
    shown.render(model, ckpt)
    history = read_history(args.metrics or os.path.join(os.path.dirname(os.path.abspath(args.model)), "metrics.json"))
    from figures import epoch_loss_figure, pr_figure

    figures = [("precision-recall curves", png_uri(pr_figure(scores, y, ckpt["thresholds"], attributes)))]
    if history:
        figures.append(("loss per epoch", png_uri(epoch_loss_figure(history))))
    page = build_page(ckpt, args.model, eval_data=(args.labels, eval_paths, eval_y),
                      audit_data=(audit_labels, names, a_y, folds), metrics=result,
                      mistakes=mistakes, suspects=suspects, suggestions=suggestions, shown=shown,
                      problems=report.by_reason, figures=figures)
    atomic_write(args.out, lambda tmp: write_text(tmp, page))
    log(f"wrote {args.out} ({len(page) / 1e6:.2f} MB, {len(shown.pairs)} Grad-CAM overlays, "
        f"{time.time() - started:.1f}s)")
    return args.out


def after_training(args, outputs, *, workers, cross_validated):
    """train.py's report.html beside its --out: the best model on the validation part (cross_validated: every row,
    scored out of fold), the audit on every label. A report that fails is a warning: the run's own outputs are
    written and stay."""
    try:
        make_report(parse_args([
            "--model", outputs["best"], "--labels", args.labels if cross_validated else outputs["val_labels"],
            "--images", args.images, *(["--out-of-fold", "--folds", str(args.folds)] if cross_validated else []),
            "--audit-labels", args.labels, "--metrics", outputs["metrics"], "--out", outputs["report"],
            "--cache-dir", args.cache_dir, *(["--no-cache"] if args.no_cache else []),
            "--batch-size", str(args.batch_size), "--num-workers", str(workers), "--device", args.device,
            *([] if args.keep_freed_memory else ["--no-keep-freed-memory"])]))
    except UserError as e:
        log(f"warning: {outputs['report']} not written: {e}")


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def read_history(path):
    import json

    try:
        with open(path) as f:
            return json.load(f).get("history") or []
    except (OSError, ValueError):
        return []


def run(args):
    check_writable([args.out])
    make_report(args)
    return 0


def main(argv=None):
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

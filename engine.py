"""The engine below train.py, report.py and audit.py: the one training loop, the cross-validation and the
out-of-fold predictions it makes, and oof.npz, the file that carries them to the report, the audit and review.py.

Nothing here reads a command line: train.py wires it (`python train.py`), and every setting arrives as train.py's
argparse namespace (`args`), the recipe of the run. Nothing here imports train.py, report.py or audit.py.
"""
import hashlib
import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

import distributed
from data_loader import fold_indices
from loss import make_loss, pos_weights
from metrics import attribute_metrics, macro_f1
from model import build_head, flip_tta, set_dropout_generator
from utils import Progress, UserError, amp_context, atomic_write, file_sha256, log


# ---- the loop: one for both paths (cached features and images) and for every head of the cross-validation ----

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


def schedule(args, *, steps_per_epoch, epochs):
    """The learning-rate factor of each optimizer step of a run of this many epochs."""
    total, warmup = steps_per_epoch * epochs, int(args.warmup_epochs * steps_per_epoch)
    return lambda step: lr_factor(step, schedule=args.scheduler, total_steps=total, warmup_steps=warmup)


def train_one_epoch(forward, batches, *, loss_fn, optimizer, lr_at, first_step, device, stop=None, label="train"):
    """One pass over batches of (indices, x, y); returns (the loss of each optimizer step, images seen). Ends after
    the step in progress when stop.requested (Ctrl-C). label: the progress bar's (None: no bar)."""
    losses, seen = [], 0
    bar = Progress(batches.num_images, label) if label else None
    for indices, x, y in batches:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_at(first_step + len(losses))
        loss = loss_fn(forward(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        seen += len(indices)
        if bar:
            bar(len(indices), f"loss {losses[-1]:.4f}")
        if stop is not None and stop.requested:
            break
    if bar:
        bar.close()
    return losses, seen


@torch.inference_mode()
def evaluate(forward, batches, *, device, loss_fn=None, logits=False):
    """Probabilities (n, K) of the images batches yields (their logits with logits=True), their indices, and the
    mean loss (None without loss_fn)."""
    logits, indices, targets = [], [], []
    for index, x, y in batches:
        logits.append(forward(x.to(device, non_blocking=True)).float())
        indices.append(index)
        targets.append(y)
    if getattr(batches, "sharded", False):  # each rank scored its share: every rank gets all, in index order
        logits, indices, targets = distributed.gather_batches(logits, indices, targets, device=device)
    if not logits:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64), None
    out = torch.cat(logits)
    loss = loss_fn(out, torch.cat(targets).to(device)).item() if loss_fn is not None else None
    return (out if logits else torch.sigmoid(out)).cpu().numpy(), np.concatenate(indices), loss


def image_forward(model, *, device, amp):
    """The whole model on image batches (channels_last; the backbone under bf16 autocast with --amp)."""
    def forward(x):
        with amp_context(device, amp):
            return model(x.contiguous(memory_format=torch.channels_last)).float()

    return forward


def make_loss_for(args, targets):
    """The run's loss with pos_weight = negatives / positives of these training rows."""
    return make_loss(args.loss, pos_weights(targets)[0], focal_gamma=args.focal_gamma, focal_alpha=args.focal_alpha,
                     asl_gamma_neg=args.asl_gamma_neg, asl_gamma_pos=args.asl_gamma_pos, asl_clip=args.asl_clip)


def make_optimizer(head, args, backbone=None):
    groups = [{"params": list(head.parameters()), "base_lr": args.lr}]
    backbone_params = [p for p in backbone.parameters() if p.requires_grad] if backbone is not None else []
    if backbone_params:
        groups.append({"params": backbone_params, "base_lr": args.backbone_lr})
    for group in groups:
        group["lr"] = group["base_lr"]
    params = [p for g in groups for p in g["params"]]
    # fused: one pass over each tensor instead of a dozen; a head's step on cached features is half as long
    # (3.5 vs 7.0 ms at 2048 x 512, 1 thread, docs/speed.md). It takes float tensors on the CPU or a GPU only.
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, weight_decay=args.weight_decay, fused=fused or None)


def pick_thresholds(mode, scores, y, attributes):
    """0.5 for every attribute, or (--thresholds tuned) each attribute's F1-best on these scores; and notes."""
    if mode == "0.5":
        return [0.5] * len(attributes), []
    result = attribute_metrics(scores, y, None, attributes)
    return [r["threshold"] for r in result["attributes"]], result["notes"]


# ---- cross-validation: every row scored out of fold, repeated with other fold assignments ----

@dataclass
class OutOfFold:
    """The cross-validation in progress: the fold of each row in each repeat, each repeat's out-of-fold
    probabilities per epoch, and which heads are done. A Ctrl-C keeps it in model_last.pth (to_checkpoint) and
    --resume trains only the heads not done; each head depends on its own seed alone, so the result is the
    uninterrupted one."""
    folds: np.ndarray  # (n, repeats) int64: the fold of each row in each repeat
    scores: np.ndarray  # (repeats, epochs, n, K) float32: each row's logits from the head that held it out
    done: np.ndarray  # (repeats x folds,) bool, repeat-major: the heads trained and scored
    seconds: float = 0.0  # time spent so far (for the log)

    @property
    def heads_done(self):
        return int(self.done.sum())

    def to_checkpoint(self):
        return {"folds": torch.from_numpy(self.folds), "scores": torch.from_numpy(self.scores),
                "done": torch.from_numpy(self.done), "seconds": float(self.seconds)}

    @classmethod
    def from_checkpoint(cls, saved):
        return cls(folds=saved["folds"].numpy(), scores=saved["scores"].numpy().copy(),
                   done=saved["done"].numpy().copy(), seconds=float(saved["seconds"]))


@dataclass
class CrossValidation:
    """What the cross-validation found: the epochs and thresholds of the final head, the verdict of each attribute
    (learnt or not), the calibration of the final head's logits, and the out-of-fold probabilities (calibrated, the
    mean over the repeats at the chosen epoch) that the metrics, report and audit read. The mean of R repeats
    scores each row by R heads at once, an ensemble: repeat_maps says what one cross-validation alone gives, the
    closer estimate of the single final head."""
    index: np.ndarray  # (n,) the rows of the full set that were cross-validated
    probabilities: np.ndarray  # (n, K) float32, calibrated out of fold (calibration.cross_fit)
    folds: np.ndarray  # (n, repeats)
    epochs: int  # the epoch (1-based) chosen by train.py's --epoch-rule: the final head trains this many
    history: list  # per epoch: {"epoch", "loss", "map", "map_se", "macro_f1", "ap"} out of fold
    repeat_maps: list = field(default_factory=list)  # per repeat: its own out-of-fold mAP at the chosen epoch
    thresholds: list = field(default_factory=list)  # on the calibrated scale
    notes: list = field(default_factory=list)
    verdicts: list = field(default_factory=list)  # per attribute: metrics.verdicts' row (learnt, p_value, ...)
    calibration: dict = field(default_factory=dict)  # {"slope": [K], "intercept": [K]} of the final head

    @property
    def learnt(self):
        return [bool(v["learnt"]) for v in self.verdicts]

    def to_checkpoint(self):
        """Plain tensors and strings (model_last.pth loads with weights_only=True)."""
        return {"probabilities": torch.from_numpy(self.probabilities), "folds": torch.from_numpy(self.folds),
                "epochs": self.epochs, "history": json.dumps(self.history), "repeat_maps": json.dumps(self.repeat_maps),
                "thresholds": [float(t) for t in self.thresholds], "notes": [str(n) for n in self.notes],
                "verdicts": json.dumps(self.verdicts), "calibration": json.dumps(self.calibration)}

    @classmethod
    def from_checkpoint(cls, saved, index):
        if len(saved["probabilities"]) != len(index):
            raise UserError("the run being resumed cross-validated other rows: the labels or images changed; "
                            "start a new run")
        return cls(index=index, probabilities=saved["probabilities"].numpy(), folds=saved["folds"].numpy(),
                   epochs=int(saved["epochs"]), history=json.loads(saved["history"]),
                   repeat_maps=json.loads(saved["repeat_maps"]),
                   thresholds=list(saved["thresholds"]), notes=list(saved["notes"]),
                   verdicts=json.loads(saved["verdicts"]), calibration=json.loads(saved["calibration"]))


def head_seed(seed, repeat, fold, folds):
    return seed * 1_000 + repeat * folds + fold


def start_out_of_fold(targets, *, folds, repeats, epochs, seed):
    """A new OutOfFold: repeat r's folds are fold_indices with seed (seed, r), so each repeat splits differently."""
    assignment = np.stack([fold_indices(targets, folds, seed * 1_000 + r) for r in range(repeats)], 1)
    return OutOfFold(folds=assignment, done=np.zeros(repeats * folds, dtype=bool),
                     scores=np.zeros((repeats, epochs, len(targets), targets.shape[1]), dtype=np.float32))


def out_of_fold(batches, index, targets, *, args, feature_dim, device, state, stop=None, workers=None):
    """Train the heads not yet done of state's first args.repeats x args.folds, each on the other folds of its
    repeat through train_one_epoch (the run's own head, loss, optimizer and schedule), each scoring its own fold
    after every epoch (flip TTA with --tta). batches(rows, train, seed) gives the batches of those rows. On a CPU
    the heads train side by side, one a core (workers; default: the cores, under torchrun a share of them): each
    step's matrices are too small for two threads to share, and each head is repeatable alone (its own seed for
    the initial weights, the dropout masks and the batch order), so the scores are those of one head after the
    other. Returns True when every head is done, False if Ctrl-C stopped it (state holds the heads done)."""
    todo = [h for h in range(args.repeats * args.folds) if not state.done[h]]
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = 1 if device.type != "cpu" else max(1, cores // distributed.world_size())
    started, building = time.time(), threading.Lock()

    def run(h):
        repeat, f = divmod(h, args.folds)
        seed, fold = head_seed(args.seed, repeat, f, args.folds), state.folds[:, repeat]
        if stop is not None and stop.requested:
            return None
        with building:  # the initial weights come from torch's one global generator, seeded for this head
            torch.manual_seed(seed)
            head = build_head(args.head, feature_dim, targets.shape[1], hidden=args.hidden,
                              dropout=args.dropout).to(device)
        if device.type == "cpu":
            set_dropout_generator(head, torch.Generator().manual_seed(seed))
        train_rows, held = index[fold != f], np.flatnonzero(fold == f)
        train_batches, held_batches = batches(train_rows, True, seed), batches(index[held], False, 0)
        optimizer = make_optimizer(head, args)
        lr_at = schedule(args, steps_per_epoch=len(train_batches), epochs=args.epochs)
        forward = flip_tta(head, features=True) if args.tta else head
        loss_fn = make_loss_for(args, targets[train_rows]).to(device)
        scores = np.zeros((args.epochs, len(held), targets.shape[1]), dtype=np.float32)
        for epoch in range(args.epochs):
            train_batches.set_epoch(epoch)
            head.train()
            train_one_epoch(head, train_batches, loss_fn=loss_fn, optimizer=optimizer, lr_at=lr_at,
                            first_step=epoch * len(train_batches), device=device, stop=stop, label=None)
            if stop is not None and stop.requested:
                return None
            head.eval()
            if len(held):  # in the order of index[held]: FeatureBatches keeps the order it is given
                scores[epoch] = evaluate(forward, held_batches, device=device, logits=True)[0]
        return held, scores

    bar = Progress(len(todo), "cross-validation heads")
    with ThreadPoolExecutor(max(1, min(workers, len(todo) or 1))) as pool:
        futures = [pool.submit(run, h) for h in todo]
        for h, future in zip(todo, futures):  # in head order: the log and the state do not depend on timing
            result = future.result()
            if result is None:
                continue
            repeat, f = divmod(h, args.folds)
            held, scores = result
            state.scores[repeat][:, held] = scores
            state.done[h] = True
            bar(1)
            if state.done[repeat * args.folds:(repeat + 1) * args.folds].all() and f == args.folds - 1:
                sizes = np.bincount(state.folds[:, repeat])
                log(f"repeat {repeat + 1}/{args.repeats}: {args.folds} heads of {args.epochs} epochs, {sizes.min()}-"
                    f"{sizes.max()} rows held out each, {state.seconds + time.time() - started:.1f}s in all")
    bar.close()
    state.seconds += time.time() - started
    return bool(state.done[:args.repeats * args.folds].all())


EPOCH_RULES = ("1se", "map", "loss")  # train.py's EPOCH_RULE says what each is and what was measured


def oof_history(logits, y, attributes, loss_fn, folds):
    """Per epoch the out-of-fold loss (the mean over the repeats of the run's loss on each repeat's logits), the
    metrics of the mean probability over the repeats, and the standard error of the mAP: the spread of the heads'
    own mAPs on their held-out folds over sqrt(heads). logits: (repeats, epochs, n, K); folds (n, repeats)."""
    history, target = [], torch.from_numpy(np.asarray(y))
    for epoch in range(logits.shape[1]):
        z = logits[:, epoch]
        with torch.no_grad():
            loss = float(np.mean([loss_fn(torch.from_numpy(zr), target).item() for zr in z]))
        mean = sigmoid(z).mean(0)
        result = attribute_metrics(mean, y, None, attributes)
        heads = [attribute_metrics(sigmoid(z[r][held]), y[held], None, attributes)["map"]
                 for r in range(len(z)) for held in (folds[:, r] == f for f in np.unique(folds[:, r]))]
        heads = [m for m in heads if not math.isnan(m)]
        history.append({"epoch": epoch + 1, "loss": loss, "map": result["map"],
                        "map_se": float(np.std(heads, ddof=1) / math.sqrt(len(heads))) if len(heads) > 1 else 0.0,
                        "macro_f1": macro_f1(mean, y, [0.5] * len(attributes)),
                        "ap": [r["ap"] for r in result["attributes"]]})
    return history


def choose_epoch(history, rule="1se"):
    """The epoch (0-based) the rule picks. "1se": the first epoch whose out-of-fold mAP is within one standard
    error of the best one (the one-standard-error rule of Breiman et al. and of glmnet's lambda.1se: the largest
    of 30 noisy numbers is not taken for signal); "map": the best mAP; "loss": the lowest loss."""
    maps = np.array([h["map"] for h in history], dtype=np.float64)
    if rule == "loss":
        losses = np.array([h["loss"] for h in history], dtype=np.float64)
        return 0 if np.isnan(losses).all() else int(np.nanargmin(losses))
    if np.isnan(maps).all():
        return 0
    best = int(np.nanargmax(maps))
    if rule == "map":
        return best
    return int(np.flatnonzero(maps >= maps[best] - history[best]["map_se"])[0])


def calibrated_thresholds(mode, probabilities, y, calibration, learnt, attributes):
    """The thresholds on the calibrated scale, and notes. "0.5": where the head's own sigmoid is 0.5 (the balance
    pos_weight gives the loss), that is sigmoid(intercept): the same decisions as before calibration. "tuned": each
    attribute's F1-best cut on the calibrated out-of-fold probabilities. An attribute not learnt: 0.5 on the
    calibrated scale, where its probability is its prevalence: the majority answer."""
    if mode == "0.5":
        chosen, notes = [float(sigmoid(b)) for b in calibration["intercept"]], []
    else:
        chosen, notes = pick_thresholds(mode, probabilities, y, attributes)
    return [t if ok and a > 0 else 0.5 for t, ok, a in zip(chosen, learnt, calibration["slope"])], notes


@dataclass
class Judged:
    """The verdicts, calibration and thresholds of a model from predictions of rows it never trained on."""
    probabilities: np.ndarray  # (n, K) calibrated, each fold by a calibration fitted on the other folds
    raw: np.ndarray  # (n, K) the mean of the sets' own probabilities, the verdict's scores
    verdicts: list  # metrics.verdicts' rows
    calibration: dict  # fitted on every row: the model's
    thresholds: list  # on the calibrated scale
    notes: list

    @property
    def learnt(self):
        return [bool(v["learnt"]) for v in self.verdicts]


def judge(logits, y, folds, *, attributes, thresholds, resamples=None):
    """logits (R, n, K): R sets of held-out logits of the same rows (the repeats), folds (n, R) the folds they were
    held out in (None: a validation split, whose rows calibrate the model itself; its probabilities are then the
    model's, in-sample for the calibration's 2 numbers an attribute, and evaluate.py reproduces them). The verdict
    is taken on the mean probability over the sets (ranks do not need calibration); the calibration of the model is
    fitted on every row, R points a row (the model is one head, like each set's)."""
    from calibration import apply, cross_fit, fit
    from metrics import RESAMPLES, verdicts

    raw = sigmoid(logits).mean(0)
    found = verdicts(raw, y, attributes, resamples=RESAMPLES if resamples is None else resamples)
    learnt = [v["learnt"] for v in found]
    calibration = fit(logits.reshape(-1, y.shape[1]), np.tile(y, (len(logits), 1)), learnt)
    probabilities = apply(logits[0], calibration) if folds is None else cross_fit(logits, y, folds, learnt)
    chosen, notes = calibrated_thresholds(thresholds, probabilities, y, calibration, learnt, attributes)
    return Judged(probabilities=probabilities, raw=raw, verdicts=found, calibration=calibration, thresholds=chosen,
                  notes=notes)


def finish_out_of_fold(state, index, targets, *, attributes, thresholds, loss_fn, rule="1se"):
    """The CrossValidation of a finished OutOfFold: the epoch the rule picks, and there each attribute's verdict,
    the calibration, the thresholds and each repeat's own mAP."""
    y = np.asarray(targets[index])
    history = oof_history(state.scores, y, attributes, loss_fn, state.folds)
    best = choose_epoch(history, rule)
    logits = state.scores[:, best]  # (repeats, n, K)
    judged = judge(logits, y, state.folds, attributes=attributes, thresholds=thresholds)
    alone = [float(attribute_metrics(sigmoid(repeat), y, None, attributes)["map"]) for repeat in logits]
    return CrossValidation(index=index, probabilities=judged.probabilities, folds=state.folds, epochs=best + 1,
                           history=history, repeat_maps=alone, thresholds=judged.thresholds, notes=judged.notes,
                           verdicts=judged.verdicts, calibration=judged.calibration)


def sigmoid(z):
    return 1 / (1 + np.exp(-np.clip(z, -80, 80)))


# ---- oof.npz: the out-of-fold predictions, written by train.py, read by report.py, audit.py and review.py ----

OOF_VERSION = 2  # 2: calibrated probabilities and each attribute's verdict


def images_sha256(paths):
    """The image files as they are now (path, size, modification time: the feature cache's key of each)."""
    from feature_cache import image_key

    h = hashlib.sha256()
    for path in paths:
        h.update(image_key(path).encode() + b"\n")
    return h.hexdigest()


def write_oof(path, cv, *, run_id, names, paths, attributes, targets, labels_path, config):
    """oof.npz: per row its image name, labels (1 / 0 / -1 = NA), out-of-fold probabilities and folds, and what
    they were made from (the labels file's sha256, the image files' keys), so a reader can tell a stale file, and the
    run's id, which its model.pth holds too. numpy arrays and strings only: read back with allow_pickle=False."""
    if not distributed.is_main():  # rank 0 alone writes files: spare the others the hashing
        return
    arrays = {
        "version": np.array(OOF_VERSION), "names": np.array([str(n) for n in names]),
        "attributes": np.array([str(a) for a in attributes]), "targets": np.asarray(targets, dtype=np.int8),
        "probabilities": cv.probabilities.astype(np.float32), "folds": cv.folds.astype(np.int16),
        "epochs": np.array(cv.epochs), "labels_sha256": np.array(file_sha256(labels_path)),
        "images_sha256": np.array(images_sha256(paths)), "run_id": np.array(run_id),
        "config": np.array(json.dumps(config, sort_keys=True)),
        "history": np.array(json.dumps(cv.history)), "verdicts": np.array(json.dumps(cv.verdicts)),
    }

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


@dataclass
class OofFile:
    """oof.npz read back."""
    names: list
    attributes: list
    targets: np.ndarray  # (n, K) int8, NA = -1
    probabilities: np.ndarray  # (n, K) float32
    folds: np.ndarray  # (n, repeats)
    epochs: int
    labels_sha256: str
    images_sha256: str
    run_id: str  # the run that wrote it: its model.pth holds the same
    config: dict  # train.py's settings of that run
    history: list
    verdicts: list  # per attribute: metrics.verdicts' row (learnt, p_value, ...)

    @property
    def learnt(self):
        return np.array([bool(v["learnt"]) for v in self.verdicts])

    def paths(self, images):
        return [os.path.join(images, name) for name in self.names]


def read_oof(path):
    """The OofFile at path; UserError if it is missing, damaged or of another version."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != OOF_VERSION:
                raise UserError(f"{path}: out-of-fold predictions of another version; run train.py again")
            return OofFile(names=z["names"].tolist(), attributes=z["attributes"].tolist(), targets=z["targets"],
                           probabilities=z["probabilities"], folds=z["folds"], epochs=int(z["epochs"]),
                           labels_sha256=str(z["labels_sha256"]), images_sha256=str(z["images_sha256"]),
                           run_id=str(z["run_id"]), config=json.loads(str(z["config"])),
                           history=json.loads(str(z["history"])), verdicts=json.loads(str(z["verdicts"])))
    except FileNotFoundError:
        raise UserError(f"{path}: no out-of-fold predictions there (a cross-validated `python train.py` writes "
                        "them)") from None
    except UserError:
        raise
    except Exception as e:  # empty, truncated, not a zip, a damaged member, other arrays: all the same to the user
        raise UserError(f"{path}: not a readable oof.npz ({type(e).__name__}); run train.py again") from None


def oof_mismatch(oof, *, labels_path, images, model=None):
    """Why oof does not belong to this labels file, images folder and (when it exists) model.pth (a line), or None
    when it does."""
    if oof.labels_sha256 != file_sha256(labels_path):
        return f"{labels_path} is not the labels file they were made from (or it changed since)"
    paths = oof.paths(images)
    if not all(os.path.isfile(p) for p in paths) or oof.images_sha256 != images_sha256(paths):
        return f"the images in {images} are not the ones they were made from (or changed since)"
    if model is not None and os.path.isfile(model):
        from model import load_checkpoint

        if load_checkpoint(model).get("run_id") != oof.run_id:
            return f"{model} is from another run than they are (that run did not finish, or is older)"
    return None

"""The engine below train.py, report.py and audit.py: the one training loop, the cross-validation and the
out-of-fold predictions it makes, and oof.npz, the file that carries them to the report, the audit and review.py.

Nothing here reads a command line: train.py wires it (`python train.py`), and every setting arrives as train.py's
argparse namespace (`args`), the recipe of the run. Nothing here imports train.py, report.py or audit.py.
"""
import hashlib
import json
import math
import os
import time
from copy import deepcopy
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
    """The cross-validation in progress. All its heads train side by side, one epoch at a time, so when an epoch ends
    every row has its out-of-fold logits of that epoch: its history record is taken then and the logits dropped.
    What is kept grows with the heads, never with rows x epochs: each head's weights, optimizer state and dropout
    generator after the last finished epoch, the history, and the heads' weights at the epochs the epoch rule may
    still choose (candidate_epochs). A Ctrl-C keeps it in model_last.pth (to_checkpoint) and --resume goes on from
    the last finished epoch; each head depends on its own seed alone, so the result is the uninterrupted one."""
    folds: np.ndarray  # (n, repeats) int64: the fold of each row in each repeat
    epochs: int  # the epochs each head trains (--epochs): the most the rule may choose
    epoch: int = 0  # the epochs every head has finished
    history: list = field(default_factory=list)  # per finished epoch: epoch_record's numbers
    heads: list = field(default_factory=list)  # per head, repeat-major, after `epoch` epochs: {"model": state dict,
    #                                            "optimizer": state dict, "dropout": generator state or None}
    kept: dict = field(default_factory=dict)  # epoch (0-based) -> each head's weights then, for candidate_epochs
    chosen: np.ndarray = None  # once finished: (repeats, n, K) float32, the logits of the chosen epoch (not saved)
    seconds: float = 0.0  # time spent so far (for the log)

    def to_checkpoint(self):
        """Plain tensors, numbers and strings (model_last.pth loads with weights_only=True)."""
        return {"folds": torch.from_numpy(self.folds), "epochs": self.epochs, "epoch": self.epoch,
                "history": json.dumps(self.history), "heads": self.heads,
                "kept": [[e, weights] for e, weights in sorted(self.kept.items())], "seconds": float(self.seconds)}

    @classmethod
    def from_checkpoint(cls, saved):
        return cls(folds=saved["folds"].numpy(), epochs=int(saved["epochs"]), epoch=int(saved["epoch"]),
                   history=json.loads(saved["history"]), heads=list(saved["heads"]),
                   kept={int(e): weights for e, weights in saved["kept"]}, seconds=float(saved["seconds"]))

    def arrays(self):
        """Every array the state holds, each once (the memory test counts their elements)."""
        held = _tensors(self.to_checkpoint()) + ([] if self.chosen is None else [torch.from_numpy(self.chosen)])
        return list({id(t): t for t in held}.values())


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in _tensors(v)] if isinstance(value, (list, tuple)) else []


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
    return OutOfFold(folds=assignment, epochs=epochs)


class Head:
    """One head of the cross-validation: trained on the other folds of its repeat, scoring its own fold. Its initial
    weights, dropout masks and batch order come from its own seed alone, so it trains the same beside the others
    (in threads, in lockstep) as alone, and from a saved state (restore) as without a stop."""

    def __init__(self, h, batches, index, targets, *, args, feature_dim, device, folds):
        self.repeat, f = divmod(h, args.folds)
        seed, fold = head_seed(args.seed, self.repeat, f, args.folds), folds[:, self.repeat]
        torch.manual_seed(seed)  # the initial weights come from torch's one global generator, seeded for this head
        self.module = build_head(args.head, feature_dim, targets.shape[1], hidden=args.hidden,
                                 dropout=args.dropout).to(device)
        # Its own dropout generator on the CPU and a GPU (elsewhere torch's global one): a Ctrl-C saves its state.
        self.generator = torch.Generator(device).manual_seed(seed) if device.type in ("cpu", "cuda") else None
        if self.generator is not None:
            set_dropout_generator(self.module, self.generator)
        train_rows, self.held = index[fold != f], np.flatnonzero(fold == f)
        self.train_batches, self.held_batches = batches(train_rows, True, seed), batches(index[self.held], False, 0)
        self.optimizer = make_optimizer(self.module, args)
        self.lr_at = schedule(args, steps_per_epoch=len(self.train_batches), epochs=args.epochs)
        self.forward = flip_tta(self.module, features=True) if args.tta else self.module
        self.loss_fn = make_loss_for(args, targets[train_rows]).to(device)
        self.device = device

    def train_epoch(self, epoch, logits, stop=None):
        """One epoch, then its held-out rows' logits into logits[repeat]; False if stop.requested ended it."""
        if stop is not None and stop.requested:  # a Ctrl-C came while it waited for a core
            return False
        self.train_batches.set_epoch(epoch)
        self.module.train()
        train_one_epoch(self.module, self.train_batches, loss_fn=self.loss_fn, optimizer=self.optimizer,
                        lr_at=self.lr_at, first_step=epoch * len(self.train_batches), device=self.device, stop=stop,
                        label=None)
        if stop is not None and stop.requested:
            return False
        self.score(logits)
        return True

    def score(self, logits):
        self.module.eval()
        if len(self.held):  # in the order of index[held]: FeatureBatches keeps the order it is given
            logits[self.repeat, self.held] = evaluate(self.forward, self.held_batches, device=self.device,
                                                      logits=True)[0]

    def state(self):
        """A copy of its weights, optimizer state and dropout generator: the steps that follow do not change it."""
        return {"model": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
                "optimizer": deepcopy(self.optimizer.state_dict()),
                "dropout": self.generator.get_state() if self.generator is not None else None}

    def restore(self, saved):
        self.module.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(deepcopy(saved["optimizer"]))  # it would share the saved tensors
        if self.generator is not None and saved["dropout"] is not None:
            self.generator.set_state(saved["dropout"])


def out_of_fold(batches, index, targets, *, args, feature_dim, device, state, stop=None, workers=None,
                every_epoch=None):
    """Train state's args.repeats x args.folds heads (Head) from its last finished epoch to args.epochs, all side by
    side an epoch at a time, through train_one_epoch (the run's own head, loss, optimizer and schedule), each scoring
    its own fold after every epoch (flip TTA with --tta). batches(rows, train, seed) gives the batches of those rows.
    After each epoch its record joins state.history (epoch_record), its logits (repeats, n, K) go to
    every_epoch(epoch, logits) if given and are dropped, and the heads' weights are kept while --epoch-rule may still
    choose that epoch. At the end the chosen epoch's logits are made again from its weights (state.chosen). On a CPU
    the heads train in threads, one a core (workers; default: the cores, under torchrun a share of them): each
    step's matrices are too small for two threads to share, and each head is repeatable alone, so the scores are
    those of one head after the other. Returns True when done, False if Ctrl-C stopped it (state then holds the
    epochs every head finished)."""
    heads_n, n, K = args.repeats * args.folds, len(index), targets.shape[1]
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = 1 if device.type != "cpu" else max(1, cores // distributed.world_size())
    y, attributes = np.asarray(targets[index]), [str(k) for k in range(K)]
    loss_fn = make_loss_for(args, targets[index])
    heads = [Head(h, batches, index, targets, args=args, feature_dim=feature_dim, device=device, folds=state.folds)
             for h in range(heads_n)]  # built in head order: each seeds torch's global generator for its weights
    for head, saved in zip(heads, state.heads):
        head.restore(saved)
    started = time.time()
    bar = Progress((state.epochs - state.epoch) * heads_n, "cross-validation")
    with ThreadPoolExecutor(max(1, min(workers, heads_n))) as pool:
        for epoch in range(state.epoch, state.epochs):
            epoch_started = time.time()
            logits = np.zeros((args.repeats, n, K), dtype=np.float32)  # this epoch's alone: O(rows x attributes)
            futures = [pool.submit(head.train_epoch, epoch, logits, stop) for head in heads]
            finished = []
            for future in futures:  # in head order: the log and the state do not depend on timing
                finished.append(future.result())
                bar(1)
            if not all(finished):
                bar.close()
                state.seconds += time.time() - started
                return False
            record = epoch_record(logits, y, attributes, loss_fn, state.folds)
            state.history.append({"epoch": epoch + 1, **record})
            if every_epoch is not None:
                every_epoch(epoch, logits)
            del logits
            state.heads = [head.state() for head in heads]
            candidates = candidate_epochs(state.history, args.epoch_rule)
            state.kept = {e: weights for e, weights in state.kept.items() if e in candidates}
            if epoch in candidates:
                state.kept[epoch] = [saved["model"] for saved in state.heads]
            state.epoch = epoch + 1
            seconds, images = time.time() - epoch_started, sum(head.train_batches.num_images for head in heads)
            log(f"cross-validation epoch {epoch + 1:>3}/{state.epochs}  oof_loss {record['loss']:.4f}  mAP "
                f"{record['map']:.4f} +- {record['map_se']:.4f}  macroF1@0.5 {record['macro_f1']:.4f}  time "
                f"{seconds:.2f}s  {images / max(seconds, 1e-9):.0f} img/s ({heads_n} heads)")
        # Only the chosen epoch's logits are needed from here on: one more pass of each head over its own fold.
        best = choose_epoch(state.history, args.epoch_rule)
        state.chosen = np.zeros((args.repeats, n, K), dtype=np.float32)
        for head, weights in zip(heads, state.kept[best]):
            head.module.load_state_dict(weights)
        list(pool.map(lambda head: head.score(state.chosen), heads))
    bar.close()
    state.seconds += time.time() - started
    for repeat in range(args.repeats):
        sizes = np.bincount(state.folds[:, repeat])
        log(f"repeat {repeat + 1}/{args.repeats}: {args.folds} heads of {state.epochs} epochs, {sizes.min()}-"
            f"{sizes.max()} rows held out each, {state.seconds:.1f}s in all")
    return True


EPOCH_RULES = ("1se", "map", "loss")  # train.py's EPOCH_RULE says what each is and what was measured
RECORD_CELLS = 2 ** 22  # epoch_record's blocks: rows of this many cells (16 MB of float32 logits)


def epoch_record(logits, y, attributes, loss_fn, folds):
    """One epoch's out-of-fold numbers from its logits (repeats, n, K): the loss (the mean over the repeats of the
    run's loss on each repeat's logits), the metrics of the mean probability over the repeats, and the standard error
    of the mAP: the spread of the heads' own mAPs on their held-out folds over sqrt(heads). The loss and the mean
    go through the rows in blocks: the loss's temporaries alone are ~8 copies of its input (7 GB at 1M x 228)."""
    y = np.asarray(y)
    mean, losses, block = np.zeros(logits.shape[1:], dtype=np.float32), [], max(1, RECORD_CELLS // max(y.shape[1], 1))
    for z in logits:
        total, known = 0.0, 0
        for s in range(0, len(y), block):
            mean[s:s + block] += sigmoid(z[s:s + block])
            target = torch.from_numpy(y[s:s + block])
            cells = int((target >= 0).sum())
            with torch.no_grad():  # each loss is the mean over the known cells: a block's weighs its cells
                total += loss_fn(torch.from_numpy(z[s:s + block]), target).item() * cells
            known += cells
        losses.append(total / known if known else 0.0)
    mean /= len(logits)  # the sum in repeat order, then / R: numpy's mean(0), to the bit
    result = attribute_metrics(mean, y, None, attributes)
    heads = [attribute_metrics(sigmoid(logits[r][held]), y[held], None, attributes)["map"]
             for r in range(len(logits)) for held in (folds[:, r] == f for f in np.unique(folds[:, r]))]
    heads = [m for m in heads if not math.isnan(m)]
    return {"loss": float(np.mean(losses)), "map": result["map"],
            "map_se": float(np.std(heads, ddof=1) / math.sqrt(len(heads))) if len(heads) > 1 else 0.0,
            "macro_f1": macro_f1(mean, y, [0.5] * len(attributes)), "ap": [r["ap"] for r in result["attributes"]]}


def oof_history(logits, y, attributes, loss_fn, folds):
    """epoch_record of every epoch of logits (repeats, epochs, n, K), folds (n, repeats): all epochs held at once,
    for small sets (benchmarks/bench_audit.py, the tests); out_of_fold takes the records one epoch at a time."""
    return [{"epoch": epoch + 1, **epoch_record(logits[:, epoch], y, attributes, loss_fn, folds)}
            for epoch in range(logits.shape[1])]


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


def candidate_epochs(history, rule="1se"):
    """The epochs (0-based) of history that choose_epoch may still pick however the epochs to come turn out: the
    cross-validation keeps the heads' weights of these alone. The rule's answer is always a record, an epoch better
    than every one before it (the lowest loss for "loss", else the highest mAP; NaN counts as no number), or epoch
    0 when every number is NaN. "map" and "loss" pick the best, the first of ties: the last record. "1se" picks the
    first epoch within one standard error of the best; every epoch before it is below that bar, so it is a record
    too, but which one depends on the standard error of a best that may still come: every record is kept (at most
    all the epochs where the mAP rises to a new high: the weights of 10 heads each, never rows x epochs)."""
    values = [-h["loss"] if rule == "loss" else h["map"] for h in history]
    records, best = [], -math.inf
    for e, v in enumerate(values):
        if v > best:  # False for NaN
            records.append(e)
            best = v
    if not records:
        return {0}
    return set(records) if rule == "1se" else {records[-1]}


def cross_validation(logits, history, best, *, index, y, folds, thresholds, attributes):
    """The CrossValidation of the chosen epoch's logits (repeats, n, K): each attribute's verdict, the calibration,
    the thresholds and each repeat's own mAP."""
    judged = judge(logits, y, folds, attributes=attributes, thresholds=thresholds)
    alone = [float(attribute_metrics(sigmoid(repeat), y, None, attributes)["map"]) for repeat in logits]
    return CrossValidation(index=index, probabilities=judged.probabilities, folds=folds, epochs=best + 1,
                           history=history, repeat_maps=alone, thresholds=judged.thresholds, notes=judged.notes,
                           verdicts=judged.verdicts, calibration=judged.calibration)


def finish_out_of_fold(state, index, targets, *, attributes, thresholds, rule="1se"):
    """The CrossValidation of a finished OutOfFold: the epoch the rule picks from its history, and there (the
    logits out_of_fold made again from that epoch's weights) the verdicts, calibration and thresholds."""
    best = choose_epoch(state.history, rule)
    return cross_validation(state.chosen, state.history, best, index=index, y=np.asarray(targets[index]),
                            folds=state.folds, thresholds=thresholds, attributes=attributes)


def finish_all_epochs(logits, folds, index, targets, *, attributes, thresholds, loss_fn, rule="1se"):
    """finish_out_of_fold from every epoch's logits held at once (repeats, epochs, n, K) (out_of_fold's
    every_epoch collects them): the computation the streaming one equals, for small sets (the tests,
    benchmarks/bench_audit.py's repeats taken one more at a time)."""
    y = np.asarray(targets[index])
    history = oof_history(logits, y, attributes, loss_fn, folds)
    best = choose_epoch(history, rule)
    return cross_validation(logits[:, best], history, best, index=index, y=y, folds=folds, thresholds=thresholds,
                            attributes=attributes)


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

"""A run's log in the trackers the field uses (TensorBoard, MLflow), a folder per run, and the table of runs.

    python train.py --run-dir runs --log tensorboard      # then: tensorboard --logdir runs
    python train.py --name lr3e-4 --lr 3e-4 --log mlflow  # then: mlflow ui (in the same working folder)
    python report.py --compare runs/*                     # the runs side by side, from their metrics.json

train.py calls in at four points: start() after its setup, RunLog.epoch() after each epoch of the final head,
RunLog.cross_validation() once the cross-validation has chosen the epochs, RunLog.end() after the outputs are
written. Only rank 0 logs under torchrun. A tracker that cannot be imported or reached, or that fails later, is one
`warning:` line and the run goes on without it: nothing here ends a run. What an epoch logs is kept in memory and
handed to the tracker at most every FLUSH_SECONDS and at the end of each stage: the head's epochs on cached
features take milliseconds, less than a write per value. docs/tracking.md lists what is logged under which name.
"""
import atexit
import json
import math
import os
import re
import sys
import time

import distributed
from utils import UserError

FLUSH_SECONDS = 30  # the longest an epoch's numbers wait in memory before the tracker gets them
# Settings that say where things go or how the run was started, not how its model was made: not logged as
# hyperparameters, not compared.
NOT_SETTINGS = {"out", "curve", "run_dir", "name", "log", "resume", "cache_dir", "debug", "list_backbones",
                "no_report", "tensorboard_dir", "mlflow_run_id"}
STATUS = {0: "FINISHED", 130: "KILLED"}  # train.py's exit code -> MLflow's run status (else FAILED)


# ---- a folder per run ----

def run_folder(run_dir, name):
    """A new folder for one run: run_dir/name, or run_dir/<date-time> without a name (new_folder); under torchrun
    rank 0 makes it and every rank gets its path."""
    if name is not None and (not name or name in (".", "..") or "/" in name or os.sep in name):
        raise UserError(f"--name {name!r}: give a plain folder name (no slashes)")
    folder = new_folder(os.path.join(run_dir, name or time.strftime("%Y%m%d-%H%M%S"))) if distributed.is_main() \
        else None
    return distributed.broadcast(folder)


def new_folder(base):
    """base, or base-2, base-3, ... when it is taken (as Ultralytics' runs/ folders do), made here, which reserves
    it: a run never writes into another run's folder."""
    folder, n = base, 1
    while True:
        try:
            os.makedirs(folder)
            return folder
        except FileExistsError:
            n += 1
            folder = f"{base}-{n}"
        except OSError as e:
            raise UserError(f"the run folder {folder} cannot be created ({e.strerror}); give another --run-dir") \
                from None


# ---- the trackers: one interface, three implementations ----

class Tracker:
    """--log none, and what every tracker does: here, nothing. Scalars are {name: value} at one step."""
    name = "none"

    def log_params(self, params):
        pass

    def log_scalars(self, step, scalars):
        pass

    def log_pr_curve(self, tag, labels, probabilities, step):
        pass

    def log_figure(self, tag, path, step):
        pass

    def log_artifact(self, path):
        pass

    def flush(self):
        pass

    def close(self, params, final, status):
        """final: {name: value} of the finished run (None when it did not finish); status: MLflow's word."""


class TensorBoardTracker(Tracker):
    """torch.utils.tensorboard's SummaryWriter on the run's log folder (a resumed run appends a new events file to
    it, its steps continuing)."""
    name = "tensorboard"

    def __init__(self, log_dir):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir, max_queue=1000, flush_secs=FLUSH_SECONDS)

    def log_params(self, params):
        self.writer.add_text("settings", "| setting | value |\n|---|---|\n" +
                             "\n".join(f"| {k} | {v} |" for k, v in params.items()))

    def log_scalars(self, step, scalars):
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def log_pr_curve(self, tag, labels, probabilities, step):
        self.writer.add_pr_curve(tag, labels, probabilities, global_step=step)

    def log_figure(self, tag, path, step):
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def flush(self):
        self.writer.flush()

    def close(self, params, final, status):
        if final:
            # add_hparams's three summaries, written to this run's own events file: add_hparams itself writes them
            # to a new sub-folder, which the HParams table shows as a second run without this run's scalars.
            from torch.utils.tensorboard.summary import hparams

            step = int(final.get("final/epoch", 0))
            for summary in hparams(params, final):
                self.writer.file_writer.add_summary(summary, step)
            self.log_scalars(step, final)
        self.writer.close()


class MlflowTracker(Tracker):
    """An MLflow run through MlflowClient (as Lightning's MLFlowLogger does: no global active run), on
    MLFLOW_TRACKING_URI or else MLflow's own local default; the experiment from MLFLOW_EXPERIMENT_NAME or
    MLFLOW_EXPERIMENT_ID, else Default. run_id: the run to continue (--resume), else a new one named run_name."""
    name = "mlflow"

    def __init__(self, *, run_id, run_name, tags):
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if uri.startswith(("http://", "https://")):
            check_reachable(uri)
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException

        self.Metric, self.Param = Metric, Param
        self.client = MlflowClient()
        self.pending, self.logged_params = [], {}
        if run_id:
            try:
                self.logged_params = dict(self.client.get_run(run_id).data.params)
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException:
                say(f"--log mlflow: run {run_id} of the run being resumed is not in {self.client.tracking_uri}; "
                    "this run logs to a new MLflow run")
                run_id = None
        if not run_id:
            from mlflow.tracking.context.registry import resolve_tags  # user, source, git commit: as start_run

            run_id = self.client.create_run(experiment_id(self.client), run_name=run_name,
                                            tags=resolve_tags(tags)).info.run_id
        self.run_id = run_id

    def log_params(self, params):
        # MLflow keeps a param's first value: a resumed run adds the ones it did not have, changes none.
        new = [self.Param(k, str(v)) for k, v in params.items() if k not in self.logged_params]
        if new:
            self.client.log_batch(self.run_id, params=new)

    def log_scalars(self, step, scalars):
        now = int(time.time() * 1000)
        self.pending += [self.Metric(metric_name(k), float(v), now, int(step)) for k, v in scalars.items()]

    def log_figure(self, tag, path, step):
        self.log_artifact(path)

    def log_artifact(self, path):
        self.client.log_artifact(self.run_id, path)

    def flush(self):
        if self.pending:
            batch, self.pending = self.pending, []
            self.client.log_batch(self.run_id, metrics=batch)  # it splits what the server takes per request

    def close(self, params, final, status):
        if final:
            self.log_scalars(final.get("final/epoch", 0), final)
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def check_reachable(uri, timeout=5):
    """A tracking server that does not answer at all fails here within seconds, where MLflow's own retries
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7) would wait about 4 minutes. Any HTTP answer, an error status
    included, counts as reachable."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ConnectionError(f"{uri} cannot be reached ({getattr(e, 'reason', e)})") from None


def experiment_id(client):
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        experiment = client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment else client.create_experiment(name)
    return os.environ.get("MLFLOW_EXPERIMENT_ID") or "0"  # "0": the Default experiment of every MLflow store


def metric_name(name):
    """MLflow takes letters, digits, _ - . / : and spaces in a name; an attribute's name may hold anything."""
    return re.sub(r"[^\w\-./: ]", "_", name)


def say(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def first_line(error):
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


# ---- the run's log: what train.py calls ----

def settings(args):
    """The run's settings as hyperparameters (strings, numbers, booleans; None as "none")."""
    return {k: ("none" if v is None else v) for k, v in sorted(vars(args).items())
            if k not in NOT_SETTINGS and (isinstance(v, (str, int, float, bool)) or v is None)}


def open_tracker(args, run_id):
    """The tracker of --log, continuing the resumed run's own log when there is one; records where it logs in
    args (tensorboard_dir, mlflow_run_id), so that every checkpoint's config carries it to a --resume. run_id:
    train.py's id of the run (in its checkpoints and oof.npz), a tag of the MLflow run."""
    own_folder = bool(args.run_dir or args.name)  # train.output_paths put the outputs in a folder of their own
    if args.log == "tensorboard":
        import torch.utils.tensorboard  # noqa: F401 -- without tensorboard: the ImportError before a folder is made

        log_dir = getattr(args, "tensorboard_dir", None) if args.resume else None
        if not log_dir:  # the run's folder; else runs/<date-time> beside --out, TensorBoard's own habit
            log_dir = os.path.dirname(args.out) if own_folder else new_folder(
                os.path.join(os.path.dirname(args.out), "runs", time.strftime("%Y%m%d-%H%M%S")))
        tracker = TensorBoardTracker(log_dir)
        args.tensorboard_dir = log_dir
    else:
        tracker = MlflowTracker(run_id=getattr(args, "mlflow_run_id", None) if args.resume else None,
                                run_name=os.path.basename(os.path.dirname(os.path.abspath(args.out)))
                                if own_folder else None,
                                tags={"run_id": run_id, "out": os.path.abspath(args.out)})
        args.mlflow_run_id = tracker.run_id
    return tracker


def start(args, *, attributes, outputs, run_id):
    """The run's log (a RunLog) after train.py's setup: --log none, or not rank 0, logs nothing."""
    tracker = Tracker()
    if args.log != "none" and distributed.is_main():
        try:
            tracker = open_tracker(args, run_id)
        except ImportError as e:
            package = "tensorboard" if args.log == "tensorboard" else "mlflow"
            say(f"--log {args.log}: {first_line(e)} (pip install {package}); the run goes on without logging")
        except Exception as e:  # noqa: BLE001 -- any failure of a tracker is the tracker's, not the run's
            say(f"--log {args.log}: {first_line(e)}; the run goes on without logging")
    log = RunLog(tracker, attributes=list(attributes), outputs=outputs, params=settings(args),
                 report=not args.no_report)
    log.call("log_params", log.params)
    return log


class RunLog:
    """The run's log in its tracker. Every call into the tracker goes through call(): the first one that fails
    is one warning, and the tracker is dropped for the rest of the run."""

    def __init__(self, tracker, *, attributes, outputs, params, report):
        self.tracker, self.attributes, self.outputs, self.params = tracker, attributes, outputs, params
        self.report = report
        self.pending = []  # (step, {name: value}) not yet handed to the tracker
        self.started = self.flushed = time.time()
        self.open = tracker.name != "none"
        if self.open:
            atexit.register(self.at_exit)

    def call(self, method, *args):
        if self.tracker.name == "none":
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as e:  # noqa: BLE001 -- see start()
            say(f"--log {self.tracker.name} stopped: {type(e).__name__}: {first_line(e)}; the run goes on "
                "without it")
            self.tracker, self.pending, self.open = Tracker(), [], False

    def scalars(self, step, values):
        values = {k: float(v) for k, v in values.items() if v is not None and not math.isnan(v)}
        if values and self.tracker.name != "none":
            self.pending.append((int(step), values))

    def flush(self):
        pending, self.pending = self.pending, []
        for step, values in pending:
            self.call("log_scalars", step, values)
        self.call("flush")
        self.flushed = time.time()

    def epoch_metrics(self, record):
        """A validation (or out-of-fold) epoch's numbers under their logged names."""
        values = {"val/loss": record.get("val_loss", record.get("loss")), "val/mAP": record.get("map"),
                  "val/macro_F1_at_0.5": record.get("macro_f1")}
        values.update({f"val/AP/{a}": ap for a, ap in zip(self.attributes, record.get("ap") or [])})
        return values

    def epoch(self, record, losses, *, first_step):
        """An epoch of the final head: its loss per optimizer step (1-based, as loss_curve.png), its mean, and its
        validation numbers when it had a validation split."""
        if self.tracker.name == "none":
            return
        for i, loss in enumerate(losses):
            self.scalars(first_step + i + 1, {"train/loss": loss})
        self.scalars(record["epoch"], {"train/epoch_loss": record.get("train_loss"), **self.epoch_metrics(record)})
        if time.time() - self.flushed > FLUSH_SECONDS:
            self.flush()

    def cross_validation(self, cv, y):
        """The cross-validation's out-of-fold numbers per epoch (val/...), the epoch it chose, each repeat's own
        mAP there, and the precision-recall curve of each attribute from the out-of-fold probabilities."""
        if self.tracker.name == "none":
            return
        for record in cv.history:
            self.scalars(record["epoch"], self.epoch_metrics(record))
        self.scalars(cv.epochs, {"cv/chosen_epoch": cv.epochs})
        # The verdicts: each attribute's Holm-adjusted p-value and whether it was learnt (1) or not (0).
        for v in cv.verdicts:
            self.scalars(cv.epochs, {f"verdict/p/{v['attribute']}": v["p_adjusted"],
                                     f"verdict/learnt/{v['attribute']}": float(v["learnt"])})
        for repeat, value in enumerate(cv.repeat_maps, 1):
            self.scalars(repeat, {"cv/mAP_of_each_repeat": value})
        self.flush()
        self.pr_curves(cv.probabilities, y, cv.epochs)

    def pr_curves(self, scores, y, step):
        for k, attribute in enumerate(self.attributes):
            known = y[:, k] >= 0
            if known.any():
                self.call("log_pr_curve", f"pr/{attribute}", y[known, k] == 1, scores[known, k], step)

    def end(self, code, *, best=None):
        """After train.py's finish(): the validation split's precision-recall curves (best: its best epoch's
        (scores, y, ...)), the figures, the outputs (MLflow: as artifacts), and when the run finished its final
        numbers, read from metrics.json, with the settings (TensorBoard's HParams table). Returns code."""
        if not self.open:
            return code
        self.flush()
        summary = read_json(self.outputs["metrics"]) if self.fresh(self.outputs["metrics"]) else {}
        step = summary.get("best_epoch", 0)
        if code in (0, 130):
            if best is not None:
                self.pr_curves(best[0], best[1], step)
            for tag, key in (("figures/loss_curve", "curve"), ("figures/metrics", "metrics_png")):
                if self.fresh(self.outputs[key]):
                    self.call("log_figure", tag, self.outputs[key], step)
            for key in ("best", "metrics", "oof") + (("report",) if self.report else ()):
                if os.path.isfile(self.outputs[key]) and (key in ("best", "oof") or self.fresh(self.outputs[key])):
                    self.call("log_artifact", self.outputs[key])
        self.close(final_metrics(summary) if code == 0 else None, STATUS.get(code, "FAILED"))
        return code

    def fresh(self, path):
        """Written by this process (an older file beside --out is another run's)."""
        try:
            return os.path.getmtime(path) >= self.started - 1
        except OSError:
            return False

    def close(self, final, status):
        self.open = False
        self.call("close", self.params, final, status)

    def at_exit(self):
        """The process ends with the run's log still open (an error, or Ctrl-C before training ended)."""
        if self.open:
            self.flush()
            self.close(None, "KILLED")


def read_json(path):
    try:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def final_metrics(summary):
    """The finished run's numbers from its metrics.json: out-of-fold (or validation) mAP and macro-F1 at its
    thresholds and at 0.5, each attribute's AP, the epochs of the final head."""
    tuned, at_half = summary.get("validation") or {}, summary.get("validation_at_0.5") or {}
    values = {"final/mAP": tuned.get("map"), "final/macro_F1": tuned.get("macro_f1"),
              "final/macro_F1_at_0.5": at_half.get("macro_f1"), "final/epoch": summary.get("best_epoch")}
    values.update({f"final/AP/{r['attribute']}": r.get("ap") for r in tuned.get("attributes", [])})
    return {k: float(v) for k, v in values.items() if v is not None and not math.isnan(v)}


# ---- the runs side by side: report.py --compare ----

def compare_runs(paths):
    """One plain-text table of runs side by side, from their metrics.json (a path: a run's folder or the file):
    the settings that differ between them, what they were scored on, the out-of-fold (or validation) mAP beside
    its chance level (the mean prevalence) and macro-F1 at the run's thresholds, each attribute's AP, the time."""
    runs = []
    for path in paths:
        file = os.path.join(path, "metrics.json") if os.path.isdir(path) else path
        summary = read_json(file)
        if "history" not in summary:
            say(f"{path}: no metrics.json of a train.py run there; left out of the table")
            continue
        runs.append((os.path.dirname(file) or ".", summary))
    if not runs:
        raise UserError("--compare: none of the paths given holds a run's metrics.json (train.py writes one)")
    configs = [run_config(summary) for _, summary in runs]
    keys = sorted({k for config in configs for k in config} - NOT_SETTINGS)
    differ = [k for k in keys if len({json.dumps(config.get(k, "?")) for config in configs}) > 1]
    attributes = []
    for _, summary in runs:
        attributes += [r["attribute"] for r in (summary.get("validation") or {}).get("attributes", [])
                       if r["attribute"] not in attributes]
    header = ["run", *differ, "scored on", "epochs", "mAP", "chance", "macroF1", *[f"AP {a}" for a in attributes],
              "time"]
    rows = []
    for (folder, summary), config in zip(runs, configs):
        tuned = summary.get("validation") or {}
        ap = {r["attribute"]: r.get("ap") for r in tuned.get("attributes", [])}
        known = [r["prevalence"] for r in tuned.get("attributes", []) if r.get("ap") is not None]
        cv = summary.get("cross_validation")
        scored = f"out-of-fold {cv['repeats']}x{cv['folds']}" if cv else "validation" if tuned else "-"
        rows.append([folder, *[text(config.get(k, "?")) for k in differ], scored, text(summary.get("best_epoch")),
                     number(tuned.get("map")), number(sum(known) / len(known) if known else None),
                     number(tuned.get("macro_f1")), *[number(ap.get(a)) for a in attributes],
                     duration(summary.get("run", {}).get("seconds"))])
    lines = table_lines(header, rows, left=1 + len(differ) + 1)
    if not differ:
        lines.append("(no setting differs between these runs)")
    return "\n".join(lines)


def run_config(summary):
    """A run's settings from its metrics.json (before they were written there: the backbone's alone)."""
    config = (summary.get("run") or {}).get("config")
    if config:
        return config
    backbone = summary.get("backbone") or {}
    return {"backbone": backbone.get("name"), "image_size": backbone.get("image_size")}


def text(value):
    return "none" if value is None else str(value)


def number(value):
    return "-" if value is None else "n/a" if math.isnan(value) else f"{value:.3f}"


def duration(seconds):
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def table_lines(header, rows, *, left):
    """Columns as wide as their widest cell: the first `left` aligned left (names), the rest right (numbers)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row):
        return "  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths))).rstrip()

    return [line(header), *map(line, rows)]

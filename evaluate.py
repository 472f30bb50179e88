"""Per-attribute metrics of a trained checkpoint on any labelled set (NA cells ignored).

    python evaluate.py --labels val_labels.txt --images images --model model.pth
    python evaluate.py --labels test.txt --images test_images --json

On val_labels.txt (written by train.py) it reproduces the validation table train.py printed.
"""
import argparse
import json
import sys

import numpy as np

from dataset import Report, UserError, eval_transform, load_dataset, run_cli
from data_loader import resolve_workers, workers_arg
from inference import KEEP_FREED_MEMORY, NUM_WORKERS, predict
from metrics import attribute_metrics, format_table, to_json
from model import keep_freed_memory, load_checkpoint, model_from_checkpoint, pick_device


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a trained model on a labelled set.")
    p.add_argument("--labels", required=True, help="labels file (same format as for training)")
    p.add_argument("--images", required=True, help="images folder")
    p.add_argument("--model", default="model.pth", help="checkpoint written by train.py")
    p.add_argument("--threshold", type=float, help="one threshold for every attribute (default: the tuned ones)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=workers_arg, default=NUM_WORKERS, help="auto or a number (see inference.py)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=KEEP_FREED_MEMORY,
                   help="cpu, Linux: reuse freed memory instead of unmapping it (faster forwards, more RAM)")
    p.add_argument("--strict", action="store_true", help="every warning about the input is an error")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def run(args):
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    ckpt = load_checkpoint(args.model)
    attributes = ckpt["attributes"]
    report = Report(strict=args.strict)
    table, paths, targets = load_dataset(args.labels, args.images, report)
    if len(table.attributes) != len(attributes):
        raise UserError(f"{args.labels}: {len(table.attributes)} attributes, but {args.model} predicts "
                        f"{len(attributes)} ({', '.join(attributes)})")
    device = pick_device(args.device)
    if args.keep_freed_memory:
        keep_freed_memory(device)
    model = model_from_checkpoint(ckpt, args.model).to(device)
    transform = eval_transform(ckpt["image_size"], ckpt["mean"], ckpt["std"])
    thresholds = [args.threshold] * len(attributes) if args.threshold is not None else ckpt["thresholds"]
    scores, kept = [], []
    index = {p: i for i, p in enumerate(paths)}
    workers = resolve_workers(args.num_workers, device)
    for path, probabilities, error in predict(model, paths, transform, device, args.batch_size, workers):
        if error is not None:
            report.warn("unreadable image", f"{error}; skipped")
            continue
        scores.append(probabilities)
        kept.append(index[path])
    if not kept:
        raise UserError(f"{args.labels}: no image could be read")
    result = attribute_metrics(np.asarray(scores), targets[kept].numpy(), thresholds, attributes)
    if args.json:
        print(json.dumps(to_json(result)))
    else:
        print(f"{len(kept)} images, {args.model} (epoch {ckpt.get('epoch')}), thresholds "
              f"{'--threshold ' + str(args.threshold) if args.threshold is not None else 'from the checkpoint'}")
        print(format_table(result))
    return 0


def main(argv=None):
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

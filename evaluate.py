"""Per-attribute metrics of a trained checkpoint on any labelled set (NA cells ignored).

    python evaluate.py --labels val_labels.txt --images images --model model.pth
    python evaluate.py --labels test.txt --images test_images --json
    python evaluate.py --labels test.txt --images test_images --model model.onnx   # an export.py model, on ONNX Runtime

On val_labels.txt (written by train.py) it reproduces the validation table train.py printed: the scores come
from the same evaluate() train.py validates with.
"""
import argparse
import json
import sys

import numpy as np
import torch

import distributed
from data_loader import ImageBatches
from dataset import add_label_flags, eval_transform, label_options, load_dataset
from inference import KEEP_FREED_MEMORY, NUM_WORKERS
import calibration
from metrics import attribute_metrics, format_table, to_json, verdicts, with_verdicts
from model import flip_tta, folded_forward, load_checkpoint, model_from_checkpoint
from onnx_model import OnnxModel, is_onnx
from engine import evaluate
from utils import (Report, UserError, add_runtime_flags, check_batch_size, keep_freed_memory, pick_device,
                   resolve_workers)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a trained model on a labelled set.")
    p.add_argument("--labels", required=True, help="labels file (same format as for training)")
    p.add_argument("--images", required=True, help="images folder")
    add_label_flags(p)
    p.add_argument("--model", default="model.pth", help="checkpoint written by train.py, or .onnx from export.py")
    p.add_argument("--threshold", type=float, help="one threshold for every attribute (default: the tuned ones)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--no-tta", action="store_true", help="skip the flip test-time augmentation (see inference.py)")
    p.add_argument("--strict", action="store_true", help="every warning about the input is an error")
    add_runtime_flags(p, num_workers=NUM_WORKERS, keep_freed=KEEP_FREED_MEMORY)
    return p.parse_args(argv)


def load(args):
    """(the checkpoint's facts, forward: normalized image batch -> logits, device of the batches)."""
    if is_onnx(args.model):  # ONNX Runtime: the graph's logits output, so evaluate() applies the same sigmoid
        net = OnnxModel(args.model, device=args.device)
        forward, facts, device = (lambda x: torch.from_numpy(net.logits(x.numpy()))), net.facts, torch.device("cpu")
    else:
        facts = load_checkpoint(args.model)
        device = distributed.local_device(pick_device(args.device))
        if args.keep_freed_memory:
            keep_freed_memory(device)
        forward = folded_forward(model_from_checkpoint(facts, args.model).to(device))
    if facts.get("tta", False) and not args.no_tta:
        forward = flip_tta(forward, features=False)
    return facts, forward, device


def run(args):
    check_batch_size(args)
    ckpt, forward, device = load(args)
    attributes = ckpt["attributes"]
    report = Report(strict=args.strict, info_stream=sys.stderr if args.json else None)  # stdout: JSON only
    table, paths, targets = load_dataset(args.labels, args.images, report, options=label_options(args))
    if len(table.attributes) != len(attributes):
        raise UserError(f"{args.labels}: {len(table.attributes)} attributes, but {args.model} predicts "
                        f"{len(attributes)} ({', '.join(attributes)})")
    thresholds = [args.threshold] * len(attributes) if args.threshold is not None else ckpt["thresholds"]
    batches = ImageBatches(paths, np.arange(len(paths)), targets,
                           eval_transform(ckpt["image_size"], ckpt["mean"], ckpt["std"]),
                           batch_size=args.batch_size, shuffle=False,
                           num_workers=resolve_workers(args.num_workers, device), seed=0, device=device,
                           report=report, shard=distributed.active())  # engine.evaluate gathers the shares
    logits, index, _ = evaluate(forward, batches, device=device, logits=True)
    if not len(index):
        raise UserError(f"{args.labels}: no image could be read")
    scores, y = calibration.apply(logits, calibration.of_facts(ckpt)), targets[index].numpy()
    # The verdict on this set (a set the model did not train on is a fresh test of it), beside the one training
    # made, which decided the model's calibration.
    result = with_verdicts(attribute_metrics(scores, y, thresholds, attributes), verdicts(logits, y, attributes))
    result.pop("notes")
    trained = ckpt.get("learnt")
    for k, row in enumerate(result["attributes"]):
        row["learnt_in_training"] = None if trained is None else bool(trained[k])
    if args.json:
        print(json.dumps(to_json(result)))
    else:
        print(f"{len(index)} images, {args.model} (epoch {ckpt.get('epoch')}), thresholds "
              f"{'--threshold ' + str(args.threshold) if args.threshold is not None else 'from the checkpoint'}")
        print(format_table(result))
        if trained is not None:
            print(f"training's verdict: {', '.join(a for a, ok in zip(attributes, trained) if ok) or 'none'} learnt"
                  + (f"; {', '.join(a for a, ok in zip(attributes, trained) if not ok)} not learnt (probability = "
                     "prevalence)" if not all(trained) else ""))
    return 0


def main(argv=None):
    return distributed.launch(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

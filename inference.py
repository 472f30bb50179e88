"""Predict the attributes of images with a trained checkpoint.

    python inference.py image.jpg                 # Attributes present: ['Attr1', 'Attr4']
    python inference.py a.jpg b.png photos/       # one line per image: path: Attributes present: [...]
    python inference.py image.jpg --json          # one JSON object per image, with probabilities
    python inference.py image.jpg --model runs/model.pth --threshold 0.4
    python inference.py image.jpg --explain cams/  # also cams/image_cam.png: Grad-CAM of every attribute

Everything (backbone, attribute names, image size, normalization, thresholds) comes from the checkpoint.
"""
import argparse
import itertools
import json
import os
import sys

import torch

import distributed
from data_loader import make_loader
from dataset import ImageDataset, eval_transform, list_images, load_image
from model import flip_tta, folded_forward, load_checkpoint, model_from_checkpoint
from utils import (UserError, add_runtime_flags, check_batch_size, check_writable, keep_freed_memory, pick_device,
                   resolve_workers)

BATCH_SIZE = 32
NUM_WORKERS = "auto"  # DataLoader workers for several images; auto: 2, or 0 on a CPU with 2 cores or fewer
KEEP_FREED_MEMORY = True  # see train.py


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Predict image attributes with a trained model.")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--model", default="model.pth", help="checkpoint written by train.py")
    p.add_argument("--threshold", type=float, help="one threshold for every attribute (default: the tuned ones)")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--no-tta", action="store_true",
                   help="skip the flip test-time augmentation the model was validated with (faster, less accurate)")
    p.add_argument("--explain", metavar="OUT_DIR", help="write OUT_DIR/<name>_cam.png: Grad-CAM per attribute")
    add_runtime_flags(p, batch_size=BATCH_SIZE, num_workers=NUM_WORKERS, keep_freed=KEEP_FREED_MEMORY)
    return p.parse_args(argv)


def expand(inputs):
    """Files as given, folders as their images (sorted); a missing path stays, to be reported in order."""
    paths = []
    for item in inputs:
        paths += list_images(item) if os.path.isdir(item) else [item]
    return paths


def predict(model, paths, transform, *, device, batch_size, num_workers, tta=False):
    """Yield (path, probabilities list or None, error or None) in input order. tta: the mean of the image's and its
    mirror's probabilities, as the model was validated."""
    if len(paths) == 1:  # one image: no worker processes to start, no BatchNorm folding to pay for
        try:
            x = transform(load_image(paths[0])).unsqueeze(0)
        except UserError as e:
            yield paths[0], None, str(e)
            return
        forward = model.eval()
        forward = flip_tta(forward, features=False) if tta else forward
        with torch.inference_mode():
            yield paths[0], torch.sigmoid(forward(x.to(device).contiguous(memory_format=torch.channels_last)))[0].tolist(), None
        return
    forward = folded_forward(model)
    forward = flip_tta(forward, features=False) if tta else forward
    loader = make_loader(ImageDataset(paths, None, transform), batch_size, False,
                         min(num_workers, len(paths) // batch_size + 1), device=device)
    with torch.inference_mode():
        for indices, images, errors in loader:
            probabilities = {}
            if images is not None:
                probabilities = dict(zip(indices.tolist(), torch.sigmoid(forward(images.to(device))).tolist()))
            messages = dict(errors)
            for i in sorted(list(probabilities) + list(messages)):
                yield paths[i], probabilities.get(i), messages.get(i)


def shared_predict(model, paths, transform, *, batch_size, **kwargs):
    """predict() under torchrun: each rank predicts every world_size-th batch; every rank yields all the results,
    round by round, in input order. One process: predict() itself."""
    if not distributed.active():
        yield from predict(model, paths, transform, batch_size=batch_size, **kwargs)
        return
    batches, rounds = distributed.shard_batches(len(paths), batch_size)
    mine = [paths[i] for batch in batches for i in batch]
    results = predict(model, mine, transform, batch_size=batch_size, **kwargs)
    for r in range(rounds):
        size = len(batches[r]) if r < len(batches) else 0
        for part in distributed.all_gather(list(itertools.islice(results, size))):
            yield from part


def run(args):
    check_batch_size(args)
    if args.explain and args.model.endswith(".onnx"):
        raise UserError(f"{args.model}: --explain needs the PyTorch model (.pth); Grad-CAM takes gradients, which "
                        "an ONNX model does not give")
    if args.explain:
        check_writable([os.path.join(args.explain, "image_cam.png")])
    ckpt = load_checkpoint(args.model)
    device = distributed.local_device(pick_device(args.device))
    if args.keep_freed_memory:
        keep_freed_memory(device)
    model = model_from_checkpoint(ckpt, args.model).to(device).to(memory_format=torch.channels_last)
    attributes = ckpt["attributes"]
    thresholds = [args.threshold] * len(attributes) if args.threshold is not None else ckpt["thresholds"]
    transform = eval_transform(ckpt["image_size"], ckpt["mean"], ckpt["std"])
    paths = expand(args.images)
    if not paths:
        raise UserError(f"no images found in {', '.join(args.images)}")
    single = len(paths) == 1 and not os.path.isdir(args.images[0])
    failures = 0
    workers = resolve_workers(args.num_workers, device)
    tta = ckpt.get("tta", False) and not args.no_tta
    for path, probabilities, error in shared_predict(model, paths, transform, device=device,
                                                     batch_size=args.batch_size, num_workers=workers, tta=tta):
        if error is not None:
            failures += 1
            print(f"error: {error}", file=sys.stderr)
            if args.json:
                print(json.dumps({"image": path, "error": error}), flush=True)
            continue
        present = [a for a, p, t in zip(attributes, probabilities, thresholds) if p >= t]
        if args.explain and distributed.is_main():
            from explain import write_explanation

            out = write_explanation(model, path, probabilities, ckpt=ckpt, thresholds=thresholds,
                                    transform=transform, out_dir=args.explain)
            print(f"wrote {out}", file=sys.stderr)
        if args.json:
            print(json.dumps({"image": path, "present": present,
                              "probabilities": {a: round(p, 6) for a, p in zip(attributes, probabilities)},
                              "thresholds": dict(zip(attributes, thresholds))}), flush=True)
        elif single:
            print(f"Attributes present: {present}")
        else:
            print(f"{path}: Attributes present: {present}", flush=True)
    return 1 if failures else 0


def main(argv=None):
    return distributed.launch(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

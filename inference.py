"""Predict the attributes of images with a trained checkpoint.

    python inference.py image.jpg                 # Attributes present: ['Attr1', 'Attr4']
    python inference.py a.jpg b.png photos/       # one line per image: path: Attributes present: [...]
    python inference.py image.jpg --json          # one JSON object per image, with probabilities
    python inference.py image.jpg --model runs/model.pth --threshold 0.4

    python inference.py image.jpg --model model.onnx  # ONNX Runtime, no PyTorch needed (export.py writes it)

Everything (backbone, attribute names, image size, normalization, thresholds) comes from the model file.
"""
import argparse
import functools
import itertools
import json
import os
import sys
from typing import Callable, NamedTuple, Optional

import numpy as np

# Nothing here imports torch: an .onnx model runs on ONNX Runtime alone (requirements-inference.txt); the
# PyTorch path imports it inside its functions.
import calibration
from images import list_images, load_image, to_array
from onnx_model import OnnxModel, is_onnx
from utils import (UserError, add_runtime_flags, check_batch_size, check_writable, keep_freed_memory, pick_device,
                   resolve_workers, run_cli)

BATCH_SIZE = 32
NUM_WORKERS = "auto"  # DataLoader workers for several images; auto: 2, or 0 on a CPU with 2 cores or fewer
KEEP_FREED_MEMORY = True  # see train.py


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Predict image attributes with a trained model.")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--model", default="model.pth",
                   help="checkpoint written by train.py, or an .onnx file written by export.py")
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


def predict(model, paths, transform, *, device, batch_size, num_workers, tta=False, calibrated=None):
    """Yield (path, probabilities list or None, error or None) in input order. tta: the mean of the image's and its
    mirror's probabilities, as the model was validated; calibrated: logits -> probabilities (the model's
    calibration)."""
    import torch

    from data_loader import make_loader
    from dataset import ImageDataset
    from model import flip_tta, folded_forward

    if len(paths) == 1:  # one image: no worker processes to start, no BatchNorm folding to pay for
        try:
            x = transform(load_image(paths[0])).unsqueeze(0)
        except UserError as e:
            yield paths[0], None, str(e)
            return
        forward = flip_tta(model.eval(), features=False) if tta else model.eval()
        with torch.inference_mode():
            logits = forward(x.to(device).contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
        yield paths[0], calibrated(logits)[0].tolist(), None
        return
    forward = folded_forward(model)
    forward = flip_tta(forward, features=False) if tta else forward
    loader = make_loader(ImageDataset(paths, None, transform), batch_size=batch_size, shuffle=False,
                         num_workers=min(num_workers, len(paths) // batch_size + 1), device=device)
    with torch.inference_mode():
        for indices, images, errors in loader:
            probabilities = {}
            if images is not None:
                logits = forward(images.to(device)).float().cpu().numpy()
                probabilities = dict(zip(indices.tolist(), calibrated(logits).tolist()))
            messages = dict(errors)
            for i in sorted(list(probabilities) + list(messages)):
                yield paths[i], probabilities.get(i), messages.get(i)


def predict_onnx(model, paths, batch_size, tta=False):
    """As predict(), on ONNX Runtime: images decoded in this process, batch_size at a time."""
    size, mean, std = (model.facts[k] for k in ("image_size", "mean", "std"))
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        arrays, errors = {}, {}
        for i, path in enumerate(chunk):
            try:
                arrays[i] = to_array(load_image(path), size, mean, std)
            except UserError as e:
                errors[i] = str(e)
        if arrays:
            p = onnx_probabilities(model, np.stack(list(arrays.values())), tta)
            probabilities = dict(zip(arrays, p.tolist()))
        else:
            probabilities = {}
        for i, path in enumerate(chunk):
            yield path, probabilities.get(i), errors.get(i)


def onnx_probabilities(model, x, tta):
    """(n, K) calibrated probabilities of an (n, 3, S, S) array on ONNX Runtime; tta: of the mean probability with
    the mirror images' (in log space, as model.flip_tta), calibrated as the PyTorch path is."""
    logits = model.logits(x)
    if tta:
        logits = calibration.tta_logits(logits, model.logits(np.ascontiguousarray(x[..., ::-1])))
    return calibration.apply(logits, model.calibration)


class Loaded(NamedTuple):
    """A model file ready to predict. inference.py calls predict and explain; serve.py, which gets images as
    uploads and batches them itself, calls prepare (one PIL image -> one input), forward (a list of inputs -> their
    probability lists, one forward) and figure (PIL image, probabilities, thresholds -> the Grad-CAM figure)."""
    facts: dict
    predict: Callable
    explain: Optional[Callable]
    prepare: Callable
    forward: Callable
    figure: Optional[Callable]


def load_torch(args):
    """A .pth on PyTorch: predict(paths) is predict(...), explain(path, probabilities, thresholds) writes the
    image's Grad-CAM (--explain)."""
    try:
        import torch
    except ImportError:  # a deployment environment (requirements-inference.txt) given a .pth
        raise UserError(f"{args.model}: a PyTorch checkpoint needs torch (pip install -r requirements.txt); "
                        f"or export it with `python export.py {args.model}` and give the .onnx") from None

    import distributed
    from dataset import eval_transform
    from model import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(args.model)
    device = distributed.local_device(pick_device(args.device))
    if args.keep_freed_memory:
        keep_freed_memory(device)
    model = model_from_checkpoint(ckpt, args.model).to(device).to(memory_format=torch.channels_last)
    transform = eval_transform(ckpt["image_size"], ckpt["mean"], ckpt["std"])
    workers = resolve_workers(args.num_workers, device)
    tta = ckpt.get("tta", False) and not args.no_tta

    def explain(path, probabilities, thresholds):
        from explain import write_explanation

        out = write_explanation(model, path, probabilities, ckpt=ckpt, thresholds=thresholds, transform=transform,
                                out_dir=args.explain)
        print(f"wrote {out}", file=sys.stderr)

    @functools.cache  # folded on the first batch: inference.py's own paths never call forward
    def batch_forward():
        from model import flip_tta, folded_forward

        forward = folded_forward(model)
        return flip_tta(forward, features=False) if tta else forward

    calibrated = functools.partial(calibration.apply, calibration=calibration.of_facts(ckpt))

    def forward(inputs):
        with torch.inference_mode():
            logits = batch_forward()(torch.stack(inputs).to(device)).float().cpu().numpy()
        return calibrated(logits).tolist()

    def figure(image, probabilities, thresholds):
        from explain import explanation_figure

        return explanation_figure(model, image, probabilities, ckpt=ckpt, thresholds=thresholds, transform=transform)

    return Loaded(ckpt, lambda paths: predict(model, paths, transform, device=device, batch_size=args.batch_size,
                                              num_workers=workers, tta=tta, calibrated=calibrated),
                  explain, transform, forward, figure)


def load_onnx(args):
    """The same for an .onnx file (--num-workers and --keep-freed-memory do not apply to it; no Grad-CAM)."""
    model = OnnxModel(args.model, device=args.device)
    tta = model.facts.get("tta", False) and not args.no_tta
    size, mean, std = (model.facts[k] for k in ("image_size", "mean", "std"))
    return Loaded(model.facts, lambda paths: predict_onnx(model, paths, args.batch_size, tta), None,
                  lambda image: to_array(image, size, mean, std),
                  lambda inputs: onnx_probabilities(model, np.stack(inputs), tta).tolist(), None)


def load_model(args):
    """args.model (.pth or .onnx) as a Loaded."""
    return (load_onnx if is_onnx(args.model) else load_torch)(args)


def record(path, probabilities, error, *, attributes, thresholds, learnt=None):
    """The --json object of one image (serve.py answers with the same). learnt: the model's verdict per attribute
    (None for a model made before verdicts existed)."""
    if error is not None:
        return {"image": path, "error": error}
    present = [a for a, p, t in zip(attributes, probabilities, thresholds) if p >= t]
    result = {"image": path, "present": present,
              "probabilities": {a: round(p, 6) for a, p in zip(attributes, probabilities)},
              "thresholds": {a: round(float(t), 6) for a, t in zip(attributes, thresholds)}}
    if learnt is not None:
        result["learnt"] = dict(zip(attributes, map(bool, learnt)))
    return result


def torchrun():
    """Started by torchrun with more than one process (distributed.py; torch is there then)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def shared(predictor, batch_size):
    """predictor under torchrun: each rank predicts every world_size-th batch of paths; every rank yields all the
    results, round by round (one batch per rank), in input order."""
    import distributed

    def predict_shared(paths):
        batches, rounds = distributed.shard_batches(len(paths), batch_size)
        results = predictor([paths[i] for batch in batches for i in batch])
        for r in range(rounds):
            mine = list(itertools.islice(results, len(batches[r]) if r < len(batches) else 0))
            for part in distributed.all_gather(mine):
                yield from part

    return predict_shared


def run(args):
    check_batch_size(args)
    if args.explain and is_onnx(args.model):
        raise UserError(f"{args.model}: --explain needs the PyTorch model (.pth); Grad-CAM takes gradients, which "
                        "an ONNX model does not give")
    if args.explain:
        check_writable([os.path.join(args.explain, "image_cam.png")])
    facts, predictor, explain = load_model(args)[:3]
    if torchrun():  # rank 0 prints every line; Grad-CAM too is rank 0's
        predictor = shared(predictor, args.batch_size)
        explain = explain if os.environ.get("RANK") == "0" else None
    attributes = facts["attributes"]
    warning = calibration.not_learnt_warning(facts, args.model)
    if warning and os.environ.get("RANK", "0") == "0":
        print(warning, file=sys.stderr)
    thresholds = [args.threshold] * len(attributes) if args.threshold is not None else facts["thresholds"]
    paths = expand(args.images)
    if not paths:
        raise UserError(f"no images found in {', '.join(args.images)}")
    single = len(paths) == 1 and not os.path.isdir(args.images[0])
    failures = 0
    for path, probabilities, error in predictor(paths):
        result = record(path, probabilities, error, attributes=attributes, thresholds=thresholds,
                        learnt=facts.get("learnt"))
        if error is not None:
            failures += 1
            print(f"error: {error}", file=sys.stderr)
        elif args.explain and explain:
            explain(path, probabilities, thresholds)
        if args.json:
            print(json.dumps(result), flush=True)
        elif error is not None:
            continue
        elif single:
            print(f"Attributes present: {result['present']}")
        else:
            print(f"{path}: Attributes present: {result['present']}", flush=True)
    return 1 if failures else 0


def main(argv=None):
    if torchrun():
        import distributed

        return distributed.launch(run, parse_args(argv))
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

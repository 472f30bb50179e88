"""Export a checkpoint to ONNX, to predict without PyTorch (`python inference.py image.jpg --model model.onnx`).

    python export.py model.pth                          # writes model.onnx beside it
    python export.py model.pth --out deploy/m.onnx --opset 17
    python export.py model.pth --images photos/         # compare on your own images (default: the first 8 of images/)
    python export.py model.pth --int8                   # also model.int8.onnx, quantized (faster, less exact)

The graph is the whole classifier: (N, 3, S, S) float32 images, normalized as in training, in (N is free); two
outputs, `probabilities` (the sigmoid is inside the graph) and `logits`. The checkpoint's facts (attributes,
thresholds, image size, mean/std, backbone, the sha256 of the .pth) go into the file's metadata (onnx_model.py
reads them back). Before the file appears, onnx.checker checks it and ONNX Runtime's probabilities are compared
with PyTorch's on sample images: a difference above TOLERANCE is an error and no file is left.
--int8 adds a statically quantized copy (onnxruntime.quantization, calibrated on the first CALIBRATION_IMAGES of
--images): its difference from the float model is printed, not held to TOLERANCE; measure it with evaluate.py.
"""
import argparse
import hashlib
import os
import sys
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

from images import list_images, load_image, to_array
from model import load_checkpoint, model_from_checkpoint
from onnx_model import INPUT, OUTPUTS, OnnxModel, metadata
from utils import UserError, atomic_write, check_writable, run_cli

OPSET = 17  # ONNX opset of the graph; ONNX Runtime 1.16 and later run it
TOLERANCE = 1e-4  # largest allowed |ONNX Runtime - PyTorch| of any probability on the sample images
CHECK_IMAGES = 8  # sample images compared
CALIBRATION_IMAGES = 64  # --int8: images whose activations set the int8 ranges


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Export a trained checkpoint to ONNX (runs on ONNX Runtime alone).")
    p.add_argument("checkpoint", help="model.pth written by train.py")
    p.add_argument("--out", help="the .onnx file to write (default: the checkpoint's name with .onnx)")
    p.add_argument("--opset", type=int, default=OPSET, help="ONNX opset version")
    p.add_argument("--images", default="images", help="folder whose first images check the export (generated "
                                                       "pictures if it has none)")
    p.add_argument("--check-images", type=int, default=CHECK_IMAGES, help="how many images to compare")
    p.add_argument("--int8", action="store_true", help="also write OUT.int8.onnx, quantized to int8 (static, QDQ)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


class Exported(nn.Module):
    """The graph's function: probabilities for a deployment, logits for evaluate.py (its metrics take logits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(x)
        return torch.sigmoid(logits), logits


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_images(folder, n, facts):
    """(names, (n, 3, S, S) array): the first n readable images of folder, else n generated garments."""
    names, arrays = [], []
    for path in list_images(folder) if os.path.isdir(folder) else []:
        try:
            arrays.append(to_array(load_image(path), facts["image_size"], facts["mean"], facts["std"]))
        except UserError:
            continue  # a broken picture in the folder is not the export's concern
        names.append(path)
        if len(names) == n:
            break
    if not names:
        import make_sample

        with tempfile.TemporaryDirectory() as tmp:
            make_sample.generate(n, tmp, os.path.join(tmp, "labels.txt"), seed=0, na_rate=0)
            return sample_images(tmp, n, facts)
    return names, np.stack(arrays)


def export_graph(model, path, *, image_size, opset):
    # The TorchScript exporter: it exports every backbone in model.BACKBONES in about a second each; the dynamo
    # exporter (dynamo=True) does too, but takes 7-17 s each at 64 px and prints its progress.
    example = torch.zeros(2, 3, image_size, image_size)
    batch = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's concern
        try:
            torch.onnx.export(Exported(model).eval(), (example,), path, dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=list(OUTPUTS),
                              dynamic_axes={name: batch for name in (INPUT, *OUTPUTS)}, do_constant_folding=True)
        except Exception as e:
            raise UserError(f"cannot export to ONNX opset {opset} ({type(e).__name__}: {str(e)[:200]}); "
                            f"try --opset {OPSET}") from None


def add_metadata(path, props):
    """Write the facts into the file, then onnx.checker (full check, shapes inferred)."""
    import onnx

    graph = onnx.load(path)
    for key, value in props.items():
        graph.metadata_props.add(key=key, value=value)
    graph.producer_name = "aimonk-multilabel export.py"
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, path)


def compare(model, path, names, x, out):
    """Largest |ONNX Runtime - PyTorch| probability over the sample batch and over its first image alone (the
    batch axis is free); over TOLERANCE is an error."""
    from calibration import apply, of_facts

    exported = OnnxModel(path, device="cpu")
    with torch.inference_mode():
        expected = apply(model(torch.from_numpy(x)).numpy(), of_facts(exported.facts))
    diff = np.abs(exported(x) - expected)
    single = float(np.abs(exported(x[:1]) - expected[:1]).max())
    worst = float(diff.max())
    if not worst <= TOLERANCE or not single <= TOLERANCE:  # `not <=`: a NaN fails too
        image = names[int(np.nanargmax(diff.max(1)))] if worst == worst else names[0]
        raise UserError(f"{out}: ONNX Runtime and PyTorch differ by {max(worst, single):.2e} (more than "
                        f"{TOLERANCE:g}) on {image}; not written (try another --opset)")
    return max(worst, single)


def quantize(source, out, x):
    """Static int8 quantization (QDQ, per-channel weights) of the float model at source, its activation ranges
    calibrated on x; written to out (the metadata is kept). Returns its largest probability difference on x."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(range(len(x)))

        def get_next(self):
            i = next(self.rows, None)
            return None if i is None else {INPUT: x[i:i + 1]}

    result = {}

    def write(tmp):
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = os.path.join(folder, "prepared.onnx")
            quant_pre_process(source, prepared)  # shapes inferred and the graph optimized first, as ORT advises
            quantize_static(prepared, tmp, Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        result["diff"] = float(np.abs(OnnxModel(tmp, device="cpu")(x) - OnnxModel(source, device="cpu")(x)).max())

    atomic_write(out, write)
    return result["diff"]


def run(args):
    out = args.out or os.path.splitext(args.checkpoint)[0] + ".onnx"
    if args.check_images < 1:
        raise UserError("--check-images must be at least 1")
    ckpt = load_checkpoint(args.checkpoint)
    check_writable([out])
    model = model_from_checkpoint(ckpt, args.checkpoint)
    names, x = sample_images(args.images, args.check_images, ckpt)
    props = metadata(ckpt, source=args.checkpoint, source_sha256=sha256(args.checkpoint))
    result = {}

    def write(tmp):
        export_graph(model, tmp, image_size=ckpt["image_size"], opset=args.opset)
        add_metadata(tmp, props)
        result["diff"] = compare(model, tmp, names, x, out)

    atomic_write(out, write)
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB): {ckpt['backbone']} {ckpt['image_size']}px, "
          f"{len(ckpt['attributes'])} attributes, opset {args.opset}; ONNX Runtime vs PyTorch on {len(names)} "
          f"images: largest probability difference {result['diff']:.1e}")
    if args.int8:
        int8 = os.path.splitext(out)[0] + ".int8.onnx"
        _, calibration = sample_images(args.images, max(CALIBRATION_IMAGES, args.check_images), ckpt)
        diff = quantize(out, int8, calibration)
        print(f"wrote {int8} ({os.path.getsize(int8) / 1e6:.1f} MB): int8, calibrated on {len(calibration)} images; "
              f"largest probability difference from {out} on them {diff:.1e} (check its metrics with evaluate.py)")
    return 0


def main(argv=None):
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

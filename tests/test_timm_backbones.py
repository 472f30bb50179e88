"""--backbone timm:NAME: a BatchNorm CNN, a LayerNorm CNN, a ViT and a MobileNetV4, offline with random weights.

Each architecture: one cached-path epoch trained from a weights file (--weights PATH, timm's key names), whose
checkpoint's features equal timm's own model with that file loaded; inference; ONNX export (ONNX Runtime vs
PyTorch); --unfreeze last on the full loop (only the last stage and the final norm move); Grad-CAM of the image's
size. 64 px everywhere (the ViT is built for it: timm's img_size).
"""
import contextlib
import io
import os

import numpy as np
import pytest
import torch

import explain
import calibration
import export
import inference
import model
import train
from conftest import ROOT, run_script
from onnx_model import OnnxModel

timm = pytest.importorskip("timm")

SIZE = 64
ARCHS = ["resnet18", "convnext_atto", "vit_tiny_patch16_224", "mobilenetv4_conv_small"]
# The modules --unfreeze last trains: the last stage (timm's feature_info) and the parameter-holding modules after it.
LAST = {"resnet18": ["layer4"], "convnext_atto": ["stages.3", "head"], "vit_tiny_patch16_224": ["blocks.11", "norm"],
        "mobilenetv4_conv_small": ["blocks.4", "conv_head", "norm_head"]}
FEATURES = {"resnet18": 512, "convnext_atto": 320, "vit_tiny_patch16_224": 192, "mobilenetv4_conv_small": 1280}


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    import make_sample

    folder = tmp_path_factory.mktemp("timm_set")
    make_sample.generate(12, str(folder / "images"), str(folder / "labels.txt"), seed=3, na_rate=0.05)
    return str(folder / "labels.txt"), str(folder / "images")


def args_for(small_set, out, arch, *extra):
    labels, images = small_set
    return ["--backbone", f"timm:{arch}", "--image-size", str(SIZE), "--num-workers", "0", "--batch-size", "4",
            "--folds", "0", "--no-report", "--epochs", "1", "--labels", labels, "--images", images,
            "--out", str(out / "model.pth"), "--curve", str(out / "curve.png"), "--cache-dir", str(out / "cache"),
            *extra]


def quiet(fn, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = fn([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def timm_reference(arch, seed):
    """timm's own model as a user makes it (with its ImageNet classifier), random weights of a seed."""
    torch.manual_seed(seed)
    kwargs = {"img_size": SIZE} if arch.startswith("vit") else {}
    return timm.create_model(arch, **kwargs).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_file_cached_epoch_inference_and_onnx(arch, small_set, tmp_path):
    reference = timm_reference(arch, seed=11)
    weights = tmp_path / (f"{arch}.safetensors" if arch in ("convnext_atto", "vit_tiny_patch16_224") else f"{arch}.pth")
    if weights.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    else:
        torch.save(reference.state_dict(), weights)

    rc, out, err = quiet(train.main, args_for(small_set, tmp_path, arch, "--weights", weights))
    assert rc == 0, err
    assert "path: cached features (validation split)" in out and "epoch   1/1" in out

    ckpt = model.load_checkpoint(str(tmp_path / "model.pth"))
    cfg = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(arch).to_dict())
    assert ckpt["backbone"] == f"timm:{arch}" and ckpt["image_size"] == SIZE
    assert ckpt["mean"] == list(cfg["mean"]) and ckpt["std"] == list(cfg["std"])  # the pretrained config's
    rebuilt = model.model_from_checkpoint(ckpt)
    assert rebuilt.feature_dim == FEATURES[arch]
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)  # pooled pre-logits
        torch.testing.assert_close(rebuilt.backbone(x), expected)

    labels, images = small_set
    first = sorted(os.listdir(images))[:2]
    rc, out, err = quiet(inference.main, [*[os.path.join(images, n) for n in first], "--model", tmp_path / "model.pth",
                                          "--num-workers", "0", "--json"])
    assert rc == 0, err
    assert len(out.splitlines()) == 2 and '"probabilities"' in out

    rc, out, err = quiet(export.main, [tmp_path / "model.pth", "--images", images, "--check-images", "2"])
    assert rc == 0, err  # export.py itself refuses a difference above 1e-4
    onnx_model = OnnxModel(str(tmp_path / "model.onnx"), device="cpu")
    assert onnx_model.facts["backbone"] == f"timm:{arch}"
    with torch.inference_mode():
        logits = rebuilt(x).numpy()
    # Both calibrated by the model's calibration (the metadata carries it): the same probabilities.
    np.testing.assert_allclose(onnx_model(x.numpy()), calibration.apply(logits, calibration.of_facts(ckpt)), atol=1e-4)
    np.testing.assert_allclose(onnx_model.logits(x.numpy()), logits, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_unfreeze_last_on_the_full_loop_trains_the_last_stage_and_final_norm_only(arch, small_set, tmp_path):
    rc, out, err = quiet(train.main, args_for(small_set, tmp_path, arch, "--weights", "none", "--unfreeze", "last",
                                              "--backbone-lr", "1e-2", "--val-fraction", "0.25"))
    assert rc == 0, err
    assert "path: full loop (--unfreeze last)" in out
    trained = model.load_checkpoint(str(tmp_path / "model.pth"))["model"]
    torch.manual_seed(0)  # train.py's seed, set just before it builds the model: the same initial weights
    initial = model.build_model(f"timm:{arch}", 4, "none", "last", SIZE, head="mlp").state_dict()
    moved = {k[len("backbone."):] for k, v in initial.items()
             if k.startswith("backbone.") and v.is_floating_point() and not torch.equal(v, trained[k])}
    under_last = {k for k in moved if any(k.startswith(m + ".") for m in LAST[arch])}
    assert moved and moved == under_last, sorted(moved - under_last)[:5]
    assert any(k.startswith(LAST[arch][-1] + ".") for k in moved)  # the final norm (or head conv) trained too
    if arch == "mobilenetv4_conv_small":  # its BatchNorm on pooled features: scale and shift train, statistics stay
        assert {"norm_head.weight", "norm_head.bias"} <= moved and "norm_head.running_var" not in moved
        assert "blocks.4.0.bn1.running_var" in moved  # the last stage's own BatchNorm statistics do move
    built = model.build_model(f"timm:{arch}", 4, "none", "last", SIZE)
    assert built.trainable == LAST[arch]
    assert {n for n, p in built.backbone.named_parameters() if p.requires_grad} == \
        {n for n, _ in built.backbone.named_parameters() if any(n.startswith(m + ".") for m in LAST[arch])}


@pytest.mark.parametrize("arch", ARCHS)
def test_gradcam_is_a_map_of_the_image_size(arch, small_set):
    from dataset import eval_transform, load_image

    _, images = small_set
    torch.manual_seed(0)
    m = model.build_model(f"timm:{arch}", 4, "none", image_size=SIZE)
    x = torch.stack([eval_transform(SIZE)(load_image(os.path.join(images, n))) for n in sorted(os.listdir(images))[:2]])
    signed = explain.gradcam(m, x, [0, 3], backbone=f"timm:{arch}", relu=False)
    assert signed.shape == (2, SIZE, SIZE) and np.isfinite(signed).all()
    for cam in signed:
        assert np.ptp(cam) > 0.01 * np.abs(cam).max() > 0
    assert not any(p.grad is not None for p in m.parameters())
    relu = explain.gradcam(m, x, [0, 3], backbone=f"timm:{arch}")
    assert (relu >= 0).all()


def test_vit_gradcam_is_the_hand_computed_map_of_the_last_blocks_patch_tokens():
    """alpha_c = the mean over patches of dlogit/dtoken_c; map = relu(sum_c alpha_c token_c) on the 4x4 grid of a
    64 px image, the class token left out, then upsampled bilinearly."""
    torch.manual_seed(0)
    m = model.build_model("timm:vit_tiny_patch16_224", 4, "none", image_size=SIZE).eval()
    assert model.gradcam_target("timm:vit_tiny_patch16_224", m.backbone) == ("blocks.11", 1)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    tokens = None

    def keep(mod, args):  # the tokens the last block reads, as a leaf the gradient is taken for
        nonlocal tokens
        tokens = args[0].detach().requires_grad_(True)
        return (tokens,)

    handle = m.backbone.blocks[11].register_forward_pre_hook(keep)
    logit = m(x)[0, 2]
    handle.remove()
    (grad,) = torch.autograd.grad(logit, tokens)
    alpha = grad[0, 1:].mean(0)
    expected = torch.relu((tokens[0, 1:] * alpha).sum(-1)).reshape(1, 1, 4, 4)
    expected = torch.nn.functional.interpolate(expected, (SIZE, SIZE), mode="bilinear")[0, 0].detach().numpy()
    np.testing.assert_allclose(explain.gradcam(m, x, [2], backbone="timm:vit_tiny_patch16_224")[0], expected,
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv4_conv_small"])
def test_batchnorm_folding_keeps_the_features(arch):
    torch.manual_seed(0)
    m = model.build_model(f"timm:{arch}", 4, "none", image_size=SIZE)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.backbone.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5, generator=g), mod.running_var.uniform_(0.5, 2.0, generator=g)
    folded = model.fold_batchnorm(m.backbone)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        expected = m.backbone(x)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    if arch == "resnet18":  # plain Conv2d + BatchNorm2d pairs: all folded
        assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in folded.modules())


def test_a_weights_file_of_another_model_names_the_missing_and_unexpected_keys(tmp_path):
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(model.UserError) as e:
        model.build_model("timm:convnext_atto", 4, str(tmp_path / "resnet18.pth"), image_size=SIZE)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'resnet18.pth'}: not a state dict of timm's convnext_atto")
    assert "missing keys" in message and "stem.0.weight" in message
    assert "unexpected keys" in message and "conv1.weight" in message
    # Same keys, other shapes (a wider ConvNeXt): one line naming the first mismatch.
    torch.save(timm.create_model("convnext_femto").state_dict(), tmp_path / "femto.pth")
    with pytest.raises(model.UserError, match=r"femto\.pth: weights of other shapes than timm's convnext_atto"):
        model.build_model("timm:convnext_atto", 4, str(tmp_path / "femto.pth"), image_size=SIZE)


def test_pretrained_weights_not_in_the_cache_offline_is_one_error_line(small_set, tmp_path):
    labels, images = small_set
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    import subprocess
    import sys

    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--backbone", "timm:resnet18.a1_in1k",
                             "--weights", "pretrained", "--labels", labels, "--images", images, "--no-report",
                             "--out", str(tmp_path / "m.pth"), "--curve", str(tmp_path / "c.png"),
                             "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: cannot get the pretrained weights of timm:resnet18.a1_in1k")
    assert str(tmp_path / "hf" / "hub") in line and "models--timm--resnet18.a1_in1k" in line
    assert "huggingface-cli download timm/resnet18.a1_in1k" in line and "--weights none" in line
    assert not (tmp_path / "m.pth").exists()


def test_unknown_timm_name_or_tag_is_one_argparse_error(capsys):
    for name, said in [("timm:resnet18.no_such_tag", "timm has no tag 'no_such_tag' for resnet18; its tags: "
                                                     "resnet18.a1_in1k"),
                       ("timm:resnet_nonexistent", "unknown timm model 'resnet_nonexistent'")]:
        with pytest.raises(SystemExit) as e:
            train.parse_args(["--backbone", name])
        assert e.value.code == 2
        assert said in capsys.readouterr().err


def test_list_backbones_shows_feature_and_image_sizes(capsys):
    assert train.main(["--list-backbones", "convnext_at"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["backbone", "features", "size"]
    row = next(line for line in lines if line.startswith("timm:convnext_atto.d2_in1k "))
    assert row.split()[1:3] == ["320", "224"]
    assert not any(line.startswith("resnet50") for line in lines)  # the pattern filters the built-ins too
    assert train.main(["--list-backbones", "resnet1*"]) == 0  # resnet10t, 18, 101, 152 with their tags: over the limit
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + model.LIST_LIMIT + 1 and lines[-1].startswith("... and ")  # bounded
    assert lines[1].split()[:3] == ["timm:resnet10t.c3_in1k", "512", "176"]  # that tag's own input size
    assert train.main(["--list-backbones"]) == 0  # no pattern: the built-ins, and how many timm names there are
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:3] == ["efficientnet_lite0", "1600", "288"] for line in lines)
    assert lines[-1].startswith(f"timm:NAME[.TAG]: timm {timm.__version__} has ")

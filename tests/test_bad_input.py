"""Everything a user can get wrong: bad images, bad model files, bad output paths, bad labels files.

Rule under test: an error is one `error:` line on stderr naming the file, a non-zero exit code and no
traceback (unless --debug); a warning is a `warning:` line, counted in the run's summary.
"""
import ast
import contextlib
import glob
import io
import json
import os
import pickle
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import feature_cache
import inference
import make_sample
import train
from conftest import FAST, ROOT, run_script
from utils import UserError

BAD = ["zero.jpg", "truncated.jpg", "text.jpg", "bomb.png"]  # exist, cannot be decoded
ODD = ["rgba.png", "palette.png", "palette_t.png", "gray.png", "gray16.png", "cmyk.jpg", "exif.jpg", "tiny.png"]
MISSING = "ghost.jpg"  # listed in the labels file, not on disk
N_GOOD = 24
# conftest's FAST with a lighter backbone at 32 pixels: these tests check the handling of bad input, not the model.
QUICK = FAST + ["--image-size", "32", "--backbone", "mobilenet_v3_large"]


def call(module, argv):
    """Run module.main(argv) in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = module.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def warning_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def summary(stdout):
    """The final `warnings: N (...)` line as (N, {reason: count})."""
    (line,) = [line for line in stdout.splitlines() if line.startswith("warnings:")]
    m = re.fullmatch(r"warnings: (\d+) \((.*)\)", line)
    assert m, line
    parts = dict(reversed(p.split(" ", 1)) for p in m.group(2).split(", "))
    return int(m.group(1)), {reason: int(n) for reason, n in parts.items()}




def exif_rotated(upright):
    """Pixels stored sideways with EXIF Orientation 6 ("rotate 90° clockwise to display")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return upright.transpose(Image.Transpose.ROTATE_90), exif.tobytes()


def make_odd_and_bad(folder, picture):
    """Write the odd-but-valid and the broken images next to the generated ones."""
    f = lambda name: os.path.join(folder, name)  # noqa: E731
    rgba = picture.convert("RGBA")
    alpha = Image.new("L", picture.size, 255)
    alpha.paste(0, (0, 0, picture.width // 3, picture.height))
    rgba.putalpha(alpha)
    rgba.save(f("rgba.png"))
    picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(f("palette.png"))
    picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(f("palette_t.png"), transparency=0)
    picture.convert("L").save(f("gray.png"))
    Image.fromarray((np.asarray(picture.convert("L"), dtype=np.uint16) * 257)).save(f("gray16.png"))
    picture.convert("CMYK").save(f("cmyk.jpg"), quality=90)
    stored, exif = exif_rotated(picture)
    stored.save(f("exif.jpg"), quality=90, exif=exif)
    Image.new("RGB", (1, 1), (120, 30, 200)).save(f("tiny.png"))

    open(f("zero.jpg"), "wb").close()
    with open(f("img_0001.jpg"), "rb") as src:
        data = src.read()
    with open(f("truncated.jpg"), "wb") as dst:
        dst.write(data[:len(data) // 2])
    with open(f("text.jpg"), "w") as dst:
        dst.write("not a picture, just text named .jpg\n")
    with open(f("bomb.png"), "wb") as dst:
        dst.write(make_sample.png_declaring(100_000, 100_000))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """24 generated images + odd-but-valid + broken images, and a labels file listing all (and one missing)."""
    root = tmp_path_factory.mktemp("mixed")
    images, labels = str(root / "images"), str(root / "labels.txt")
    make_sample.generate(N_GOOD, images, labels, seed=7, na_rate=0.09)
    make_odd_and_bad(images, Image.open(os.path.join(images, "img_0002.jpg")).convert("RGB"))
    with open(labels, "a") as f:
        for i, name in enumerate(ODD + BAD + [MISSING]):
            f.write(f"{name} {i % 2} {(i // 2) % 2} NA {int(i == 3)}\n")
    return {"root": root, "labels": labels, "images": images}


def train_argv(mixed, out_dir, *extra):
    return QUICK + ["--labels", mixed["labels"], "--images", mixed["images"], "--epochs", "1",
                   "--out", os.path.join(out_dir, "m.pth"), "--curve", os.path.join(out_dir, "curve.png"), *extra]


@pytest.fixture(scope="module")
def cached_run(mixed, tmp_path_factory):
    """Train on the mixed set through the feature cache (all rows train); its model serves inference tests."""
    out = str(tmp_path_factory.mktemp("cached_run"))
    cache = os.path.join(out, "cache")
    rc, stdout, stderr = call(train, train_argv(mixed, out, "--cache-dir", cache, "--val-fraction", "0"))
    return {"rc": rc, "stdout": stdout, "stderr": stderr, "out": out, "cache": cache,
            "model": os.path.join(out, "m.pth")}


@pytest.fixture(scope="module")
def model_path(cached_run):
    assert cached_run["rc"] == 0, cached_run["stderr"]
    return cached_run["model"]


def assert_bad_images_warned_and_counted(mixed, rc, stdout, stderr):
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    warnings = warning_lines(stderr)
    for name in BAD + [MISSING]:
        path = os.path.join(mixed["images"], name)
        naming = [w for w in warnings if path in w]
        assert len(naming) == 1, (name, warnings)
    for name in ODD + [f"img_{i:04d}.jpg" for i in range(1, N_GOOD + 1)]:
        assert not [w for w in warnings if os.path.join(mixed["images"], name) in w], name
    assert len(warnings) == len(BAD) + 1
    assert summary(stdout) == (len(BAD) + 1, {"image not found": 1, "unreadable image": len(BAD)})
    assert "train_loss nan" not in stdout


# ---------------------------------------------------------------- training with broken images

def test_the_odd_images_are_what_their_names_say(mixed):
    def opened(name):
        return Image.open(os.path.join(mixed["images"], name))

    modes = {name: opened(name).mode for name in ODD}
    assert modes == {"rgba.png": "RGBA", "palette.png": "P", "palette_t.png": "P", "gray.png": "L",
                     "gray16.png": "I;16", "cmyk.jpg": "CMYK", "exif.jpg": "RGB", "tiny.png": "RGB"}
    assert "transparency" in opened("palette_t.png").info and "transparency" not in opened("palette.png").info
    assert opened("exif.jpg").getexif()[0x0112] == 6
    assert opened("tiny.png").size == (1, 1)
    assert os.path.getsize(os.path.join(mixed["images"], "bomb.png")) < 100
    assert not os.path.exists(os.path.join(mixed["images"], MISSING))


def test_training_with_feature_cache_skips_and_counts_bad_images(mixed, cached_run):
    assert_bad_images_warned_and_counted(mixed, cached_run["rc"], cached_run["stdout"], cached_run["stderr"])
    # All 32 readable images train (val fraction 0): 4 steps of 8; with the 4 broken ones it would be 5.
    assert f"({(N_GOOD + len(ODD)) // 8} steps)" in cached_run["stdout"]
    (index_file,) = glob.glob(os.path.join(cached_run["cache"], "*", "index.npz"))
    with np.load(index_file) as index:
        keys = feature_cache.decode_keys(index["keys"], len(index["crc"]))
    cached = {os.path.basename(key.split("|")[0]) for key in keys}
    assert cached == set(ODD) | {f"img_{i:04d}.jpg" for i in range(1, N_GOOD + 1)}
    with open(os.path.join(cached_run["out"], "metrics.json")) as f:
        warnings = json.load(f)["warnings"]
    assert warnings["counts"] == {"image not found": 1, "unreadable image": len(BAD)}
    for name in BAD + [MISSING]:  # the summary file keeps the messages too
        assert len([m for m in warnings["messages"] if os.path.join(mixed["images"], name) in m]) == 1


def test_training_without_cache_skips_and_counts_bad_images(mixed, tmp_path):
    rc, stdout, stderr = call(train, train_argv(mixed, str(tmp_path), "--no-cache"))
    assert_bad_images_warned_and_counted(mixed, rc, stdout, stderr)
    assert os.path.isfile(tmp_path / "m.pth")


def test_full_loop_with_workers_survives_bad_images(mixed, tmp_path):
    """The truncated JPEG passes a header check and fails only when decoded, inside a DataLoader worker."""
    rc, stdout, stderr = call(train, train_argv(mixed, str(tmp_path), "--augment", "strong", "--num-workers", "2"))
    assert "path: full loop" in stdout
    assert_bad_images_warned_and_counted(mixed, rc, stdout, stderr)
    (truncated,) = [w for w in warning_lines(stderr) if "truncated.jpg" in w]
    assert "cannot read image" in truncated
    (bomb,) = [w for w in warning_lines(stderr) if "bomb.png" in w]
    assert "decompression bomb" in bomb
    (zero,) = [w for w in warning_lines(stderr) if "zero.jpg" in w]
    assert "empty file" in zero
    assert os.path.isfile(tmp_path / "m.pth")


# ---------------------------------------------------------------- inference with broken images

def predict(model, *images, extra=()):
    return call(inference, [*images, "--model", model, "--device", "cpu", "--num-workers", "0", *extra])


def test_inference_reports_each_bad_image_and_predicts_the_rest(mixed, model_path):
    img = lambda n: os.path.join(mixed["images"], n)  # noqa: E731
    paths = [img("img_0003.jpg"), img("zero.jpg"), img("text.jpg"), img("truncated.jpg"), img("bomb.png"),
             img(MISSING), img("img_0004.jpg")]
    rc, stdout, stderr = predict(model_path, *paths)
    assert rc != 0
    assert "Traceback" not in stderr
    lines = stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{paths[0]}: Attributes present: [")
    assert lines[1].startswith(f"{paths[-1]}: Attributes present: [")
    errors = error_lines(stderr)
    assert len(errors) == 5 and len(stderr.splitlines()) == 5
    for path, line in zip(paths[1:-1], errors):
        assert path in line


@pytest.mark.parametrize("workers", [0, 2])
def test_inference_json_stays_one_object_per_line(mixed, model_path, workers):
    img = lambda n: os.path.join(mixed["images"], n)  # noqa: E731
    paths = [img("img_0005.jpg"), img("zero.jpg"), img("bomb.png"), img("img_0006.jpg"), img("text.jpg"),
             img("img_0007.jpg")]
    rc, stdout, stderr = call(inference, [*paths, "--model", model_path, "--device", "cpu", "--json",
                                          "--num-workers", workers, "--batch-size", "2"])
    assert rc != 0
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [r["image"] for r in records] == paths
    for path, record in zip(paths, records):
        if os.path.basename(path).startswith("img_"):
            assert set(record) == {"image", "present", "probabilities", "thresholds"}
            assert list(record["probabilities"]) == ["Attr1", "Attr2", "Attr3", "Attr4"]
            assert all(0 <= p <= 1 for p in record["probabilities"].values())
        else:
            assert set(record) == {"image", "error"}
            assert path in record["error"]
    assert len(error_lines(stderr)) == 3


def test_inference_single_bad_image(mixed, model_path):
    path = os.path.join(mixed["images"], "truncated.jpg")
    rc, stdout, stderr = predict(model_path, path)
    assert rc != 0
    assert stdout == ""
    (line,) = stderr.splitlines()
    assert line.startswith("error: ") and path in line


def test_inference_predicts_every_odd_but_valid_image(mixed, model_path):
    paths = [os.path.join(mixed["images"], n) for n in ODD]
    rc, stdout, stderr = predict(model_path, *paths, extra=["--json"])
    assert rc == 0, stderr
    assert stderr == ""
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [r["image"] for r in records] == paths
    assert all("probabilities" in r for r in records)


@pytest.fixture(scope="module")
def sensitive_model(model_path, tmp_path_factory):
    """The trained checkpoint with a seeded random resnet50 in place of its weights: the lighter backbone,
    random and frozen, gives the same probabilities for a picture and its rotation; this one does not."""
    from model import build_model

    ckpt = torch.load(model_path, map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    net = build_model("resnet50", len(ckpt["attributes"]), "none", image_size=ckpt["image_size"],
                      head=ckpt["config"]["head"])
    path = str(tmp_path_factory.mktemp("sensitive") / "resnet50.pth")
    torch.save({**ckpt, "backbone": "resnet50", "model": net.state_dict()}, path)
    return path


def test_inference_uses_the_upright_exif_picture(sensitive_model, tmp_path):
    # The EXIF JPEG's pixels, decoded and turned upright, saved losslessly: the same picture upright.
    picture = Image.effect_noise((48, 32), 80).convert("RGB")
    picture.paste((250, 20, 20), (0, 0, 24, 12))
    stored, exif = exif_rotated(picture)
    stored.save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    decoded = Image.open(tmp_path / "rotated.jpg")
    decoded.load()
    decoded.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    decoded.save(tmp_path / "sideways.png")

    def probabilities(name):
        rc, stdout, stderr = predict(sensitive_model, str(tmp_path / name), extra=["--json"])
        assert rc == 0, stderr
        return json.loads(stdout)["probabilities"]

    upright = probabilities("upright.png")
    assert probabilities("rotated.jpg") == upright
    assert probabilities("sideways.png") != upright  # the check can tell the two orientations apart


# ---------------------------------------------------------------- model files

def damaged_models(real, folder):
    """name -> path of a model file that must be refused with a clear error."""
    def path(name):
        return os.path.join(folder, name)

    with open(real, "rb") as f:
        data = f.read()
    with open(path("truncated.pth"), "wb") as f:
        f.write(data[:len(data) // 2])
    open(path("empty.pth"), "wb").close()
    with open(path("text.pth"), "w") as f:
        f.write("this is not a model\n")
    torch.save({"weights": torch.zeros(3)}, path("plain_dict.pth"))
    torch.save(torch.zeros(3), path("tensor.pth"))

    ckpt = torch.load(real, map_location="cpu", weights_only=True)
    variants = {
        "more_attributes.pth": dict(attributes=ckpt["attributes"] + ["Extra"], thresholds=ckpt["thresholds"] + [0.5]),
        "fewer_attributes.pth": dict(attributes=ckpt["attributes"][:2], thresholds=ckpt["thresholds"][:2]),
        "attributes_only.pth": dict(attributes=ckpt["attributes"] + ["Extra"]),
        "other_backbone.pth": dict(backbone="resnet50" if ckpt["backbone"] != "resnet50" else "efficientnet_b0"),
        "unknown_backbone.pth": dict(backbone="vgg99"),
    }
    for name, change in variants.items():
        torch.save({**ckpt, **change}, path(name))
    incomplete = dict(ckpt)
    del incomplete["image_size"]
    torch.save(incomplete, path("incomplete.pth"))
    names = ["truncated.pth", "empty.pth", "text.pth", "plain_dict.pth", "tensor.pth", "incomplete.pth",
             *variants, "missing.pth"]
    return {name: path(name) for name in names}


@pytest.fixture(scope="module")
def bad_models(model_path, tmp_path_factory):
    return damaged_models(model_path, str(tmp_path_factory.mktemp("bad_models")))


@pytest.mark.parametrize("name", ["truncated.pth", "empty.pth", "text.pth", "plain_dict.pth", "tensor.pth",
                                  "incomplete.pth", "more_attributes.pth", "fewer_attributes.pth",
                                  "attributes_only.pth", "other_backbone.pth", "unknown_backbone.pth",
                                  "missing.pth"])
def test_bad_model_file_is_one_clear_error(mixed, bad_models, name):
    path = bad_models[name]
    rc, stdout, stderr = predict(path, os.path.join(mixed["images"], "img_0001.jpg"))
    assert rc == 2
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and path in lines[0]


def test_bad_model_file_from_the_command_line_has_no_traceback(mixed, bad_models):
    result = run_script("inference.py", os.path.join(mixed["images"], "img_0001.jpg"),
                        "--model", bad_models["truncated.pth"], "--device", "cpu")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and bad_models["truncated.pth"] in line
    assert result.stdout == ""


def test_debug_shows_the_underlying_error(mixed, bad_models):
    with pytest.raises(UserError):
        inference.main([os.path.join(mixed["images"], "img_0001.jpg"), "--model", bad_models["text.pth"],
                        "--device", "cpu", "--debug"])


class OpensAFile:
    """Unpickling this calls open(marker, 'w'): a model file that would run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_malicious(path, payload, writer):
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:  # a zip checkpoint, with the payload where the weights belong
        torch.save({"format": "aimonk-multilabel/1", "model": payload}, path)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
@pytest.mark.parametrize("payload", [OpensAFile, RunsAShellCommand])
def test_model_file_that_would_run_code_is_refused(mixed, tmp_path, payload, writer):
    marker = tmp_path / "pwned"
    model = str(tmp_path / "model.pth")
    write_malicious(model, payload(str(marker)), writer)
    rc, stdout, stderr = predict(model, os.path.join(mixed["images"], "img_0001.jpg"))
    assert rc == 2
    (line,) = stderr.splitlines()
    assert line.startswith("error: ") and model in line
    assert not marker.exists()


def test_malicious_resume_and_weights_files_are_refused(mixed, tmp_path):
    marker = tmp_path / "pwned"
    evil = str(tmp_path / "evil.pth")
    write_malicious(evil, OpensAFile(str(marker)), "torch.save")
    for extra in (["--resume", evil], ["--weights", evil]):
        rc, stdout, stderr = call(train, train_argv(mixed, str(tmp_path / "out"), *extra))
        assert rc == 2, (extra, stderr)
        assert [line for line in error_lines(stderr) if evil in line], stderr
        assert not marker.exists()
        assert "epoch " not in stdout


@pytest.mark.parametrize("name", ["missing.pth", "text.pth", "truncated.pth", "tensor.pth"])
def test_bad_weights_or_resume_file_is_one_clear_error(tiny_set, bad_models, tmp_path, name):
    labels, images = tiny_set
    for flag in ("--weights", "--resume"):
        rc, stdout, stderr = call(train, QUICK + ["--labels", labels, "--images", images, "--epochs", "1",
                                                  "--out", str(tmp_path / "m.pth"), "--curve", str(tmp_path / "c.png"),
                                                  flag, bad_models[name]])
        assert rc == 2, (flag, stderr)
        (line,) = error_lines(stderr)
        assert bad_models[name] in line
        assert "Traceback" not in stderr and "epoch" not in stdout


def test_every_torch_load_in_the_product_is_weights_only():
    calls = 0
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                calls += 1
                flags = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in flags, f"{path}:{node.lineno}"
                assert isinstance(flags["weights_only"], ast.Constant) and flags["weights_only"].value is True, \
                    f"{path}:{node.lineno}"
    assert calls >= 2


# ---------------------------------------------------------------- output paths, checked before training

def assert_refused_before_training(rc, stdout, stderr, elapsed, naming):
    assert rc == 2, stderr
    (line,) = error_lines(stderr)
    assert naming in line
    assert "Traceback" not in stderr
    assert "epoch" not in stdout and "extract" not in stdout
    assert elapsed < 20


def test_output_under_a_regular_file_is_refused_before_training(tiny_set, tmp_path):
    labels, images = tiny_set
    (tmp_path / "afile").write_text("a file, not a folder")
    out = str(tmp_path / "afile" / "model.pth")
    started = time.time()
    rc, stdout, stderr = call(train, QUICK + ["--labels", labels, "--images", images, "--epochs", "1", "--out", out,
                                             "--curve", str(tmp_path / "curve.png")])
    assert_refused_before_training(rc, stdout, stderr, time.time() - started, out)


def test_curve_under_a_regular_file_is_refused_before_training(tiny_set, tmp_path):
    labels, images = tiny_set
    (tmp_path / "afile").write_text("x")
    curve = str(tmp_path / "afile" / "sub" / "curve.png")
    started = time.time()
    rc, stdout, stderr = call(train, QUICK + ["--labels", labels, "--images", images, "--epochs", "1",
                                             "--out", str(tmp_path / "m.pth"), "--curve", curve])
    assert_refused_before_training(rc, stdout, stderr, time.time() - started, curve)
    assert not (tmp_path / "m.pth").exists()


@pytest.mark.parametrize("existing_dir", ["m.pth", "m_last.pth", "metrics.json", "curve.png"])
def test_output_that_is_an_existing_folder_is_refused(tiny_set, tmp_path, existing_dir):
    labels, images = tiny_set
    (tmp_path / existing_dir).mkdir()
    started = time.time()
    rc, stdout, stderr = call(train, QUICK + ["--labels", labels, "--images", images, "--epochs", "1",
                                             "--out", str(tmp_path / "m.pth"), "--curve", str(tmp_path / "curve.png")])
    assert_refused_before_training(rc, stdout, stderr, time.time() - started, str(tmp_path / existing_dir))
    assert "is a folder" in stderr


def test_output_folder_not_writable_is_refused(tiny_set, tmp_path, monkeypatch):
    # Tests run as root, where chmod cannot take the write permission away: fake the answer of access().
    labels, images = tiny_set
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(out_dir) else real_access(p, mode))
    started = time.time()
    rc, stdout, stderr = call(train, QUICK + ["--labels", labels, "--images", images, "--epochs", "1",
                                             "--out", str(out_dir / "m.pth"), "--curve", str(tmp_path / "c.png")])
    assert_refused_before_training(rc, stdout, stderr, time.time() - started, str(out_dir / "m.pth"))
    assert "not writable" in stderr


def test_cache_dir_under_a_regular_file_is_a_clear_error(tiny_set, tmp_path):
    labels, images = tiny_set
    (tmp_path / "afile").write_text("x")
    cache = str(tmp_path / "afile" / "cache")
    started = time.time()
    rc, stdout, stderr = call(train, QUICK + ["--labels", labels, "--images", images, "--epochs", "1",
                                             "--out", str(tmp_path / "m.pth"), "--curve", str(tmp_path / "c.png"),
                                             "--cache-dir", cache])
    assert_refused_before_training(rc, stdout, stderr, time.time() - started, cache)


# ---------------------------------------------------------------- labels-file errors through train.py

def train_on(labels, images, out_dir, *extra):
    return call(train, QUICK + ["--labels", labels, "--images", images, "--epochs", "1", "--no-cache",
                               "--out", os.path.join(out_dir, "m.pth"), "--curve", os.path.join(out_dir, "c.png"),
                               *extra])


@pytest.mark.parametrize("content, expected", [
    (None, "labels file not found"),
    (b"", "no labels"),
    (b"# nothing but a comment\n\n", "no labels"),
    ("".join(f"caf\u00e9_{i}.jpg 1 0 1 0\n" for i in range(3)).encode("latin-1"), "no labels"),
])
def test_unusable_labels_file_is_one_error(tiny_set, tmp_path, content, expected):
    _, images = tiny_set
    labels = tmp_path / "bad_labels.txt"
    if content is not None:
        labels.write_bytes(content)
    rc, stdout, stderr = train_on(str(labels), images, str(tmp_path))
    assert rc == 2
    (line,) = error_lines(stderr)
    assert str(labels) in line and expected in line
    assert "Traceback" not in stderr
    assert "epoch" not in stdout
    if content and b"\xe9" in content:
        assert len(warning_lines(stderr)) == 3 and all("UTF-8" in w for w in warning_lines(stderr))


def test_missing_images_folder_is_one_error(tiny_set, tmp_path):
    labels, _ = tiny_set
    rc, stdout, stderr = train_on(labels, str(tmp_path / "nope"), str(tmp_path))
    assert rc == 2
    (line,) = error_lines(stderr)
    assert str(tmp_path / "nope") in line


def rewrite(labels, path, columns=None, edit=None):
    """Copy a header-less labels file as bytes: columns {index: value} replaced on every row; edit(lines) after."""
    with open(labels) as f:
        rows = [line.split() for line in f if line.strip()]
    for row in rows:
        for k, value in (columns or {}).items():
            row[1 + k] = value
    lines = [(" ".join(row) + "\n").encode() for row in rows]
    if edit:
        edit(lines)
    with open(path, "wb") as f:
        f.write(b"".join(lines))
    return str(path)


def test_labels_warnings_are_reported_counted_and_training_finishes(tiny_set, tmp_path):
    """One run, four warnings: a line that is not UTF-8, a bad cell, an attribute whose known cells are all
    NA (Attr3) and one without positives (Attr4); their pos_weight is 1.0, not inf or NaN."""
    labels, images = tiny_set

    def edit(lines):
        lines[4] = lines[4].split()[0] + b" 1mobilenet 0 NA 0\n"
        lines.insert(2, "caf\u00e9.jpg 1 0 NA 0\n".encode("latin-1"))

    changed = rewrite(labels, tmp_path / "labels.txt", {2: "NA", 3: "0"}, edit)
    rc, stdout, stderr = train_on(changed, images, str(tmp_path))
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    warnings = warning_lines(stderr)
    assert len(warnings) == 4, warnings
    assert f"{changed}:3:" in warnings[0] and "UTF-8" in warnings[0]
    assert f"{changed}:6:" in warnings[1] and "'1mobilenet'" in warnings[1]
    assert "Attr3" in warnings[2] and "no known positives" in warnings[2] and changed in warnings[2]
    assert "Attr4" in warnings[3] and "no known positives" in warnings[3]
    (weights,) = [line for line in stdout.splitlines() if line.startswith("pos_weight")]
    assert "Attr3=1.000" in weights and "Attr4=1.000" in weights
    assert "nan" not in weights and "inf" not in weights
    assert "data: 24 images used" in stdout
    assert summary(stdout) == (4, {"not UTF-8": 1, "bad value": 1, "attribute": 2})
    assert "train_loss nan" not in stdout
    assert os.path.isfile(tmp_path / "m.pth")


def test_strict_turns_an_attribute_without_positives_into_an_error(tiny_set, tmp_path):
    labels, images = tiny_set
    changed = rewrite(labels, tmp_path / "labels.txt", {3: "0"})
    rc, stdout, stderr = train_on(changed, images, str(tmp_path), "--strict")
    assert rc == 2
    (line,) = error_lines(stderr)
    assert "Attr4" in line and "no known positives" in line and "--strict" in line
    assert "epoch" not in stdout
    assert not (tmp_path / "m.pth").exists()


@pytest.mark.parametrize("line", [b"img_0004.jpg 1mobilenet 0 1 NA\n", b"img_0004.jpg 1 0 1\n",
                                  b"img_0001.jpg 1 0 1 0\n", b"caf\xe9.jpg 1 0 1 0\n", b"ghost.jpg 1 0 1 0\n"])
def test_strict_turns_each_labels_warning_into_an_error(tiny_set, tmp_path, line):
    labels, images = tiny_set

    def edit(lines):
        lines[4] = line

    bad = rewrite(labels, tmp_path / "labels.txt", edit=edit)
    rc, stdout, stderr = train_on(bad, images, str(tmp_path), "--strict")
    assert rc == 2
    (error,) = error_lines(stderr)
    assert f"{bad}:5:" in error and "--strict" in error
    assert "epoch" not in stdout


@pytest.mark.parametrize("augment, damage", [("flip", "empty"), ("strong", "empty"), ("strong", "truncate")])
def test_strict_turns_an_unreadable_image_into_an_error(tmp_path, augment, damage):
    images, labels = str(tmp_path / "images"), str(tmp_path / "labels.txt")
    make_sample.generate(10, images, labels, seed=3, na_rate=0.0)
    with open(os.path.join(images, "img_0004.jpg"), "rb+") as f:
        f.truncate(0 if damage == "empty" else len(f.read()) // 2)
    rc, stdout, stderr = train_on(labels, images, str(tmp_path), "--strict", "--augment", augment)
    assert rc == 2, stdout
    (error,) = error_lines(stderr)
    assert os.path.join(images, "img_0004.jpg") in error and "--strict" in error
    assert not (tmp_path / "m.pth").exists()


@pytest.mark.parametrize("flag", ["--out", "--curve"])
def test_output_path_naming_a_folder_that_does_not_exist(tiny_set, tmp_path, flag):
    """`--out runs/` (trailing separator): refuse it before training, or write into the folder; never train
    and then fail to save."""
    labels, images = tiny_set
    outputs = {"--out": str(tmp_path / "m.pth"), "--curve": str(tmp_path / "c.png")}
    outputs[flag] = str(tmp_path / "runs") + os.sep
    rc, stdout, stderr = call(train, QUICK + ["--labels", labels, "--images", images, "--epochs", "1", "--no-cache",
                                              "--out", outputs["--out"], "--curve", outputs["--curve"]])
    assert "Traceback" not in stderr
    if rc == 2:
        (error,) = error_lines(stderr)
        assert outputs[flag] in error
        assert "epoch" not in stdout
    else:
        assert rc == 0, stderr
        assert os.listdir(tmp_path / "runs"), "nothing written into the folder"


@pytest.mark.parametrize("script", ["inference", "evaluate"])
def test_batch_size_zero_is_one_line_not_a_traceback(mixed, model_path, script):
    module = {"inference": inference, "evaluate": evaluate}[script]
    images = [os.path.join(mixed["images"], "img_0001.jpg"), os.path.join(mixed["images"], "img_0002.jpg")]
    argv = images if script == "inference" else ["--labels", mixed["labels"], "--images", mixed["images"]]
    rc, stdout, stderr = call(module, [*argv, "--model", model_path, "--batch-size", "0"])
    assert rc == 2 and error_lines(stderr) == ["error: --batch-size must be at least 1"]
    assert "Traceback" not in stderr

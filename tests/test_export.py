"""export.py: every backbone exports; the file holds the checkpoint's facts; a mismatch leaves no file."""
import contextlib
import hashlib
import io
import json
import os

import numpy as np
import onnx
import pytest
import torch

import export
from conftest import write_checkpoint
from model import BACKBONES, load_checkpoint, model_from_checkpoint
from onnx_model import ONNX_FORMAT, OnnxModel


def call(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = export.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_backbone_exports_and_matches_pytorch(tmp_path, backbone, one_thread):
    pth = write_checkpoint(tmp_path / "model.pth", backbone, image_size=64)
    rc, stdout, stderr = call([pth, "--images", tmp_path / "none", "--check-images", "3"])  # generated images
    assert rc == 0, stderr
    onnx_path = tmp_path / "model.onnx"  # the default name: the checkpoint's, with .onnx
    assert stdout.startswith(f"wrote {onnx_path} ") and "on 3 images" in stdout
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.pth"]  # no temporary file left

    model = OnnxModel(str(onnx_path), device="cpu")
    x = torch.randn(5, 3, 64, 64)  # another batch size than the export's example (2): the batch axis is free
    with torch.inference_mode():
        logits = model_from_checkpoint(load_checkpoint(pth))(x)
    np.testing.assert_allclose(model(x.numpy()), torch.sigmoid(logits).numpy(), atol=1e-4)
    np.testing.assert_allclose(model.logits(x.numpy()), logits.numpy(), atol=1e-3, rtol=1e-4)


def test_metadata_holds_the_checkpoint_facts(tmp_path):
    pth = write_checkpoint(tmp_path / "m.pth", image_size=64)
    out = tmp_path / "deploy" / "x.onnx"
    assert call([pth, "--out", out, "--opset", "18", "--check-images", "2"])[0] == 0
    graph = onnx.load(str(out))
    meta = {p.key: json.loads(p.value) for p in graph.metadata_props}
    assert meta == {"format": ONNX_FORMAT, "backbone": "mobilenet_v3_large",
                    "attributes": ["Attr1", "Attr2", "Attr3", "Attr4"], "thresholds": [0.5, 0.45, 0.55, 0.5],
                    "image_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "epoch": 1, "tta": False,
                    "source": "m.pth", "source_sha256": hashlib.sha256(open(pth, "rb").read()).hexdigest()}
    assert graph.opset_import[0].version == 18
    assert [i.name for i in graph.graph.input] == ["images"]
    assert [o.name for o in graph.graph.output] == ["probabilities", "logits"]
    onnx.checker.check_model(graph)


def test_a_difference_above_the_tolerance_is_refused_and_leaves_no_file(tmp_path, monkeypatch):
    pth = write_checkpoint(tmp_path / "m.pth", image_size=32)
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # any difference, even 0, is now too much
    rc, stdout, stderr = call([pth, "--check-images", "2"])
    assert rc == 2 and stdout == ""
    (line,) = stderr.splitlines()
    assert line.startswith(f"error: {tmp_path / 'm.onnx'}: ONNX Runtime and PyTorch differ by ")
    assert "not written" in line
    assert os.listdir(tmp_path) == ["m.pth"]


def test_sample_images_come_from_the_folder_first(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 10), (40 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_text("not a picture")  # skipped, not an error
    facts = {"image_size": 8, "mean": (0, 0, 0), "std": (1, 1, 1)}
    names, x = export.sample_images(str(folder), 5, facts)
    assert [os.path.basename(n) for n in names] == ["0.png", "1.png", "2.png"]
    assert x.shape == (3, 3, 8, 8) and abs(x[2, 0, 0, 0] - 80 / 255) < 1e-7
    names, x = export.sample_images(str(tmp_path / "missing"), 2, facts)  # generated instead
    assert len(names) == 2 and x.shape == (2, 3, 8, 8)


def test_bad_checkpoint_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    rc, _, stderr = call([bad])
    assert rc == 2 and stderr.startswith(f"error: {bad}: ") and len(stderr.splitlines()) == 1
    assert not (tmp_path / "bad.onnx").exists()


def test_int8_copy_is_quantized_and_keeps_the_metadata(tmp_path, monkeypatch):
    pth = write_checkpoint(tmp_path / "m.pth", "efficientnet_lite0", image_size=32)
    monkeypatch.setattr(export, "CALIBRATION_IMAGES", 4)
    rc, stdout, stderr = call([pth, "--int8", "--check-images", "2", "--images", tmp_path / "none"])
    assert rc == 0, stderr
    assert f"wrote {tmp_path / 'm.int8.onnx'} " in stdout and "calibrated on 4 images" in stdout
    graph = onnx.load(str(tmp_path / "m.int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in graph.graph.node)
    assert os.path.getsize(tmp_path / "m.int8.onnx") < 0.5 * os.path.getsize(tmp_path / "m.onnx")
    exact, int8 = OnnxModel(str(tmp_path / "m.onnx"), "cpu"), OnnxModel(str(tmp_path / "m.int8.onnx"), "cpu")
    assert int8.facts == exact.facts
    _, x = export.sample_images(str(tmp_path / "none"), 4, exact.facts)
    assert 0 < np.abs(int8(x) - exact(x)).max() < 0.2
    assert sorted(os.listdir(tmp_path)) == ["m.int8.onnx", "m.onnx", "m.pth"]

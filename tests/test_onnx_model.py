"""onnx_model.py and the .onnx paths of inference.py and evaluate.py: the same output as model.pth, without
PyTorch; files not written by export.py are one error line."""
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import evaluate
import export
import inference
from conftest import ROOT, write_checkpoint


def call(module, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = module.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A checkpoint, its export, and a set with broken images: {"pth", "onnx", "labels", "images", "folder"}."""
    import make_sample

    root = tmp_path_factory.mktemp("onnx")
    labels, images = str(root / "labels.txt"), str(root / "images")
    make_sample.generate(12, images, labels, seed=3, na_rate=0.09)
    # ImageNet features (offline for this backbone): a random backbone gives nearly one output for every image.
    pth = write_checkpoint(root / "model.pth", "efficientnet_lite0", image_size=64, weights="imagenet")
    assert call(export, [pth, "--images", images, "--check-images", "4"])[0] == 0
    open(os.path.join(images, "zero.jpg"), "wb").close()
    with open(os.path.join(images, "text.jpg"), "w") as f:
        f.write("not a picture\n")
    return {"pth": pth, "onnx": str(root / "model.onnx"), "labels": labels, "images": images, "root": root}


def both(models, *argv):
    """inference.main with the .pth and with the .onnx: the two (rc, stdout, stderr)."""
    return [call(inference, [*argv, "--model", models[kind], "--device", "cpu", "--num-workers", "0"])
            for kind in ("pth", "onnx")]


def test_one_image_prints_the_same_line(models):
    image = os.path.join(models["images"], "img_0001.jpg")
    (rc_p, out_p, err_p), (rc_o, out_o, err_o) = both(models, image)
    assert rc_p == rc_o == 0 and err_p == err_o == ""
    assert out_o == out_p and out_o.startswith("Attributes present: [")


@pytest.mark.parametrize("extra", [[], ["--threshold", "0.5"], ["--batch-size", "5"], ["--batch-size", "1"]])
def test_a_folder_with_broken_images_prints_the_same(models, extra):
    (rc_p, out_p, err_p), (rc_o, out_o, err_o) = both(models, models["images"], *extra)
    assert rc_p == rc_o == 1  # the broken images
    assert out_o == out_p and len(out_o.splitlines()) == 12
    assert err_o == err_p and len(err_o.splitlines()) == 2 and all(e.startswith("error: ") for e in err_o.splitlines())


def test_json_probabilities_agree_within_float_rounding(models):
    image = lambda n: os.path.join(models["images"], n)  # noqa: E731
    paths = [image("img_0002.jpg"), image("zero.jpg"), image("img_0003.jpg"), image("missing.jpg")]
    (rc_p, out_p, _), (rc_o, out_o, _) = both(models, *paths, "--json", "--batch-size", "2")
    assert rc_p == rc_o == 1
    records_p, records_o = [[json.loads(line) for line in out.splitlines()] for out in (out_p, out_o)]
    assert [r["image"] for r in records_o] == paths
    for p, o in zip(records_p, records_o):
        assert set(p) == set(o) and p.get("present") == o.get("present") and p.get("error") == o.get("error")
        for a in p.get("probabilities", {}):
            # Two float32 programs (ORT fuses its convolutions, PyTorch folds BatchNorm): about 1e-6 apart.
            assert abs(p["probabilities"][a] - o["probabilities"][a]) <= 1e-5
    spread = [p for r in records_o if "probabilities" in r for p in r["probabilities"].values()]
    assert max(spread) - min(spread) > 0.05  # the outputs vary, so equal outputs mean something


def test_inference_with_onnx_imports_neither_torch_nor_torchvision(models):
    code = ("import sys, inference; rc = inference.main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules, 'torchvision' in sys.modules)")
    image = os.path.join(models["images"], "img_0004.jpg")
    done = subprocess.run([sys.executable, "-c", code, image, "--model", models["onnx"]], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    line, verdict = done.stdout.splitlines()
    assert line.startswith("Attributes present: [")
    assert verdict == "0 False False"


BLOCK_TORCH = "import sys; sys.modules['torch'] = sys.modules['torchvision'] = None; "  # as if not installed


def test_inference_with_onnx_runs_where_torch_cannot_be_imported(models):
    code = BLOCK_TORCH + "import inference; sys.exit(inference.main(sys.argv[1:]))"
    image = os.path.join(models["images"], "img_0004.jpg")
    done = subprocess.run([sys.executable, "-c", code, image, "--model", models["onnx"]], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("Attributes present: ["), done.stderr
    done = subprocess.run([sys.executable, "-c", code, image, "--model", models["pth"]], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"error: {models['pth']}: a PyTorch checkpoint needs torch")


def test_evaluate_gives_the_same_metrics(models):
    argv = ["--labels", models["labels"], "--images", models["images"], "--json", "--num-workers", "0",
            "--device", "cpu"]
    (rc_p, out_p, _), (rc_o, out_o, _) = [call(evaluate, [*argv, "--model", models[k]]) for k in ("pth", "onnx")]
    assert rc_p == rc_o == 0
    p, o = json.loads(out_p), json.loads(out_o)
    assert [a["attribute"] for a in o["attributes"]] == ["Attr1", "Attr2", "Attr3", "Attr4"]
    for ap, ao in zip(p["attributes"], o["attributes"]):
        assert ap["positives"] == ao["positives"] and ap["f1"] == ao["f1"]
        assert abs(ap["ap"] - ao["ap"]) <= 1e-6
    assert abs(p["map"] - o["map"]) <= 1e-6


# ---------------------------------------------------------------- files not written by export.py

def bad_onnx_files(models, folder):
    """name -> path of .onnx files inference must refuse with one error line."""
    good = open(models["onnx"], "rb").read()
    paths = {}

    def write(name, data):
        paths[name] = str(folder / name)
        with open(paths[name], "wb") as f:
            f.write(data)

    write("truncated.onnx", good[:len(good) // 2])
    write("text.onnx", b"not an onnx model\n")
    write("empty.onnx", b"")
    graph = onnx.load(models["onnx"])
    del graph.metadata_props[:]
    write("no_metadata.onnx", graph.SerializeToString())
    graph = onnx.load(models["onnx"])
    for prop in graph.metadata_props:
        if prop.key == "image_size":
            prop.value = "32"  # the graph takes 64 x 64
    write("wrong_size.onnx", graph.SerializeToString())
    graph = onnx.load(models["onnx"])
    graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # a fixed batch of 1
    write("fixed_batch.onnx", graph.SerializeToString())
    # A node of an operator from a custom domain: ONNX Runtime would need a library for it, which is never loaded.
    node = helper.make_node("Steal", ["images"], ["probabilities"], domain="com.example.custom")
    custom = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 4])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example.custom", 1)])
    custom.metadata_props.extend(graph.metadata_props)
    write("custom_op.onnx", custom.SerializeToString())
    paths["missing.onnx"] = str(folder / "missing.onnx")
    return paths


@pytest.mark.parametrize("name", ["truncated.onnx", "text.onnx", "empty.onnx", "no_metadata.onnx",
                                  "wrong_size.onnx", "fixed_batch.onnx", "custom_op.onnx", "missing.onnx"])
def test_bad_onnx_file_is_one_error_line(models, tmp_path, name):
    path = bad_onnx_files(models, tmp_path)[name]
    image = os.path.join(models["images"], "img_0001.jpg")
    for module, argv in ((inference, [image]), (evaluate, ["--labels", models["labels"], "--images", models["images"]])):
        rc, stdout, stderr = call(module, [*argv, "--model", path, "--num-workers", "0"])
        assert rc == 2 and stdout == ""
        (line,) = stderr.splitlines()
        assert line.startswith(f"error: {path}: "), line


def test_metadata_without_the_format_tag_names_export(models, tmp_path):
    path = bad_onnx_files(models, tmp_path)["no_metadata.onnx"]
    rc, _, stderr = call(inference, [os.path.join(models["images"], "img_0001.jpg"), "--model", path])
    assert "not written by export.py" in stderr and "python export.py model.pth" in stderr


def test_device_choices_map_to_execution_providers(monkeypatch):
    import onnxruntime

    from onnx_model import providers
    from utils import UserError

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert providers("auto") == providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="no CUDA provider"):
        providers("cuda")
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers("auto") == providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers("cpu") == ["CPUExecutionProvider"]


def test_the_onnx_forward_takes_channels_last_batches(models):
    from onnx_model import OnnxModel

    model = OnnxModel(models["onnx"], device="cpu")
    x = torch.randn(2, 3, 64, 64)
    strided = x.contiguous(memory_format=torch.channels_last).numpy()  # not C-contiguous
    np.testing.assert_array_equal(model(strided), model(x.numpy()))


def test_no_custom_operator_library_is_ever_registered():
    import glob

    for path in glob.glob(os.path.join(ROOT, "*.py")):
        with open(path) as f:
            assert "register_custom_ops_library" not in f.read(), path


def test_flip_tta_gives_the_same_probabilities_on_both_runtimes_and_differs_from_none(models, tmp_path):
    # A checkpoint validated with --tta: both paths average the image's and its mirror's probabilities.
    ckpt = torch.load(models["pth"], weights_only=True)
    ckpt["tta"] = True
    pth = str(tmp_path / "tta.pth")
    torch.save(ckpt, pth)
    assert call(export, [pth, "--images", models["images"], "--check-images", "2"])[0] == 0
    paths = [os.path.join(models["images"], f"img_000{i}.jpg") for i in (1, 2, 3)]
    runs = {}
    for name, extra in (("pth", []), ("onnx", []), ("plain", ["--no-tta"])):
        model = str(tmp_path / "tta.onnx") if name == "onnx" else pth
        rc, out, _ = call(inference, [*paths, "--json", "--model", model, "--num-workers", "0", *extra])
        assert rc == 0
        runs[name] = np.array([list(json.loads(line)["probabilities"].values()) for line in out.splitlines()])
    np.testing.assert_allclose(runs["pth"], runs["onnx"], atol=1e-5)
    assert np.abs(runs["pth"] - runs["plain"]).max() > 1e-3  # the mirror changed something: TTA was applied


def test_a_calibrated_model_with_an_attribute_not_learnt_says_so_and_both_files_agree(models, tmp_path):
    """The calibration travels with the model: inference.py gives the same calibrated probabilities from the .pth
    and from its .onnx (flip TTA on, in log space on both), the attribute not learnt is its prevalence for every
    image, the JSON says which were learnt, and one warning line names it."""
    import calibration

    facts = dict(calibration={"slope": [0.5, 1.5, 0.0, 1.0], "intercept": [-0.3, 0.2, -1.3862944, 0.0]},
                 learnt=[True, True, False, True], p_values=[1e-9, 1e-6, 0.6, 1e-3], tta=True)
    pth = write_checkpoint(tmp_path / "cal.pth", "efficientnet_lite0", image_size=64, weights="imagenet", **facts)
    assert call(export, [pth, "--images", models["images"], "--check-images", "4"])[0] == 0
    paths = [os.path.join(models["images"], f"img_000{i}.jpg") for i in (1, 2, 3)]
    outputs = [call(inference, [*paths, "--json", "--model", m, "--device", "cpu", "--num-workers", "0"])
               for m in (pth, str(tmp_path / "cal.onnx"))]
    prevalence = float(calibration.sigmoid(-1.3862944))  # 0.2
    for (rc, out, err), model in zip(outputs, (pth, str(tmp_path / "cal.onnx"))):
        assert rc == 0
        assert err.splitlines() == [f"warning: {model}: Attr3 was not learnt (no better than chance on images the "
                                    "model never saw): its probability is the prevalence of the training labels and "
                                    "the answer the majority's, whatever the image"]
        records = [json.loads(line) for line in out.splitlines()]
        assert all(r["learnt"] == {"Attr1": True, "Attr2": True, "Attr3": False, "Attr4": True} for r in records)
        assert all(r["probabilities"]["Attr3"] == pytest.approx(prevalence, abs=1e-6) for r in records)
    (_, out_p, _), (_, out_o, _) = outputs
    for p, o in zip(out_p.splitlines(), out_o.splitlines()):
        p, o = json.loads(p), json.loads(o)
        assert p["present"] == o["present"]
        assert all(abs(p["probabilities"][a] - o["probabilities"][a]) <= 1e-5 for a in p["probabilities"])
    # By hand for the .pth: sigmoid(slope * the TTA logit + intercept) of the head's own output.
    from dataset import eval_transform
    from dataset import load_image
    from model import flip_tta, load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(pth)
    net = model_from_checkpoint(ckpt).eval()
    x = eval_transform(64, ckpt["mean"], ckpt["std"])(load_image(paths[0])).unsqueeze(0)
    with torch.inference_mode():
        z = flip_tta(net, features=False)(x)[0].numpy()
    expected = calibration.sigmoid(np.array(facts["calibration"]["slope"]) * z + facts["calibration"]["intercept"])
    got = json.loads(out_p.splitlines()[0])["probabilities"]
    assert [got[a] for a in ("Attr1", "Attr2", "Attr3", "Attr4")] == pytest.approx(expected.tolist(), abs=1e-5)

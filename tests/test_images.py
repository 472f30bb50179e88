"""images.py: the torch-free preprocessing equals dataset.eval_transform on every kind of image."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import images
from conftest import ROOT
from dataset import IMAGENET_MEAN, IMAGENET_STD, eval_transform


def exif_rotated(picture, path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    picture.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif.tobytes())


def odd_images(folder):
    """name -> path of images that load_image must convert: palette, 16-bit, EXIF-rotated, greyscale, ..."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))  # odd sizes, neither square
    paths = {}

    def save(name, image, **kw):
        paths[name] = str(folder / name)
        image.save(paths[name], **kw)

    save("rgb.png", picture)
    save("palette.png", picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    save("palette_t.png", picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), transparency=0)
    save("gray.png", picture.convert("L"))
    save("gray16.png", Image.fromarray(rng.integers(0, 65536, (41, 29), dtype=np.uint16)))
    rgba = picture.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8)))
    save("rgba.png", rgba)
    save("cmyk.jpg", picture.convert("CMYK"), quality=90)
    save("tiny.png", Image.new("RGB", (1, 1), (120, 30, 200)))
    save("big.jpg", picture.resize((400, 300)), quality=90)
    save("exact.png", picture.resize((64, 64)))  # already the model's size: no resize on either path
    paths["exif.jpg"] = str(folder / "exif.jpg")
    exif_rotated(picture, paths["exif.jpg"])
    return paths


@pytest.mark.parametrize("size", [64, 224])
def test_to_array_equals_eval_transform_on_odd_images(tmp_path, size):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    for name, path in odd_images(tmp_path).items():
        for m, s in ((IMAGENET_MEAN, IMAGENET_STD), (mean, std)):
            picture = images.load_image(path)
            expected = eval_transform(size, m, s)(picture).numpy()
            got = images.to_array(picture, size, m, s)
            assert got.shape == (3, size, size) and got.dtype == np.float32, name
            assert np.abs(got - expected).max() <= 1e-6, name


def test_to_array_by_hand():
    # One grey pixel 51 -> 0.2; normalized (0.2 - 0.5) / 0.25 = -1.2 in every channel.
    got = images.to_array(Image.new("RGB", (1, 1), (51, 51, 51)), 1, (0.5,) * 3, (0.25,) * 3)
    assert got.shape == (3, 1, 1)
    np.testing.assert_allclose(got.ravel(), [-1.2] * 3, rtol=1e-6)


def test_images_and_its_imports_do_not_import_torch():
    code = "import sys, images, onnx_model, utils; print('torch' in sys.modules, 'torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_dataset_reexports_the_image_loading():
    import dataset

    assert dataset.load_image is images.load_image and dataset.list_images is images.list_images

"""Image files -> upright RGB pictures, and the eval preprocessing without PyTorch.

Torch-free on purpose: inference.py's ONNX Runtime path imports this and never PyTorch. dataset.py re-exports
load_image and list_images; its eval_transform and to_array here are the same function of the pixels (tested).
"""
import os
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from utils import UserError

# A declared size above this is refused before decoding: a small file can claim gigapixels
# (a decompression bomb). PIL's own default limit, made a hard error instead of a warning.
MAX_IMAGE_PIXELS = 89_478_485
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Truncated JPEGs must fail loudly, never decode into half-grey pictures.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def load_image(path, decode=True, *, name=None):
    """Open any image file as an upright RGB PIL image; raises UserError naming the file.

    path: a file name, or a binary file object (an upload, serve.py) that the messages call `name`.
    decode=False only reads the header (cheap): it catches empty, non-image and oversized files,
    not a truncated one."""
    name = path if name is None else name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise UserError(f"{name}: image declares {im.width}x{im.height} pixels, more than "
                                    f"{MAX_IMAGE_PIXELS}; refused as a possible decompression bomb (resize it)")
                if not decode:
                    return None
                im = ImageOps.exif_transpose(im)
                im.load()
                return _to_rgb(im)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{name}: image not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{name}: image too large; refused as a possible decompression bomb (resize it)") from None
    except Exception as e:  # PIL raises many types for broken files; every one is the file's fault
        # PIL names a file object by its repr (<_io.BytesIO object at 0x...>): name it as the messages do
        detail = str(e).replace(repr(path), repr(name))
        reason = "empty file" if _is_empty(path) else f"{type(e).__name__}: {detail}"
        raise UserError(f"{name}: cannot read image ({reason}); replace or remove the file") from None


def _is_empty(source):
    if isinstance(source, (str, bytes, os.PathLike)):
        return os.path.exists(source) and os.path.getsize(source) == 0
    return source.seek(0, os.SEEK_END) == 0


def _to_rgb(im):
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit-depth greyscale: PIL's own convert clips at 255 and turns it white; scale instead.
        a = np.asarray(im, dtype=np.float32)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels become white, the usual background of product photos.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def list_images(folder):
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def to_array(image, image_size, mean, std):
    """dataset.eval_transform without PyTorch: a (3, S, S) float32 array. torchvision resizes a PIL image with PIL's
    own bilinear resize (antialiased), then divides by 255 and normalizes, all in float32, as done here."""
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    a = np.asarray(image, dtype=np.float32) / np.float32(255)
    a = (a - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))

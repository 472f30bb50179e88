"""Generate a small synthetic clothing data set for the attribute classifier.

Run:  python make_sample.py
      (regenerates labels.txt and images/ at the top of the repo; see --help
      for --n, --out-dir, --labels, --seed)

Tests can call generate(n, out_dir, labels_path, seed, na_rate) to build a
tiny set in a temporary folder.

The output is deterministic: the same seed and n give byte-identical JPEGs
and labels.txt on the same Pillow version (fixed quality, no EXIF, no
timestamps, all randomness from random.Random(seed) and
numpy.random.default_rng(seed)).

Each image is one garment (top, trousers, dress, skirt or jacket) drawn with
polygons on a plain light background. labels.txt has no header, one line per
image: `img_0001.jpg A1 A2 A3 A4`, each cell 1, 0 or NA (unknown).

Attributes, each drawn independently of the others and of the garment kind:
  Attr1  long (~65%):  tops, jackets and dresses have long sleeves that reach
         the wrist (0 = short sleeves); trousers and skirts reach the ankle
         (0 = shorts / mini skirt).
  Attr2  dark (~50%):  the garment's main colour is dark (luma 20-65 out of
         255); 0 = a light-to-medium colour (luma 150-215).
  Attr3  patterned (~40%):  the garment has horizontal stripes or a grid of
         dots in a contrasting shade; 0 = plain, one colour.
  Attr4  logo (~8%, rare):  a single bright yellow (red on light yellow/lime garments)
         circle or five-pointed star with a black outline, on the chest of
         tops/jackets/dresses or the hip of trousers/skirts; 0 = no badge.

The hidden (NA) cells are picked per attribute as the same fraction
(NA_RATE) of its positives and of its negatives, so whether a label is
hidden says nothing about its value, and the rare Attr4 keeps its ~8%
positive rate among the known cells. The picture always shows the truth.
"""

import argparse
import colorsys
import io
import math
import os
import random
import re
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw

SEED = 1234
N_IMAGES = 300
OUT_LABELS = "labels.txt"
OUT_DIR = "images"
NA_RATE = 0.09

ATTR_NAMES = ("long", "dark", "patterned", "logo")
# Exact positive fractions rather than coin flips, so small test sets still
# contain both classes of every attribute.
ATTR_RATES = (0.65, 0.50, 0.40, 0.08)
KINDS = ("top", "trousers", "dress", "skirt", "jacket")

SIZE_RANGE = (150, 200)
JPEG_QUALITY = 90
BG_LEVEL = (228, 248)
# Luma bands with a wide gap between them, so "dark" is never a judgement call.
DARK_LUMA = (20, 65)
LIGHT_LUMA = (150, 215)
OUTLINE = (35, 35, 35)
LOGO_YELLOW = (255, 220, 0)
LOGO_RED = (235, 25, 45)

IMG_NAME_RE = re.compile(r"^img_\d{4,}\.jpg$")


# ---------------------------------------------------------------- shapes
# Garments live in a unit frame (u right, v down, roughly 0..1) and are
# mapped to pixels afterwards, so jitter is one affine map for every part.

def _sleeves(long, shoulder_v, torso_l, torso_r):
    """Left and right sleeve polygons for a torso with the given edges."""
    if long:
        # Hanging diagonally down to the wrist: length is the whole point.
        left = [(torso_l, shoulder_v), (torso_l - 0.22, shoulder_v + 0.58),
                (torso_l - 0.11, shoulder_v + 0.62), (torso_l, shoulder_v + 0.2)]
    else:
        left = [(torso_l, shoulder_v), (torso_l - 0.16, shoulder_v + 0.15),
                (torso_l - 0.07, shoulder_v + 0.24), (torso_l, shoulder_v + 0.16)]
    right = [(torso_l + torso_r - u, v) for u, v in left]
    return [left, right]


def _top(long):
    body = [(0.42, 0.12), (0.5, 0.2), (0.58, 0.12), (0.7, 0.15),
            (0.7, 0.82), (0.3, 0.82), (0.3, 0.15)]
    return [body] + _sleeves(long, 0.15, 0.3, 0.7), 0.62, 0.3


def _jacket(long):
    body = [(0.43, 0.1), (0.5, 0.16), (0.57, 0.1), (0.71, 0.14),
            (0.72, 0.86), (0.28, 0.86), (0.29, 0.14)]
    return [body] + _sleeves(long, 0.14, 0.29, 0.71), 0.625, 0.32


def _dress(long):
    body = [(0.42, 0.1), (0.5, 0.17), (0.58, 0.1), (0.66, 0.12),
            (0.64, 0.42), (0.8, 0.92), (0.2, 0.92), (0.36, 0.42),
            (0.34, 0.12)]
    return [body] + _sleeves(long, 0.12, 0.34, 0.66), 0.56, 0.27


def _trousers(long):
    hem = 0.95 if long else 0.45
    left = [(0.32, 0.08), (0.5, 0.08), (0.5, 0.33), (0.485, hem),
            (0.33 if long else 0.29, hem), (0.3, 0.25)]
    right = [(1.0 - u, v) for u, v in left]
    return [left, right], 0.6, 0.19


def _skirt(long):
    if long:
        body = [(0.36, 0.1), (0.64, 0.1), (0.8, 0.93), (0.2, 0.93)]
    else:
        body = [(0.36, 0.1), (0.64, 0.1), (0.77, 0.47), (0.23, 0.47)]
    return [body], 0.56, 0.24


SHAPES = {"top": _top, "trousers": _trousers, "dress": _dress,
          "skirt": _skirt, "jacket": _jacket}


def _details(kind, long):
    """Seam lines that make the kinds recognisable (unit-frame polylines)."""
    if kind == "jacket":
        return [[(0.5, 0.16), (0.5, 0.86)],            # front opening
                [(0.43, 0.1), (0.46, 0.3), (0.5, 0.16)],  # lapels
                [(0.57, 0.1), (0.54, 0.3), (0.5, 0.16)],
                [(0.33, 0.62), (0.44, 0.62)]]           # pocket flap
    if kind == "trousers":
        return [[(0.32, 0.13), (0.68, 0.13)], [(0.5, 0.13), (0.5, 0.28)]]
    if kind == "skirt":
        return [[(0.36, 0.15), (0.64, 0.15)]]
    if kind == "dress":
        return [[(0.36, 0.42), (0.64, 0.42)]]
    return []


def _star(cx, cy, r):
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


# ---------------------------------------------------------------- colours

def _luma(rgb):
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _garment_colour(rnd, dark):
    lo, hi = DARK_LUMA if dark else LIGHT_LUMA
    # Rejection sampling keeps hues uniform while the luma band stays exact.
    while True:
        h = rnd.random()
        s = rnd.uniform(0.3, 0.85)
        v = rnd.uniform(0.15, 1.0)
        rgb = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))
        if lo <= _luma(rgb) <= hi:
            return rgb, h


def _mix(a, b, t):
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


# ---------------------------------------------------------------- drawing

def _draw_image(rnd, nprng, kind, attrs):
    long, dark, patterned, logo = attrs
    w = rnd.randint(*SIZE_RANGE)
    h = rnd.randint(*SIZE_RANGE)

    level = rnd.uniform(*BG_LEVEL)
    bg = tuple(int(min(255, level + rnd.uniform(-6, 6))) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)

    polys, logo_u, logo_v = SHAPES[kind](long)
    # Centre on the garment's own bounding box at a fixed unit scale, so
    # short garments stay visibly short instead of being blown up.
    us = [u for p in polys for u, _ in p]
    vs = [v for p in polys for _, v in p]
    scale = min(w, h) * rnd.uniform(0.72, 0.9)
    sx = scale * rnd.uniform(0.95, 1.05)
    sy = scale * rnd.uniform(0.95, 1.05)
    cu, cv = (min(us) + max(us)) / 2, (min(vs) + max(vs)) / 2
    ox = w / 2 + rnd.uniform(-0.06, 0.06) * w
    oy = h / 2 + rnd.uniform(-0.06, 0.06) * h

    def to_px(pts):
        return [(ox + (u - cu) * sx, oy + (v - cv) * sy) for u, v in pts]

    base, hue = _garment_colour(rnd, dark)
    # The contrast shade goes the opposite way from the base so the pattern
    # is visible, but it covers well under half the area so the main colour
    # (Attr2) stays the main colour.
    shade = _mix(base, (255, 255, 255), 0.55) if dark else _mix(base, (0, 0, 0), 0.55)

    fill = Image.new("RGB", (w, h), base)
    if patterned:
        fd = ImageDraw.Draw(fill)
        if rnd.random() < 0.5:
            period = rnd.uniform(0.09, 0.13) * sy
            thick = period * rnd.uniform(0.28, 0.36)
            y = oy - 0.6 * sy + rnd.uniform(0, period)
            while y < h:
                fd.rectangle([0, y, w, y + thick], fill=shade)
                y += period
        else:
            step = rnd.uniform(0.085, 0.11) * sx
            r = step * rnd.uniform(0.2, 0.25)
            x0, y0 = rnd.uniform(0, step), rnd.uniform(0, step)
            row = 0
            y = y0
            while y < h + step:
                x = x0 + (step / 2 if row % 2 else 0)
                while x < w + step:
                    fd.ellipse([x - r, y - r, x + r, y + r], fill=shade)
                    x += step
                y += step * 0.87
                row += 1

    mask = Image.new("L", (w, h), 0)
    md = ImageDraw.Draw(mask)
    for p in polys:
        md.polygon(to_px(p), fill=255)
    img.paste(fill, (0, 0), mask)

    d = ImageDraw.Draw(img)
    seam = _mix(base, (0, 0, 0), 0.45) if not dark else _mix(base, (255, 255, 255), 0.3)
    for line in _details(kind, long):
        d.line(to_px(line), fill=seam, width=2)
    for p in polys:
        d.polygon(to_px(p), outline=OUTLINE, width=2)

    if logo:
        # Yellow on a yellow garment would vanish; red is the fallback.
        yellowish = not dark and 0.08 <= hue <= 0.3
        colour = LOGO_RED if yellowish else LOGO_YELLOW
        lx, ly = to_px([(logo_u, logo_v)])[0]
        r = 0.065 * scale
        if rnd.random() < 0.5:
            d.ellipse([lx - r, ly - r, lx + r, ly + r], fill=colour,
                      outline=(0, 0, 0), width=2)
        else:
            d.polygon(_star(lx, ly, r * 1.35), fill=colour, outline=(0, 0, 0),
                      width=2)

    # Mild sensor-like noise; kept small because it is what JPEG pays for.
    arr = np.asarray(img, dtype=np.int16)
    arr = arr + nprng.integers(-4, 5, size=arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- labels

def _exact_flags(rnd, n, rate):
    """n booleans with round(rate * n) True in random order."""
    k = int(round(rate * n))
    if n >= 2:
        k = min(max(k, 1), n - 1)  # both classes present, even in tiny sets
    flags = [True] * k + [False] * (n - k)
    rnd.shuffle(flags)
    return flags


def _na_mask(rnd, values, na_rate):
    """Hide the same fraction of positives and of negatives."""
    hidden = [False] * len(values)
    for cls in (True, False):
        idx = [i for i, v in enumerate(values) if v == cls]
        k = int(round(na_rate * len(idx)))
        if k >= len(idx):
            k = max(0, len(idx) - 1)  # never hide a class completely
        for i in rnd.sample(idx, k):
            hidden[i] = True
    return hidden


def generate(n, out_dir, labels_path, seed, na_rate):
    """Write n images to out_dir and their labels to labels_path.

    Returns a list of (filename, truth, labels): truth is a tuple of four
    0/1 ints as drawn, labels the same with None where written as NA.
    Stale img_*.jpg files in out_dir are removed first so the folder always
    matches the labels file.
    """
    rnd = random.Random(seed)
    nprng = np.random.default_rng(seed)

    columns = [_exact_flags(rnd, n, rate) for rate in ATTR_RATES]
    hidden = [_na_mask(rnd, col, na_rate) for col in columns]
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]
    rnd.shuffle(kinds)

    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if IMG_NAME_RE.match(name):
            os.remove(os.path.join(out_dir, name))

    rows = []
    lines = []
    for i in range(n):
        name = "img_%04d.jpg" % (i + 1)
        truth = tuple(int(col[i]) for col in columns)
        labels = tuple(None if hidden[a][i] else truth[a] for a in range(4))
        img = _draw_image(rnd, nprng, kinds[i], truth)
        img.save(os.path.join(out_dir, name), "JPEG", quality=JPEG_QUALITY)
        rows.append((name, truth, labels))
        cells = ["NA" if v is None else str(v) for v in labels]
        lines.append(" ".join([name] + cells) + "\n")

    labels_dir = os.path.dirname(os.path.abspath(labels_path))
    os.makedirs(labels_dir, exist_ok=True)
    with open(labels_path, "w", newline="\n") as f:
        f.writelines(lines)
    return rows


def _summary(rows, out_dir, labels_path):
    print("%-6s %-10s %5s %5s %5s %7s" % ("attr", "meaning", "pos", "neg", "NA", "pos%"))
    for a, meaning in enumerate(ATTR_NAMES):
        vals = [r[2][a] for r in rows]
        pos = sum(1 for v in vals if v == 1)
        neg = sum(1 for v in vals if v == 0)
        na = sum(1 for v in vals if v is None)
        known = pos + neg
        pct = 100.0 * pos / known if known else 0.0
        print("Attr%-2d %-10s %5d %5d %5d %6.1f%%" % (a + 1, meaning, pos, neg, na, pct))
    total = os.path.getsize(labels_path)
    total += sum(os.path.getsize(os.path.join(out_dir, r[0])) for r in rows)
    print("%d images, total size %.2f MB (%d bytes)" % (len(rows), total / 1e6, total))



def png_declaring(width, height):
    """A valid 1x1 PNG whose IHDR then claims width x height (CRC fixed): a decompression bomb of 70 bytes, for the
    tests and benchmarks of bad input."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=N_IMAGES)
    ap.add_argument("--out-dir", default=OUT_DIR)
    ap.add_argument("--labels", default=OUT_LABELS)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--na-rate", type=float, default=NA_RATE)
    args = ap.parse_args()
    rows = generate(args.n, args.out_dir, args.labels, args.seed, args.na_rate)
    _summary(rows, args.out_dir, args.labels)


if __name__ == "__main__":
    main()

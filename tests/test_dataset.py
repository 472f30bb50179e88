"""dataset.py: the labels-file parser, image loading and the transforms."""
import io
import os
import resource
import struct
import tempfile
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import dataset
from dataset import NA, LabelTable, parse_labels
from utils import Report, UserError


def write(tmp_path, content, name="labels.txt"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def quiet():
    return Report(stream=io.StringIO())


def messages(report):
    return report.stream.getvalue().splitlines()


# ---------------------------------------------------------------- labels file: the good cases

def test_four_columns_spaces_tabs_and_na_spellings(tmp_path):
    path = write(tmp_path, "a.jpg 1 0 NA 1\n"
                           "b.jpg\t0\t1\tna\t0\n"
                           "c.jpg  Na \t 1   0\tnA\n")
    report = quiet()
    table = parse_labels(path, report)
    assert isinstance(table, LabelTable)
    assert table.attributes == ["Attr1", "Attr2", "Attr3", "Attr4"]
    assert table.names == ["a.jpg", "b.jpg", "c.jpg"]
    assert table.targets.tolist() == [[1, 0, -1, 1], [0, 1, -1, 0], [-1, 1, 0, -1]]
    assert NA == -1
    assert table.lines.tolist() == [1, 2, 3]
    assert report.total == 0 and messages(report) == []


@pytest.mark.parametrize("k", [2, 6])
def test_number_of_attributes_comes_from_the_value_columns(tmp_path, k):
    rows = [[1, 0] * (k // 2), [0, NA] * (k // 2), [NA, 1] * (k // 2)]
    text = "".join(f"img{i}.png " + " ".join("NA" if v == NA else str(v) for v in row) + "\n"
                   for i, row in enumerate(rows))
    table = parse_labels(write(tmp_path, text), quiet())
    assert table.attributes == [f"Attr{i + 1}" for i in range(k)]
    assert table.targets.tolist() == rows
    assert table.names == ["img0.png", "img1.png", "img2.png"]


def test_header_names_the_attributes(tmp_path):
    path = write(tmp_path, "file\tlong dark  patterned logo\n"
                           "a.jpg 1 0 NA 1\n"
                           "b.jpg 0 0 1 0\n")
    table = parse_labels(path, quiet())
    assert table.attributes == ["long", "dark", "patterned", "logo"]
    assert table.names == ["a.jpg", "b.jpg"]
    assert table.targets.tolist() == [[1, 0, -1, 1], [0, 0, 1, 0]]
    assert table.lines.tolist() == [2, 3]


def test_header_naming_only_the_attributes_is_recognised(tmp_path):
    # `Attr1 Attr2` over rows of three fields: the header has no cell for the image column.
    table = parse_labels(write(tmp_path, "sleeves colour\na.jpg 1 0\nb.jpg NA 1\n"), Report())
    assert table.attributes == ["sleeves", "colour"]
    assert table.targets.tolist() == [[1, 0], [NA, 1]]


def test_header_repeating_a_name_is_an_error(tmp_path):
    path = write(tmp_path, "image a b a\nx.jpg 1 0 1\n")
    with pytest.raises(UserError, match=r"labels\.txt:1:.*repeats"):
        parse_labels(path, quiet())


def test_first_data_line_with_one_bad_cell_is_not_a_header(tmp_path):
    path = write(tmp_path, "img.jpg 1mobilenet 0 1 NA\n"
                           "b.jpg 1 1 0 0\n")
    report = quiet()
    table = parse_labels(path, report)
    assert table.attributes == ["Attr1", "Attr2", "Attr3", "Attr4"]
    assert table.names == ["img.jpg", "b.jpg"]
    assert table.targets.tolist() == [[NA, 0, 1, NA], [1, 1, 0, 0]]
    assert report.counts == {"bad value": 1}


def test_crlf_trailing_space_blank_lines_comments_and_bom(tmp_path):
    content = ("\ufeff# exported from a spreadsheet\r\n"
               "\r\n"
               "name A B C D   \r\n"
               "   # a comment after leading spaces\r\n"
               "a.jpg 1 0 NA 1 \t \r\n"
               "\r\n"
               "\t\r\n"
               "b.jpg 0 1 1 0\r\n"
               "# the end").encode("utf-8")
    assert content.startswith(b"\xef\xbb\xbf")
    report = quiet()
    table = parse_labels(write(tmp_path, content), report)
    assert table.attributes == ["A", "B", "C", "D"]
    assert table.names == ["a.jpg", "b.jpg"]
    assert table.targets.tolist() == [[1, 0, NA, 1], [0, 1, 1, 0]]
    assert table.lines.tolist() == [5, 8]
    assert report.total == 0


def test_bom_before_a_data_line_does_not_stick_to_the_first_name(tmp_path):
    table = parse_labels(write(tmp_path, b"\xef\xbb\xbfa.jpg 1 0\nb.jpg 0 1\n"), quiet())
    assert table.names == ["a.jpg", "b.jpg"]
    assert table.attributes == ["Attr1", "Attr2"]


# ---------------------------------------------------------------- labels file: warnings

def test_bad_cell_warns_with_file_line_and_cell_and_becomes_na(tmp_path):
    path = write(tmp_path, "a.jpg 1 0 1 0\n"
                           "b.jpg 0 1mobilenet 1 0\n"
                           "c.jpg 1 1 1 1\n")
    report = quiet()
    table = parse_labels(path, report)
    assert table.names == ["a.jpg", "b.jpg", "c.jpg"]
    assert table.targets[1].tolist() == [0, NA, 1, 0]
    assert table.targets[2].tolist() == [1, 1, 1, 1]
    (line,) = messages(report)
    assert line.startswith("warning: ")
    assert f"{path}:2:" in line
    assert "'1mobilenet'" in line and "Attr2" in line
    assert report.counts == {"bad value": 1}


def test_wrong_field_count_warns_and_skips_the_line(tmp_path):
    path = write(tmp_path, "a.jpg 1 0 1 0\n"
                           "b.jpg 0 1 1\n"
                           "c.jpg 1 1 1 1 0\n"
                           "d.jpg 0 0 0 0\n")
    report = quiet()
    table = parse_labels(path, report)
    assert table.attributes == ["Attr1", "Attr2", "Attr3", "Attr4"]
    assert table.names == ["a.jpg", "d.jpg"]
    lines = messages(report)
    assert len(lines) == 2
    assert f"{path}:2:" in lines[0] and "found 4 fields" in lines[0]
    assert f"{path}:3:" in lines[1] and "found 6 fields" in lines[1]
    assert all(m.startswith("warning: ") for m in lines)
    assert report.counts == {"wrong field count": 2}


def test_a_broken_first_line_does_not_set_the_number_of_attributes(tmp_path):
    path = write(tmp_path, "a.jpg 1 0\n"
                           "b.jpg 0 1 1 0\n"
                           "c.jpg 1 1 1 1\n")
    report = quiet()
    table = parse_labels(path, report)
    assert table.attributes == ["Attr1", "Attr2", "Attr3", "Attr4"]
    assert table.names == ["b.jpg", "c.jpg"]
    assert report.counts == {"wrong field count": 1}


def test_duplicate_image_warns_and_keeps_the_first(tmp_path):
    path = write(tmp_path, "a.jpg 1 0\n"
                           "b.jpg 0 0\n"
                           "a.jpg 0 1\n")
    report = quiet()
    table = parse_labels(path, report)
    assert table.names == ["a.jpg", "b.jpg"]
    assert table.targets.tolist() == [[1, 0], [0, 0]]
    (line,) = messages(report)
    assert line.startswith("warning: ") and f"{path}:3:" in line and "a.jpg" in line and "line 1" in line
    assert report.counts == {"duplicate image": 1}


def test_line_that_is_not_utf8_warns_and_the_rest_is_kept(tmp_path):
    path = write(tmp_path, b"a.jpg 1 0\n"
                           b"caf\xe9.jpg 0 1\n"
                           b"c.jpg 1 1\n")
    report = quiet()
    table = parse_labels(path, report)
    assert table.names == ["a.jpg", "c.jpg"]
    assert table.lines.tolist() == [1, 3]
    (line,) = messages(report)
    assert line.startswith("warning: ") and f"{path}:2:" in line and "UTF-8" in line
    assert report.counts == {"not UTF-8": 1}


def test_missing_image_on_disk_warns_and_is_skipped(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (4, 4)).save(images / "a.jpg")
    Image.new("RGB", (4, 4)).save(images / "c.jpg")
    path = write(tmp_path, "a.jpg 1 0\nb.jpg 0 1\nc.jpg 1 1\n")
    report = quiet()
    table = dataset.drop_missing_images(parse_labels(path, report), str(images), report)
    assert table.names == ["a.jpg", "c.jpg"]
    assert table.targets.tolist() == [[1, 0], [1, 1]]
    assert table.lines.tolist() == [1, 3]
    (line,) = messages(report)
    assert line.startswith("warning: ") and f"{path}:2:" in line and os.path.join(str(images), "b.jpg") in line
    assert report.counts == {"image not found": 1}


def test_utf16_file_is_read_or_refused_clearly(tmp_path):
    """Excel's "Unicode Text" and Notepad's "Unicode" save UTF-16: its lines are mostly valid UTF-8 (ASCII
    plus NUL bytes), so a line-by-line UTF-8 check lets garbage names like '\\x00b\\x00.\\x00j...' through."""
    path = write(tmp_path, "image\tA\tB\r\na.jpg\t1\t0\r\nb.jpg\t0\tNA\r\n".encode("utf-16"))
    try:
        table = parse_labels(path, quiet())
    except UserError as e:
        assert path in str(e) and "UTF" in str(e)
        return
    assert table.attributes == ["A", "B"]
    assert table.names == ["a.jpg", "b.jpg"]
    assert table.targets.tolist() == [[1, 0], [0, NA]]


def test_report_counts_every_reason(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg", "d.jpg", "f.jpg"):
        Image.new("RGB", (4, 4)).save(images / name)
    path = write(tmp_path, b"a.jpg 1 0 1\n"
                           b"b.jpg 1 x 1\n"     # bad value
                           b"b.jpg 1 1 1\n"     # duplicate
                           b"c.jpg 1 1\n"       # wrong field count
                           b"\xff\xfe 1 1 1\n"  # not UTF-8
                           b"d.jpg y 0 z\n"     # two bad values
                           b"e.jpg 0 0 0\n"     # image not on disk
                           b"f.jpg 0 0 0\n")
    report = quiet()
    table, paths, targets = dataset.load_dataset(path, str(images), report)
    assert report.counts == {"bad value": 3, "duplicate image": 1, "wrong field count": 1, "not UTF-8": 1,
                             "image not found": 1}
    assert report.total == 7
    assert len(messages(report)) == 7
    assert table.names == ["a.jpg", "b.jpg", "d.jpg", "f.jpg"]
    assert paths == [os.path.join(str(images), n) for n in table.names]
    assert targets.dtype == torch.int8  # compact from the parser to the batch
    assert targets.tolist() == [[1, 0, 1], [1, NA, 1], [NA, 0, NA], [0, 0, 0]]


def test_report_prints_to_stderr_by_default(capsys):
    report = Report()
    report.warn("some reason", "x.txt:3: something odd")
    assert capsys.readouterr().err == "warning: x.txt:3: something odd\n"
    assert report.counts == {"some reason": 1}


@pytest.mark.parametrize("content, reason", [
    (b"a.jpg 1 0\nb.jpg 1 1mobilenet\n", "1mobilenet"),
    (b"a.jpg 1 0\nb.jpg 1 0 1\nc.jpg 0 0\n", "found 4 fields"),
    (b"a.jpg 1 0\na.jpg 1 1\n", "already listed"),
    (b"a.jpg 1 0\n\xe9.jpg 1 1\n", "UTF-8"),
])
def test_strict_turns_each_warning_into_an_error(tmp_path, content, reason):
    path = write(tmp_path, content)
    with pytest.raises(UserError, match=reason) as caught:
        parse_labels(path, Report(strict=True, stream=io.StringIO()))
    assert f"{path}:2:" in str(caught.value)


def test_strict_missing_image_is_an_error(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (4, 4)).save(images / "a.jpg")
    path = write(tmp_path, "a.jpg 1 0\nb.jpg 0 1\n")
    with pytest.raises(UserError, match=r"labels\.txt:2:.*b\.jpg not found"):
        dataset.load_dataset(path, str(images), Report(strict=True, stream=io.StringIO()))


def test_strict_without_problems_parses_normally(tmp_path):
    table = parse_labels(write(tmp_path, "a.jpg 1 NA\n"), Report(strict=True))
    assert table.targets.tolist() == [[1, NA]]


# ---------------------------------------------------------------- labels file: errors

@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"# only\n# comments\n", b"\xef\xbb\xbf\r\n",
                                     b"\xef\xbb\xbf# header comment\r\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = write(tmp_path, content)
    with pytest.raises(UserError, match="no labels") as caught:
        parse_labels(path, quiet())
    assert path in str(caught.value)


def test_file_that_does_not_exist_is_an_error_naming_it(tmp_path):
    path = str(tmp_path / "nope.txt")
    with pytest.raises(UserError) as caught:
        parse_labels(path, quiet())
    assert path in str(caught.value) and "not found" in str(caught.value)


def test_folder_given_as_labels_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(UserError) as caught:
        parse_labels(str(tmp_path), quiet())
    assert str(tmp_path) in str(caught.value)


def test_no_usable_row_is_an_error(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    path = write(tmp_path, "a.jpg 1 0\nb.jpg 0 1\n")
    report = quiet()
    with pytest.raises(UserError, match="no usable row") as caught:
        dataset.load_dataset(path, str(images), report)
    assert path in str(caught.value)
    assert report.counts == {"image not found": 2}


def test_missing_images_folder_is_an_error_naming_it(tmp_path):
    path = write(tmp_path, "a.jpg 1 0\n")
    with pytest.raises(UserError, match="images folder not found") as caught:
        dataset.load_dataset(path, str(tmp_path / "imgs"), quiet())
    assert str(tmp_path / "imgs") in str(caught.value)


TOKENS = ["a.jpg", "b.png", "1", "0", "NA", "na", "nA", "x", "1mobilenet", "#", " ", "  ", "\t", "\n", "\r\n",
          "\r", "\ufeff", "é", "\x00", "\u2028", "\x85"]


def _check_parse(content, strict):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "labels.txt")
        with open(path, "wb") as f:
            f.write(content)
        try:
            table = parse_labels(path, Report(strict=strict, stream=io.StringIO()))
        except UserError:
            return
    assert isinstance(table, LabelTable)
    k = len(table.attributes)
    assert k >= 1
    assert len(table.names) == len(table.targets) == len(table.lines)
    assert len(set(table.names)) == len(table.names)
    assert table.targets.dtype == np.int8 and table.targets.shape == (len(table.names), k)
    for row in table.targets.tolist():
        assert len(row) == k and set(row) <= {1, 0, NA}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.booleans())
def test_any_bytes_parse_or_raise_user_error(content, strict):
    _check_parse(content, strict)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.lists(st.sampled_from(TOKENS), max_size=60).map("".join), st.text(max_size=200)),
       st.sampled_from(["utf-8", "utf-16", "latin-1"]), st.booleans())
def test_any_text_parses_or_raises_user_error(text, encoding, strict):
    _check_parse(text.encode(encoding, errors="replace"), strict)


# ---------------------------------------------------------------- images

def save(image, path, **kwargs):
    image.save(path, **kwargs)
    return str(path)


def test_grayscale_image_becomes_rgb(tmp_path):
    im = dataset.load_image(save(Image.new("L", (6, 4), 100), tmp_path / "g.png"))
    assert im.mode == "RGB" and im.size == (6, 4)
    assert im.getpixel((2, 2)) == (100, 100, 100)


def test_palette_image_becomes_rgb(tmp_path):
    rgb = Image.new("RGB", (6, 4), (200, 30, 40))
    rgb.paste((10, 120, 250), (0, 0, 3, 4))
    path = save(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), tmp_path / "p.png")
    assert Image.open(path).mode == "P"
    im = dataset.load_image(path)
    assert im.mode == "RGB" and im.size == (6, 4)
    assert im.getpixel((1, 1)) == (10, 120, 250)
    assert im.getpixel((5, 1)) == (200, 30, 40)


def test_palette_image_with_transparency_gets_white_background(tmp_path):
    p = Image.new("P", (6, 4), 0)
    p.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    p.paste(1, (3, 0, 6, 4))
    path = save(p, tmp_path / "pt.png", transparency=0)
    reopened = Image.open(path)
    assert reopened.mode == "P" and "transparency" in reopened.info
    im = dataset.load_image(path)
    assert im.mode == "RGB"
    assert im.getpixel((1, 1)) == (255, 255, 255)  # index 0 is transparent (black underneath)
    assert im.getpixel((4, 1)) == (200, 30, 40)


def test_rgba_transparent_pixels_become_white(tmp_path):
    rgba = Image.new("RGBA", (6, 4), (0, 0, 0, 0))
    rgba.paste((10, 120, 250, 255), (3, 0, 6, 4))
    im = dataset.load_image(save(rgba, tmp_path / "a.png"))
    assert im.mode == "RGB"
    assert im.getpixel((1, 1)) == (255, 255, 255)
    assert im.getpixel((4, 1)) == (10, 120, 250)


def test_half_transparent_pixel_is_blended_with_white(tmp_path):
    im = dataset.load_image(save(Image.new("RGBA", (2, 2), (0, 0, 0, 128)), tmp_path / "h.png"))
    value = im.getpixel((0, 0))
    assert all(abs(v - 127) <= 1 for v in value)


def test_grayscale_with_alpha_becomes_rgb_on_white(tmp_path):
    la = Image.new("LA", (6, 4), (50, 0))
    la.paste((50, 255), (3, 0, 6, 4))
    im = dataset.load_image(save(la, tmp_path / "la.png"))
    assert im.mode == "RGB"
    assert im.getpixel((1, 1)) == (255, 255, 255)
    assert im.getpixel((4, 1)) == (50, 50, 50)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    path = save(cmyk, tmp_path / "c.jpg", quality=100)
    assert Image.open(path).mode == "CMYK"
    im = dataset.load_image(path)
    assert im.mode == "RGB" and im.size == (16, 16)
    r, g, b = im.getpixel((8, 8))
    assert r < 20 and g > 235 and b > 235


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(a), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    im = dataset.load_image(path)
    assert im.mode == "RGB" and im.size == (3, 1)
    assert im.getpixel((0, 0)) == (0, 0, 0)
    assert all(abs(v - 128) <= 1 for v in im.getpixel((1, 0)))  # clipping would give 255
    assert im.getpixel((2, 0)) == (255, 255, 255)


def test_16_bit_grayscale_that_is_dark_stays_dark(tmp_path):
    """A 16-bit picture whose brightest pixel is 200 of 65535 is almost black, whatever mode PIL opens it in."""
    a = np.full((2, 2), 200, dtype=np.uint16)
    im = dataset.load_image(save(Image.fromarray(a), tmp_path / "dark16.png"))
    assert max(im.getpixel((0, 0))) <= 1


def test_one_pixel_image(tmp_path):
    im = dataset.load_image(save(Image.new("RGB", (1, 1), (9, 8, 7)), tmp_path / "one.png"))
    assert im.mode == "RGB" and im.size == (1, 1) and im.getpixel((0, 0)) == (9, 8, 7)
    x = dataset.eval_transform(32)(im)
    assert x.shape == (3, 32, 32)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 20 wide x 10 high with a red block at the top-left; Orientation 6 says "rotate 90° clockwise
    # to display", so the upright picture is 10 wide x 20 high with the block at the top-right.
    stored = Image.new("RGB", (20, 10), (255, 255, 255))
    stored.paste((255, 0, 0), (0, 0, 5, 5))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(stored, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    assert Image.open(path).size == (20, 10)
    im = dataset.load_image(path)
    assert im.size == (10, 20)
    r, g, b = im.getpixel((8, 1))
    assert r > 200 and g < 60 and b < 60
    for corner in [(1, 1), (1, 18), (8, 18)]:
        assert min(im.getpixel(corner)) > 200


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"this is a text file, not a picture\n", "cannot read image"),
])
def test_unreadable_file_is_a_user_error_naming_it(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(UserError, match=reason) as caught:
        dataset.load_image(str(path))
    assert str(path) in str(caught.value)


def test_truncated_jpeg_is_a_user_error(tmp_path):
    good = save(Image.effect_noise((64, 64), 60).convert("RGB"), tmp_path / "good.jpg", quality=95)
    data = open(good, "rb").read()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="cannot read image") as caught:
        dataset.load_image(str(path))
    assert str(path) in str(caught.value)


def test_missing_image_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found") as caught:
        dataset.load_image(str(tmp_path / "gone.jpg"))
    assert "gone.jpg" in str(caught.value)


def png_declaring(width, height):
    """A tiny valid 1x1 PNG whose header then claims width x height (the CRC patched to match)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (10_000, 9_000), (1, 100_000_000)])
def test_decompression_bomb_is_refused_without_decoding(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(width, height))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UserError, match="decompression bomb") as caught:
        dataset.load_image(str(path))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert str(path) in str(caught.value)
    assert grown_mib < 200


def test_image_just_under_the_limit_is_not_refused_by_size(tmp_path):
    # 9,000 x 9,000 = 81 M pixels < MAX_IMAGE_PIXELS: refused only because its data is missing.
    path = tmp_path / "big.png"
    path.write_bytes(png_declaring(9_000, 9_000))
    with pytest.raises(UserError) as caught:
        dataset.load_image(str(path))
    assert "decompression bomb" not in str(caught.value)


# ---------------------------------------------------------------- transforms

def picture(width=37, height=23, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def test_eval_transform_shape_and_imagenet_normalization():
    x = dataset.eval_transform(16)(Image.new("RGB", (40, 30), (255, 255, 255)))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    for c, (m, s) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        assert torch.allclose(x[c], torch.full((16, 16), (1 - m) / s), atol=1e-6)
    black = dataset.eval_transform(16)(Image.new("RGB", (5, 5)))
    assert torch.allclose(black[0], torch.full((16, 16), -0.485 / 0.229), atol=1e-6)


def test_eval_transform_uses_the_given_normalization():
    x = dataset.eval_transform(8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))(Image.new("RGB", (3, 3), (255, 0, 255)))
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -2.0, 0.5]))


def test_flip_of_eval_tensor_equals_eval_of_flipped_image():
    img = picture()
    t = dataset.eval_transform(16)
    assert torch.equal(torch.flip(t(img), [2]), t(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


def test_train_flip_transform_gives_the_eval_tensor_or_its_mirror_exactly():
    img = picture()
    plain = dataset.eval_transform(16)(img)
    mirror = torch.flip(plain, [2])
    assert not torch.equal(plain, mirror)
    train_t = dataset.train_transform(16, augment="flip")
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        x = train_t(img)
        assert x.shape == (3, 16, 16)
        assert torch.equal(x, plain) or torch.equal(x, mirror)
        seen.add(torch.equal(x, mirror))
    assert seen == {True, False}


def test_train_strong_transform_shape():
    torch.manual_seed(0)
    t = dataset.train_transform(16, augment="strong")
    for img in (picture(), picture(7, 50), Image.new("RGB", (1, 1), (3, 4, 5))):
        x = t(img)
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert torch.isfinite(x).all()


def test_unknown_augment_is_a_user_error():
    with pytest.raises(UserError, match="unknown augment 'mixup'"):
        dataset.train_transform(16, augment="mixup")


# ---------------------------------------------------------------- dataset + collate

def test_image_dataset_and_collate_drop_an_unreadable_image(tmp_path):
    good = save(Image.new("RGB", (10, 10), (1, 2, 3)), tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    ds = dataset.ImageDataset([good, str(bad), good], None, dataset.eval_transform(8))
    indices, images, errors = dataset.collate([ds[0], ds[1], ds[2]])
    assert indices.tolist() == [0, 2]
    assert images.shape == (2, 3, 8, 8)
    assert len(errors) == 1 and errors[0][0] == 1 and str(bad) in errors[0][1]
    indices, images, errors = dataset.collate([ds[1]])
    assert images is None and indices.numel() == 0 and len(errors) == 1


def test_list_images_finds_image_files_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.JPG", "a.png", "sub/c.jpeg", "notes.txt", "d.webp"):
        (tmp_path / name).write_bytes(b"x")
    found = [os.path.relpath(p, tmp_path) for p in dataset.list_images(str(tmp_path))]
    assert found == ["a.png", "b.JPG", "d.webp", os.path.join("sub", "c.jpeg")]


def test_label_counts_by_hand():
    t = torch.tensor([[1, 0, NA], [1, NA, NA], [0, 0, 1]])
    assert dataset.label_counts(t) == {"positive": [2, 0, 1], "negative": [1, 2, 0], "na": [0, 1, 2]}


# ---------------------------------------------------------------- labels file: compact and streaming

def reference_parse(path):
    """The parser as it was before it streamed (a whole-file read, Python lists): the oracle the streaming one must
    match line for line. Returns (attributes, names, targets, lines, messages) or the UserError's text."""
    report = quiet()
    raw = open(path, "rb").read()
    try:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            raw = raw.decode("utf-16").encode("utf-8")
    except UnicodeDecodeError:
        return "UTF-16"
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    content = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
            assert "\x00" not in text
        except (UnicodeDecodeError, AssertionError):
            report.warn("not UTF-8", f"{path}:{number}: line is not UTF-8 text, skipped (save the file as UTF-8)")
            continue
        if text.strip() and not text.strip().startswith("#"):
            content.append((number, text.split()))
    if not content:
        return "no labels"
    value = {"1": 1, "0": 0, "na": NA}
    first = content[0][1]
    if len(first) > 1 and all(c.lower() not in value for c in first[1:]):
        widths = Counter(len(f) for _, f in content[1:])
        attributes = first if widths and widths.most_common(1)[0][0] == len(first) + 1 else first[1:]
        if len(set(attributes)) != len(attributes):
            return "repeats"
        content = content[1:]
    else:
        counts = Counter(len(f) for _, f in content if len(f) > 1)
        if not counts:
            return "no line has attribute values"
        attributes = [f"Attr{i + 1}" for i in range(max(counts, key=lambda n: (counts[n], n)) - 1)]
    names, targets, lines, seen = [], [], [], {}
    for number, fields in content:
        if len(fields) != len(attributes) + 1:
            report.warn("wrong field count", f"{path}:{number}: expected an image name and {len(attributes)} values, "
                                             f"found {len(fields)} fields; line skipped")
            continue
        same = os.path.normpath(fields[0])
        if same in seen:
            report.warn("duplicate image", f"{path}:{number}: {fields[0]} already listed on line {seen[same]}; "
                                           f"the first is kept")
            continue
        row = []
        for attribute, cell in zip(attributes, fields[1:]):
            if cell.lower() not in value:
                report.warn("bad value",
                            f"{path}:{number}: {attribute} value {cell!r} is not 1, 0 or NA; treated as NA")
            row.append(value.get(cell.lower(), NA))
        seen[same] = number
        names.append(fields[0]), targets.append(row), lines.append(number)
    return attributes, names, targets, lines, messages(report)


def streamed(path):
    report = quiet()
    try:
        table = parse_labels(path, report)
    except UserError as e:
        return next(s for s in ("UTF-16", "no labels", "repeats", "no line has attribute values") if s in str(e))
    return table.attributes, list(table.names), table.targets.tolist(), table.lines.tolist(), messages(report)


MIXED = (b"# exported\r\n"
         b"a.jpg 1 0 NA\r\n"
         b"b.jpg\t0\x1c1 nA\n"          # \x1c is whitespace to str.split()
         b"caf\xc3\xa9.jpg 1 x 0\n"     # UTF-8, not ASCII: the Python path
         b"\xff.jpg 1 1 1\n"            # not UTF-8
         b"./a.jpg 0 0 0\n"             # duplicate of a.jpg
         b"d.jpg 1 0\n"                 # wrong field count
         b"e.jpg 1mobilenet Na 0\n"
         b"f\x07.jpg 1 1 1\n"           # a control byte that is not whitespace: the Python path
         b"  \n"
         b"g.jpg 0 1 1")                # no newline at the end


@pytest.mark.parametrize("chunk_bytes", [1 << 22, 7, 40, 64])
def test_streaming_matches_a_whole_file_read_at_any_chunk_size(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(dataset, "CHUNK_BYTES", chunk_bytes)
    path = write(tmp_path, MIXED)
    attributes, names, targets, lines, said = streamed(path)
    assert (attributes, names, targets, lines, said) == reference_parse(path)
    assert names == ["a.jpg", "b.jpg", "café.jpg", "e.jpg", "f\x07.jpg", "g.jpg"]
    assert targets == [[1, 0, NA], [0, 1, NA], [1, NA, 0], [NA, NA, 0], [1, 1, 1], [0, 1, 1]]
    assert lines == [2, 3, 4, 8, 9, 11]
    # Not UTF-8 first, then each line's own in order: x, the duplicate, the short line, 1mobilenet.
    assert [m.split(": ")[1] for m in said] == [f"{path}:{n}" for n in (5, 4, 6, 7, 8)]


def test_k_decided_by_the_whole_file_when_the_first_chunk_disagrees(tmp_path, monkeypatch):
    # The first chunk has only 2-value lines; most lines of the file have 3: K is 3 and the early lines are wrong.
    monkeypatch.setattr(dataset, "CHUNK_BYTES", 32)
    path = write(tmp_path, "a.jpg 1 0\nb.jpg 0 1\n" + "".join(f"r{i}.jpg 1 0 NA\n" for i in range(3)))
    attributes, names, targets, lines, said = streamed(path)
    assert (attributes, names, targets, lines, said) == reference_parse(path)
    assert attributes == ["Attr1", "Attr2", "Attr3"]
    assert names == ["r0.jpg", "r1.jpg", "r2.jpg"] and targets == [[1, 0, NA]] * 3
    assert len(said) == 2 and "found 3 fields" in said[0] and f"{path}:1:" in said[0]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(TOKENS + ["c.jpg", "./a.jpg", "\x1c", "\x07", "N", "A"]), max_size=80).map("".join),
       st.sampled_from([1 << 22, 5, 23]))
def test_any_text_parses_as_a_whole_file_read_does(tmp_path, text, chunk_bytes):
    path = write(tmp_path, text.encode("utf-8"))
    dataset.CHUNK_BYTES, saved = chunk_bytes, dataset.CHUNK_BYTES
    try:
        assert streamed(path) == reference_parse(path)
    finally:
        dataset.CHUNK_BYTES = saved


def test_targets_lines_and_names_are_compact(tmp_path):
    table = parse_labels(write(tmp_path, "a.jpg 1 0 NA\nsub/b.jpg 0 NA 1\n"), quiet())
    assert table.targets.dtype == np.int8 and table.targets.flags.c_contiguous
    assert table.targets.tolist() == [[1, 0, -1], [0, -1, 1]]
    assert table.lines.dtype == np.int64 and table.lines.tolist() == [1, 2]
    names = table.names
    assert isinstance(names, dataset.Names) and names.blob == b"a.jpg\nsub/b.jpg"  # one blob, not str objects
    assert (len(names), names[0], names[1], names[-1]) == (2, "a.jpg", "sub/b.jpg", "sub/b.jpg")
    assert names == ["a.jpg", "sub/b.jpg"] and names.take([1]) == ["sub/b.jpg"]
    with pytest.raises(IndexError):
        names[2]


def test_load_dataset_gives_int8_targets_that_share_the_parsed_array(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (4, 4)).save(images / name)
    table, paths, targets = dataset.load_dataset(write(tmp_path, "a.jpg 1 NA\nb.jpg 0 1\n"), str(images), quiet())
    assert targets.dtype == torch.int8 and targets.tolist() == [[1, NA], [0, 1]]
    assert targets.numpy().base is not None and np.shares_memory(targets.numpy(), table.targets)  # no copy


def test_rewrite_labels_changes_only_the_decided_cells_and_keeps_every_other_byte(tmp_path):
    """A BOM, CRLF line ends, a header, a comment, tabs, a row whose image is missing: only the two cells set
    differently change, the comments given go first, and the parser reads back the new values."""
    from dataset import rewrite_labels

    path = tmp_path / "labels.txt"
    original = ("\ufeffimage_name\tsleeves colour\r\n# a note\r\na.jpg\t1  NA\r\nb.jpg 0 0\r\nc.jpg 1 1\r\n")
    path.write_bytes(original.encode("utf-8"))
    table = parse_labels(str(path))
    targets = table.targets.copy()
    targets[0, 1] = 0  # NA -> 0
    targets[2, 0] = -1  # 1 -> NA
    text = rewrite_labels(str(path), table, targets, comments=["# reviewed: 2 cells"])
    assert text == ("\ufeff# reviewed: 2 cells\r\nimage_name\tsleeves colour\r\n# a note\r\na.jpg\t1  0\r\n"
                    "b.jpg 0 0\r\nc.jpg NA 1\r\n").encode("utf-8")
    out = tmp_path / "out.txt"
    out.write_bytes(text)
    again = parse_labels(str(out))
    assert again.names == table.names and again.attributes == ["sleeves", "colour"]
    assert (again.targets == targets).all()

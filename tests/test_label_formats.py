"""labels.py and dataset.parse_labels: every format and value convention read to the table a hand count gives,
written back by every writer as it was read, and a file that is mostly not understood refused in one line."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest

import labels
from conftest import FAST, ROOT
from dataset import NA, LabelOptions, parse_labels, rewrite_labels, write_labels
from utils import Report, UserError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


def read(path, **options):
    """(table, the `labels:` line, the warning lines, report)."""
    said = io.StringIO()
    report = Report(stream=said, info_stream=said)
    table = parse_labels(path, report, options=LabelOptions(**options))
    lines = said.getvalue().splitlines()
    assert lines[0].startswith("labels: ")  # before anything else
    return table, lines[0], lines[1:], report


def same(a, b):
    assert a.attributes == b.attributes
    assert list(a.names) == list(b.names)
    assert a.targets.tolist() == b.targets.tolist()


CELEBA = ("202599\n"
          "5_o_Clock_Shadow Arched_Eyebrows Smiling\n"
          "000001.jpg -1  1  1\n"
          "000002.jpg -1 -1  1\n"
          "000003.jpg  1 -1 -1\n")


# ---- table: the seed's format, CelebA's count line, VOC's 1/-1/0 ----

def test_celeba_count_line_double_spaces_and_1_minus_1(tmp_path):
    table, said, warned, report = read(write(tmp_path, "list_attr_celeba.txt", CELEBA))
    assert said == ("labels: list_attr_celeba.txt read as table (count line, header), 3 rows x 3 attributes, "
                    "values 1/-1 -> 1/0, 0 NA")
    assert table.attributes == ["5_o_Clock_Shadow", "Arched_Eyebrows", "Smiling"]
    assert table.names == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert table.targets.tolist() == [[0, 1, 1], [0, 0, 1], [1, 0, 0]]
    assert table.lines.tolist() == [3, 4, 5]
    assert table.format.count_line and table.format.values == "pm1" and table.format.header == "attributes"
    assert warned == [] and report.total == 0


def test_the_seed_format_says_what_it_read_and_nothing_else_changes(tmp_path):
    table, said, warned, _ = read(write(tmp_path, "labels.txt", "a.jpg 1 0 NA\nb.jpg 0 NA NA\n"))
    assert said == "labels: labels.txt read as table, 2 rows x 3 attributes, values 1/0, 3 NA"
    assert table.targets.tolist() == [[1, 0, NA], [0, NA, NA]] and table.format.values == "01"


def test_voc_zero_is_unknown_but_a_few_stray_minus_ones_keep_1_0(tmp_path):
    # VOC's ImageSets: 1 present, -1 absent, 0 difficult (unknown); -1 outnumbers 0.
    table, said, warned, _ = read(write(tmp_path, "aeroplane_train.txt", "a 1\nb -1\nc  0\nd -1\n"))
    assert table.targets.tolist() == [[1], [0], [NA], [0]]
    assert said.endswith("values 1/-1/0 -> 1/0/NA, 1 NA") and warned == []
    # A 1/0 file with one -1: 0 outnumbers -1, so it stays 1/0 and the -1 is a bad cell (NA, warned).
    table, said, warned, report = read(write(tmp_path, "typo.txt", "a 1 0\nb 0 0\nc 0 -1\n"))
    assert table.targets.tolist() == [[1, 0], [0, 0], [0, NA]] and said.endswith("values 1/0, 1 NA")
    assert warned == [f"warning: {tmp_path}/typo.txt:3: Attr2 value '-1' is not 1, 0 or NA; treated as NA"]
    assert report.counts == {"bad value": 1}


def test_values_flag_forces_the_mapping(tmp_path):
    path = write(tmp_path, "l.txt", "a 1 -1\nb -1 0\n")
    assert read(path)[0].targets.tolist() == [[1, 0], [0, NA]]  # detected: voc
    table, said, warned, report = read(path, values="pm1")  # 0 is not a value of 1/-1
    assert table.targets.tolist() == [[1, 0], [0, NA]] and report.counts == {"bad value": 1}
    assert "'0' is not 1, -1 or NA" in warned[0]


def test_yes_no_in_a_table_and_header_words(tmp_path):
    table, said, _, report = read(write(tmp_path, "l.txt", "image hat scarf\na.jpg yes no\nb.jpg No NA\n"))
    assert table.attributes == ["hat", "scarf"] and table.targets.tolist() == [[1, 0], [0, NA]]
    assert said.endswith("values yes/no -> 1/0, 1 NA") and report.total == 0


def test_attributes_flag_reads_those_columns_in_that_order(tmp_path):
    path = write(tmp_path, "l.txt", "image a b c\nx.jpg 1 0 bad\ny.jpg 0 1 bad\n")
    table, said, warned, _ = read(path, attributes=("b", "a"))
    assert table.attributes == ["b", "a"] and table.targets.tolist() == [[0, 1], [1, 0]] and warned == []
    with pytest.raises(UserError, match="--attributes: d not among the attributes"):
        read(path, attributes=("a", "d"))


# ---- csv ----

def test_csv_with_quoted_names_holding_commas_and_spaces(tmp_path):
    path = write(tmp_path, "attrs.csv", 'image,"Wavy Hair, long",Smiling,"Bald"\n'
                                        'img.jpg,1,0,\n'
                                        '"my photo, 2.jpg",,1,0\n'
                                        'c.jpg,0,0,1\n')
    table, said, warned, _ = read(path)
    assert said == "labels: attrs.csv read as csv (image column image), 3 rows x 3 attributes, values 1/0, 2 NA"
    assert table.attributes == ["Wavy Hair, long", "Smiling", "Bald"]
    assert table.names == ["img.jpg", "my photo, 2.jpg", "c.jpg"]
    assert table.targets.tolist() == [[1, 0, NA], [NA, 1, 0], [0, 0, 1]]
    assert table.lines.tolist() == [2, 3, 4] and warned == []


def test_csv_comments_short_long_blank_and_duplicate_rows(tmp_path):
    path = write(tmp_path, "l.csv", "# exported\nfile,A,B\nx.jpg,1,0\ny.jpg,1,0,1\n\nz.jpg,0\nx.jpg,0,0\n")
    table, _, warned, report = read(path)
    assert table.names == ["x.jpg", "z.jpg"] and table.targets.tolist() == [[1, 0], [0, NA]]
    assert table.lines.tolist() == [3, 6]
    assert warned == [f"warning: {path}:4: expected 3 fields, found 4; line skipped",
                      f"warning: {path}:7: x.jpg already listed on line 3; the first is kept"]
    assert report.counts == {"wrong field count": 1, "duplicate image": 1}


def test_csv_true_false_tsv_and_a_csv_named_txt(tmp_path):
    table, said, _, _ = read(write(tmp_path, "b.csv", "name,A,B\na,True,False\nb,,TRUE\n"))
    assert table.targets.tolist() == [[1, 0], [NA, 1]] and said.endswith("values true/false -> 1/0, 1 NA")
    table, said, _, _ = read(write(tmp_path, "t.tsv", "image\tA\tB\na.jpg\t1\t\nb.jpg\tNA\t0\n"))
    assert "read as tsv" in said and table.targets.tolist() == [[1, NA], [NA, 0]]
    table, said, _, _ = read(write(tmp_path, "labels.txt", "image,A,B\na.jpg,1,\nb.jpg,,0\n"))
    assert "read as csv" in said and table.targets.tolist() == [[1, NA], [NA, 0]]


def test_csv_with_a_column_of_words_is_read_only_with_attributes(tmp_path):
    rows = "".join(f"i{n}.jpg,{'train' if n % 2 else 'val'},1,0\n" for n in range(60))
    path = write(tmp_path, "l.csv", "image,split,A,B\n" + rows)
    with pytest.raises(UserError) as caught:
        read(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: read as csv (image column image) with values 1, 0 or NA, 60 of 180 value "
                              "cells (33%) cannot be read, the first on line 2: split 'val'")
    assert "--attributes a,b,c" in message and "\n" not in message
    table, said, warned, _ = read(path, attributes=("A", "B"))
    assert table.targets.tolist() == [[1, 0]] * 60 and warned == []


# ---- tags ----

def test_tag_lists_with_an_empty_cell(tmp_path):
    path = write(tmp_path, "train_v2.csv", "image_name,tags\ntrain_0,haze primary\ntrain_1,\n"
                                           "train_2,agriculture clear primary water\n")
    table, said, warned, _ = read(path)
    assert said == ("labels: train_v2.csv read as tags (csv, tags in tags, split on whitespace), 3 rows x 5 "
                    "attributes, values a listed tag 1, an unlisted one 0, 0 NA")
    assert table.attributes == ["agriculture", "clear", "haze", "primary", "water"]  # every tag seen, sorted
    assert table.targets.tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 0, 1, 1]]
    assert table.lines.tolist() == [2, 3, 4] and warned == []


def test_tag_delimiters_and_tags_in_a_whitespace_file(tmp_path):
    table = read(write(tmp_path, "t.csv", "fname,labels\na.jpg,cat|dog\nb.jpg,dog\n"))[0]
    assert table.attributes == ["cat", "dog"] and table.targets.tolist() == [[1, 1], [0, 1]]
    table = read(write(tmp_path, "t2.csv", "fname,labels\na.jpg,cat dog\nb.jpg,dog\n"), delimiter="-")[0]
    assert table.attributes == ["cat dog", "dog"]
    path = write(tmp_path, "tags.txt", "a.jpg cat dog\nb.jpg\nc.jpg bird\n")
    table, said, _, _ = read(path, format="tags")
    assert "lines of an image and its tags" in said
    assert table.attributes == ["bird", "cat", "dog"] and table.targets.tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]


def test_tag_lists_read_as_a_table_are_one_error_naming_the_flag(tmp_path):
    path = write(tmp_path, "tags.txt", "".join(f"im{i}.jpg cat dog\n" for i in range(40)))
    with pytest.raises(UserError, match=r"tags\.txt: read as table .* 78 of 78 value cells \(100%\) cannot be "
                                        r"read, the first on line 2: cat 'cat'; .*--label-format tags"):
        parse_labels(path, Report(stream=io.StringIO(), info_stream=io.StringIO()))


# ---- long ----

OPEN_IMAGES = ("ImageID,Source,LabelName,Confidence\n"
               "img1,verification,/m/01,1\n"
               "img1,verification,/m/02,0\n"
               "img2,crowdsource-verified,/m/01,1\n"
               "img2,verification,/m/01,0\n"  # disagrees with the line above
               "img3,verification,/m/03,1\n"
               "img3,verification,/m/03,1\n")  # agrees: no warning


def test_long_file_with_a_disagreeing_duplicate(tmp_path):
    path = write(tmp_path, "human_labels.csv", OPEN_IMAGES)
    table, said, warned, report = read(path)
    assert said == ("labels: human_labels.csv read as long (csv, images in ImageID, attributes in LabelName, values "
                    "in Confidence), 3 rows x 3 attributes, values 1/0, pairs not listed NA, 6 NA")
    assert table.attributes == ["/m/01", "/m/02", "/m/03"] and table.names == ["img1", "img2", "img3"]
    assert table.targets.tolist() == [[1, 0, NA], [NA, NA, NA], [NA, NA, 1]]
    assert table.lines.tolist() == [2, 4, 6]  # each image's first row
    assert warned == [f"warning: {path}:5: img2 /m/01 listed as 0 here and as 1 on line 4; the cell is NA"]
    assert report.counts == {"disagreeing duplicate": 1}


def test_long_confidences_threshold_at_one_half_and_no_value_column_means_listed(tmp_path):
    path = write(tmp_path, "c.csv", "image,label,confidence\na,cat,0.9\na,dog,0.2\nb,cat,0.5\nb,dog,\nc,cow,0.49\n")
    table, said, _, _ = read(path)
    assert table.attributes == ["cat", "cow", "dog"]
    assert table.targets.tolist() == [[1, NA, 0], [1, NA, NA], [NA, 0, NA]]
    assert "confidence >= 0.5 -> 1 (else 0)" in said
    table, said, _, _ = read(write(tmp_path, "l.csv", "image,attribute\na,cat\na,dog\nb,cat\n"))
    assert table.targets.tolist() == [[1, 1], [1, NA]] and "every listed pair 1, pairs not listed NA" in said


def test_long_file_too_large_for_a_dense_table_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(labels, "dense_limit", lambda: 8)
    path = write(tmp_path, "big.csv", OPEN_IMAGES)
    with pytest.raises(UserError) as caught:
        read(path)
    assert str(caught.value) == (f"{path}: 3 images x 3 attributes would be a dense table of 9 bytes (int8), more "
                                 "than half of this machine's memory; read fewer attributes (--attributes a,b,c) or "
                                 "split the file")


# ---- warnings: one by one while few, grouped when many ----

def test_many_warnings_are_one_line_per_kind_and_attribute_with_full_counts(tmp_path):
    rows = "".join(f"i{i}.jpg 1 0 {'x' if i % 30 == 0 else 1} {'-1' if i % 40 == 0 else 0}\n" for i in range(3000))
    path = write(tmp_path, "l.txt", "name A B C D\n" + rows + "short.jpg 1 0\n")
    table, said, warned, report = read(path)
    assert said.endswith("3,000 rows x 4 attributes, values 1/0, 175 NA")
    assert warned == [
        f"warning: {path}: 100 x bad value (C), the first on line 2: C value 'x' is not 1, 0 or NA; treated as NA",
        f"warning: {path}: 75 x bad value (D), the first on line 2: D value '-1' is not 1, 0 or NA; treated as NA",
        f"warning: {path}: 1 x wrong field count, the first on line 3002: expected an image name and 4 values, "
        "found 3 fields; line skipped"]
    assert report.counts == {"bad value": 175, "wrong field count": 1}
    assert int((table.targets[:, 2] == NA).sum()) == 100 and int((table.targets[:, 3] == NA).sum()) == 75


# ---- the mostly unreadable file, end to end: one error line, before any training ----

def test_mostly_unreadable_file_is_one_error_line_from_train(tiny_set, tmp_path):
    labels_path, images = tiny_set
    names = [line.split()[0] for line in open(labels_path)]
    rows = "".join(f"{n} " + " ".join("-1" if (i + k) % 3 else "1" for k in range(8)) + "\n"
                   for i, n in enumerate(names))
    celeba = write(tmp_path, "list_attr.txt", f"{len(names)}\n" + " ".join(f"A{k}" for k in range(8)) + "\n" + rows)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *FAST, "--labels", celeba, "--images",
                           images, "--epochs", "1", "--image-size", "32", "--values", "01",
                           "--out", str(tmp_path / "m.pth"), "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    bad = sum(1 for i in range(len(names)) for k in range(8) if (i + k) % 3)
    assert line == (f"error: {celeba}: read as table (count line, header) with values 1, 0 or NA (--values 01), "
                    f"{bad} of {8 * len(names)} value cells ({bad / (8 * len(names)):.0%}) cannot be read, the first "
                    f"on line 3: A1 '-1'; --values pm1 reads them")
    assert not os.path.exists(tmp_path / "m.pth")


def test_train_reads_a_csv_with_its_flags_and_writes_val_labels_that_read_back(tiny_set, tmp_path):
    """A CSV whose attribute names have spaces and commas: train.py reads it (the flags are plain values in the
    checkpoint's config), and val_labels.txt, which the table format cannot hold, is a csv that reads back."""
    labels_path, images = tiny_set
    given = parse_labels(labels_path, Report(stream=io.StringIO(), info_stream=io.StringIO()))
    names = ["long sleeves", "dark, colour", "patterned", "logo"]
    text = "file," + ",".join(f'"{n}"' if "," in n else n for n in names) + "\n" + "".join(
        n + "," + ",".join("" if v < 0 else str(v) for v in row) + "\n"
        for n, row in zip(given.names, given.targets.tolist()))
    path = write(tmp_path, "attrs.csv", text)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *FAST, "--labels", path, "--images",
                           images, "--epochs", "1", "--image-size", "32", "--label-format", "csv",
                           "--out", str(tmp_path / "m.pth"), "--curve", str(tmp_path / "c.png"),
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == ("labels: attrs.csv read as csv (image column file), 24 rows x 4 "
                                           "attributes, values 1/0, " f"{int((given.targets < 0).sum())} NA")
    import torch
    ckpt = torch.load(tmp_path / "m.pth", weights_only=True)
    assert ckpt["attributes"] == names and ckpt["config"]["label_format"] == "csv"
    val = parse_labels(str(tmp_path / "val_labels.txt"), Report(stream=io.StringIO(), info_stream=io.StringIO()))
    assert val.format.kind == "csv" and val.attributes == names and len(val.names) == 5
    row = {n: r for n, r in zip(given.names, given.targets.tolist())}
    assert val.targets.tolist() == [row[n] for n in val.names]


# ---- written back as read ----

def files(tmp_path):
    """One file of each format and convention, and the options that read it."""
    made = {
        "table": ("labels.txt", "image_name a b\nx.jpg 1 NA\ny.jpg 0 1\n", {}),
        "celeba": ("list_attr_celeba.txt", CELEBA, {}),
        "voc": ("aeroplane.txt", "a 1\nb -1\nc 0\nd -1\ne -1\n", {}),
        "csv": ("attrs.csv", 'id,"B, b",a\nx.jpg,,1\n"y z.jpg",0,NA\n', {}),
        "tsv": ("attrs.tsv", "a\timage\nNA\tx.jpg\n1\ty.jpg\n", {"image_column": "image"}),
        "bool": ("b.csv", "name,A\na,True\nb,False\nc,\n", {}),
        "tags": ("train_v2.csv", "image_name,tags\ntrain_0,haze primary\ntrain_1,\n", {}),
        "tags-lines": ("tags.txt", "a.jpg cat dog\nb.jpg\n", {"format": "tags"}),
        "long": ("human.csv", OPEN_IMAGES, {}),
        "long-listed": ("pairs.csv", "image,attribute\na,cat\na,dog\nb,cat\n", {}),
        "long-confidence": ("conf.csv", "image,label,confidence\na,cat,0.9\na,dog,0.2\nb,cat,0.7\n", {}),
    }
    return {kind: (write(tmp_path, name, text), options) for kind, (name, text, options) in made.items()}


@pytest.mark.parametrize("kind", ["table", "celeba", "voc", "csv", "tsv", "bool", "tags", "tags-lines", "long",
                                  "long-listed", "long-confidence"])
def test_every_writer_writes_the_format_it_read_and_reads_back_the_same_table(tmp_path, kind):
    path, options = files(tmp_path)[kind]
    table = read(path, **options)[0]
    out = str(tmp_path / ("out" + os.path.splitext(path)[1]))
    write_labels(out, table.attributes, table.names, table.targets, comment="# written", fmt=table.format)
    back = read(out, **options)[0]
    same(back, table)
    assert back.format.kind == table.format.kind and back.format.values in (table.format.values, "01")
    # rewrite_labels (review.py's export) with one cell changed (a 0 set to 1, else an NA to 0), comments first.
    targets = table.targets.copy()
    zeros, unknown = np.argwhere(targets == 0), np.argwhere(targets == NA)
    i, k = zeros[0] if len(zeros) else unknown[0]
    targets[i, k] = 1 if len(zeros) else 0
    text = rewrite_labels(path, table, targets, comments=["# reviewed"])
    assert text.startswith(b"# reviewed")
    edited = write(tmp_path, "edited" + os.path.splitext(path)[1], text)
    again = read(edited, **options)[0]
    assert again.attributes == table.attributes and list(again.names) == list(table.names)
    assert again.targets.tolist() == targets.tolist()


def test_written_files_keep_the_input_spelling_and_columns(tmp_path):
    made = files(tmp_path)
    for kind, expected in [
        ("celeba", "3\n5_o_Clock_Shadow Arched_Eyebrows Smiling\n000001.jpg -1 1 1\n000002.jpg -1 -1 1\n"
                   "000003.jpg 1 -1 -1\n"),
        ("voc", "image_name Attr1\na 1\nb -1\nc 0\nd -1\ne -1\n"),
        ("csv", 'id,"B, b",a\nx.jpg,,1\ny z.jpg,0,\n'),
        ("tsv", "a\timage\nNA\tx.jpg\n1\ty.jpg\n"),  # NA as the file spelled it
        ("bool", "name,A\na,True\nb,False\nc,\n"),
        ("tags", "image_name,tags\ntrain_0,haze primary\ntrain_1,\n"),
        ("long", "ImageID,LabelName,Confidence\nimg1,/m/01,1\nimg1,/m/02,0\nimg2,,\nimg3,/m/03,1\n"),
        ("long-listed", "image,attribute\na,cat\na,dog\nb,cat\n"),
    ]:
        path, options = made[kind]
        table = read(path, **options)[0]
        out = str(tmp_path / ("w_" + os.path.basename(path)))
        write_labels(out, table.attributes, table.names, table.targets, fmt=table.format)
        assert open(out, encoding="utf-8").read() == expected, kind


def test_a_table_rewrite_keeps_every_other_byte_in_its_convention(tmp_path):
    path, _ = files(tmp_path)["celeba"]
    table = read(path)[0]
    targets = table.targets.copy()
    targets[1, 2] = 0  # 000002.jpg Smiling: 1 -> 0, written as CelebA writes 0
    changed = CELEBA.replace("000002.jpg -1 -1  1", "000002.jpg -1 -1  -1").encode()
    assert rewrite_labels(path, table, targets) == changed
    only = read(path, attributes=("Smiling",))[0]  # read in part: the other columns stay as they are
    assert rewrite_labels(path, only, targets[:, 2:]) == changed


def test_tags_cannot_hold_na_and_long_files_leave_na_pairs_out(tmp_path):
    made = files(tmp_path)
    table = read(made["tags"][0])[0]
    targets = table.targets.copy()
    targets[0, 0] = NA
    with pytest.raises(UserError, match="a tag list cannot say that a tag is unknown"):
        rewrite_labels(made["tags"][0], table, targets)
    table = read(made["long-listed"][0])[0]
    targets = table.targets.copy()
    targets[0, 1] = NA
    targets[1, 1] = 0
    written = rewrite_labels(made["long-listed"][0], table, targets)
    assert written == b"image,attribute,value\na,cat,1\nb,cat,1\nb,dog,0\n"


def test_without_a_format_the_writer_is_the_table_or_a_csv_where_names_need_it(tmp_path):
    plain = str(tmp_path / "plain.txt")
    write_labels(plain, ["a", "b"], ["x.jpg", "y.jpg"], np.array([[1, NA], [0, 1]], dtype=np.int8))
    assert open(plain).read() == "image_name a b\nx.jpg 1 NA\ny.jpg 0 1\n"
    spaced = str(tmp_path / "val_labels.txt")
    write_labels(spaced, ["long sleeves", "1"], ["x y.jpg"], np.array([[1, NA]], dtype=np.int8))
    assert open(spaced).read() == "image_name,long sleeves,1\nx y.jpg,1,\n"
    back = read(spaced)[0]
    assert back.attributes == ["long sleeves", "1"] and back.names == ["x y.jpg"] and back.targets.tolist() == [[1, NA]]


def test_parquet_round_trip(tmp_path):
    pytest.importorskip("pyarrow")
    import pandas as pd

    path = str(tmp_path / "attrs.parquet")
    pd.DataFrame({"image_id": ["a.jpg", "b.jpg"], "Smiling": [1, -1], "Bald": [-1, -1]}).to_parquet(path)
    table, said, _, _ = read(path)
    assert "read as parquet" in said and table.targets.tolist() == [[1, 0], [0, 0]]
    out = str(tmp_path / "out.parquet")
    write_labels(out, table.attributes, table.names, table.targets, fmt=table.format)
    same(read(out)[0], table)


# ---- the flags ----

def test_label_flags_are_plain_values_and_pass_on_to_train():
    import argparse

    p = labels.add_label_flags(argparse.ArgumentParser())
    args = p.parse_args(["--label-format", "long", "--value-column", "none", "--attributes", "a, b", "--values",
                         "pm1", "--label-delimiter", "|"])
    assert all(isinstance(v, str) or v is None for v in vars(args).values())  # the checkpoint's config keeps them
    options = labels.label_options(args)
    assert options == LabelOptions(format="long", value_column="none", attributes=("a", "b"), values="pm1",
                                   delimiter="|")
    assert labels.label_options(p.parse_args(labels.label_argv(options))) == options
    assert labels.label_argv(labels.label_options(p.parse_args([]))) == []
    assert labels.label_options(vars(args)) == options  # a checkpoint's config dict


def test_audit_writes_its_suggestions_in_the_format_of_the_labels(tmp_path):
    import audit

    path, _ = files(tmp_path)["csv"]
    table = read(path)[0]
    data = audit.AuditData(labels=path, attributes=table.attributes, names=list(table.names), paths=[],
                           targets=table.targets, probabilities=np.array([[0.95, 0.5], [0.5, 0.02]]),
                           score=np.zeros((2, 2)), source="", model=None, labels_sha256="",
                           verdicts=[{"attribute": a, "learnt": True, "p_adjusted": 0.0} for a in table.attributes])
    out = str(tmp_path / "labels_suggested.txt")
    assert audit.write_suggested(out, data, confident=0.9, source=path) == 2
    text = open(out).read().splitlines()
    assert text[0].startswith("# attrs.csv with 2 NA cells filled") and text[1:] == ['id,"B, b",a', "x.jpg,1,1",
                                                                                     "y z.jpg,0,0"]
    assert read(out)[0].targets.tolist() == [[1, 1], [0, 0]]


def test_review_export_of_a_csv_stays_a_csv(tmp_path):
    import review

    path, _ = files(tmp_path)["csv"]
    ledger = review.Ledger(str(tmp_path / "review.sqlite"))
    ledger.decide("x.jpg", "B, b", "1", "ana", given="NA")
    text, what = review.reviewed_labels(path, ledger)
    ledger.close()
    assert what["counts"] == {"changed": 0, "na_filled": 1, "kept": 0}
    assert text.decode().splitlines()[1:] == ['id,"B, b",a', "x.jpg,1,1", "y z.jpg,0,"]

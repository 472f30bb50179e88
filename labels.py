"""Labels files as data sets ship them: which format a file is, the pandas readers of the delimited ones, the value
conventions, the warnings of a read, and the writers of each format (beside its reader).

    table  image_name v1 .. vK, whitespace-separated (dataset.py's streaming parser); an optional header, and
           CelebA's count line before it (`202599`, then the 40 names, then `000001.jpg -1  1 ...`)
    csv    a header, a column of image names, every other column an attribute (or those --attributes names);
           .csv, .tsv, .parquet (pyarrow), or a .txt whose every line has a comma
    tags   an image column and a column of delimited tags (Planet's train_v2.csv, fastai's label_delim): every tag
           seen is an attribute, a tag not listed for an image is 0, an empty list is all 0
    long   one row per (image, attribute[, value]) (Open Images' human-verified labels): a pair not listed is NA

Values, one convention for a whole file: 1/0/NA, 1/-1 (CelebA), 1/-1/0 with 0 unknown (PASCAL VOC), true/false,
yes/no; an empty cell is NA. Nothing here imports pandas until a delimited file is read.
"""
import csv
import io
import os
import re
import warnings
from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np

from utils import UserError, size_text

NA = -1
FORMATS = ("auto", "table", "csv", "tags", "long")
DELIMITED = (".csv", ".tsv", ".tab", ".parquet", ".pq")

# ---- values: a cell's raw code, then one mapping for the whole file ----
# Raw codes (int8) say which word a cell holds; the mapping chosen for the file turns them into 1 / 0 / NA.
ONE, ZERO, EMPTY, MINUS, TRUE, FALSE, YES, NO, BAD = 1, 0, -1, 2, 3, 4, 5, 6, -2
WORDS = {"1": ONE, "1.0": ONE, "0": ZERO, "0.0": ZERO, "na": EMPTY, "": EMPTY, "-1": MINUS, "-1.0": MINUS,
         "true": TRUE, "false": FALSE, "yes": YES, "no": NO}
MAPPINGS = {  # name: (raw code -> target; any other code is a bad cell), what the labels line says, what it reads
    "01": ({ONE: 1, ZERO: 0, EMPTY: NA}, "1/0", "1, 0 or NA"),
    "pm1": ({ONE: 1, MINUS: 0, EMPTY: NA}, "1/-1 -> 1/0", "1, -1 or NA"),
    "voc": ({ONE: 1, MINUS: 0, ZERO: NA, EMPTY: NA}, "1/-1/0 -> 1/0/NA", "1, -1 or 0"),
    "bool": ({TRUE: 1, FALSE: 0, EMPTY: NA}, "true/false -> 1/0", "true, false or NA"),
    "yesno": ({YES: 1, NO: 0, EMPTY: NA}, "yes/no -> 1/0", "yes, no or NA"),
}
VALUES = ("auto", *MAPPINGS)
SPELLING = {"01": ("1", "0", "NA"), "pm1": ("1", "-1", "NA"), "voc": ("1", "-1", "0"), "bool": ("true", "false", "NA"),
            "yesno": ("yes", "no", "NA")}  # 1, 0, NA as each convention writes them
MANY = 50  # up to this many warnings are said one by one; more are one line per (kind, attribute)
MOSTLY_BAD = 0.05  # a file with more bad value cells than this share (and more than MANY) is an error
SAMPLE_ROWS = 2000  # rows read to tell csv, tags and long apart
CHUNK_ROWS = 100_000  # rows of a wide csv parsed at a time

IMAGE_NAMES = ("image", "image_name", "image_id", "imageid", "img", "image_path", "filename", "file_name", "file",
               "fname", "name", "path", "id")
LABEL_NAMES = ("labelname", "label", "labels", "tags", "tag", "attribute", "attributes", "class", "classes",
               "category", "categories", "label_name")
VALUE_NAMES = ("confidence", "value", "present", "score", "target", "label_value")


def raw_code(text):
    return WORDS.get(text.strip().lower(), BAD)


def choose_values(counts, forced="auto"):
    """The mapping for a file from {raw code: cells}: the one under which the fewest cells are bad (ties: 1/0 first);
    1/-1 with zeros present is VOC's 1/-1/0. Only where -1 outnumbers 0: a 1/0 file with a few stray -1s stays 1/0
    (its -1s are warned about) instead of turning all its 0s into NA."""
    if forced != "auto":
        return forced

    def bad(name):
        return sum(n for code, n in counts.items() if code not in MAPPINGS[name][0])

    name = min(("01", "pm1", "bool", "yesno"), key=bad)
    return "voc" if name == "pm1" and counts.get(ZERO) else name


def lookup(values):
    """uint8 view of a raw code -> its target under the mapping (bad cells NA)."""
    lut = np.full(256, NA, dtype=np.int8)
    for code, target in MAPPINGS[values][0].items():
        lut[code & 0xFF] = target
    return lut


def raw_counts(raw):
    """{raw code: cells} of an int8 array of raw codes, in blocks (a bincount of the whole casts it to intp)."""
    counts = np.zeros(256, dtype=np.int64)
    flat = raw.reshape(-1)
    for start in range(0, len(flat), 1 << 24):
        counts += np.bincount(flat[start:start + (1 << 24)].view(np.uint8), minlength=256)
    return {int(np.int8(np.uint8(c))): int(n) for c, n in enumerate(counts) if n}


def apply_values(raw, values, counts):
    """raw codes -> targets, in place, in blocks of rows (nothing to do for the seed's 1 / 0 / NA)."""
    if values == "01" and set(counts) <= {ONE, ZERO, EMPTY}:
        return raw
    lut = lookup(values)
    for start in range(0, len(raw), 65536):
        block = raw[start:start + 65536]
        block[...] = lut[block.view(np.uint8)]
    return raw


def count_na(targets):
    return sum(int(np.count_nonzero(targets[s:s + 65536] == NA)) for s in range(0, len(targets), 65536))


# ---- what a user asks for, and what was found ----

@dataclass(frozen=True)
class LabelOptions:
    """What the label flags ask for (label_options); the defaults detect everything."""
    format: str = "auto"
    image_column: str = None
    label_column: str = None
    value_column: str = None  # "none": a long file without one (every listed pair is 1)
    delimiter: str = None  # between the tags of a tags cell; None: whitespace, or what the file shows
    attributes: tuple = None
    values: str = "auto"


@dataclass(frozen=True)
class LabelFormat:
    """How a labels file was written, so that what is written back is that format: the writers read it."""
    kind: str = "table"  # table | csv | tags | long
    values: str = "01"  # a MAPPINGS name; tags: "tags"; long: also "confidence" or "listed"
    texts: tuple = ("1", "0", "NA")  # how 1, 0 and NA are written
    count_line: bool = False  # table: CelebA's line with the number of rows before the header
    header: str = "full"  # full (image column + names) | attributes (table: names only) | none
    separator: str = ","  # csv, tags, long: the column separator
    columns: tuple = ()  # csv, tags, long: the header as read, in order; table: every attribute of the file
    image_column: str = None
    label_column: str = None  # tags: the column of tag lists; long: the attribute column
    value_column: str = None  # long
    delimiter: str = None  # tags: None = whitespace (written as a space)
    parquet: bool = False
    whitespace: bool = False  # tags: `image tag tag ...` lines, no columns

    def describe(self):
        if self.kind == "table":
            parts = [p for p, on in (("count line", self.count_line), ("header", self.header != "none")) if on]
            return "table" + (f" ({', '.join(parts)})" if parts else "")
        what = "parquet" if self.parquet else {",": "csv", "\t": "tsv"}.get(self.separator,
                                                                          f"{self.separator!r}-separated")
        if self.kind == "csv":
            return f"{what} ({'no header, ' if self.header == 'none' else ''}image column {self.image_column})"
        if self.kind == "tags":
            split = "whitespace" if self.delimiter is None else repr(self.delimiter)
            where = "lines of an image and its tags" if self.whitespace else f"{what}, tags in {self.label_column}"
            return f"tags ({where}, split on {split})"
        value = f", values in {self.value_column}" if self.value_column else ""
        return f"long ({what}, images in {self.image_column}, attributes in {self.label_column}{value})"


def describe_values(fmt):
    if fmt.kind == "tags":
        return "a listed tag 1, an unlisted one 0"
    if fmt.kind == "long":
        head = {"listed": "every listed pair 1", "confidence": f"{fmt.value_column} >= 0.5 -> 1 (else 0)"}.get(
            fmt.values) or MAPPINGS[fmt.values][1]
        return f"{head}, pairs not listed NA"
    return MAPPINGS[fmt.values][1]


def add_label_flags(parser):
    """The flags of every script that reads a labels file (label_options turns them into LabelOptions)."""
    g = parser.add_argument_group("labels file format (detected; these force it)")
    g.add_argument("--label-format", default="auto", choices=FORMATS,
                   help="table: image v1 .. vK (whitespace); csv: a column per attribute; tags: a column of tag "
                        "lists; long: a row per (image, attribute[, value])")
    g.add_argument("--image-column", help="csv, tags, long: the column of image names (unset: image, image_name, "
                                          "ImageID, filename, ... else the first)")
    g.add_argument("--label-column", help="tags: the column of tag lists; long: the column of attribute names")
    g.add_argument("--value-column", help="long: the column of 1/0 values or confidences (unset: Confidence, "
                                          "value, ...; none: every listed pair is 1)")
    g.add_argument("--label-delimiter", help="tags: what separates the tags of a cell (unset: what the file "
                                             "shows: | ; or , else whitespace)")
    g.add_argument("--attributes", help="a,b,c: read these attributes only, in this order")
    g.add_argument("--values", default="auto", choices=VALUES,
                   help="01: 1/0/NA; pm1: 1/-1 (CelebA); voc: 1/-1/0, 0 unknown (PASCAL VOC); bool: true/false; "
                        "yesno: yes/no; auto: the one that reads the most cells")
    return parser


def label_options(args):
    """LabelOptions of a namespace that add_label_flags filled (or of a checkpoint's config dict)."""
    get = args.get if isinstance(args, dict) else lambda key, default=None: getattr(args, key, default)
    names = get("attributes")
    attributes = tuple(a.strip() for a in names.split(",") if a.strip()) if names else None
    if names is not None and not attributes:
        raise UserError(f"--attributes {names!r}: give attribute names separated by commas")
    return LabelOptions(format=get("label_format") or "auto", image_column=get("image_column"),
                        label_column=get("label_column"), value_column=get("value_column"),
                        delimiter=get("label_delimiter"), attributes=attributes, values=get("values") or "auto")


def label_argv(options):
    """The flags that give train.py these options (audit.py and review.py pass them on)."""
    flags = [("--label-format", options.format if options.format != "auto" else None),
             ("--image-column", options.image_column), ("--label-column", options.label_column),
             ("--value-column", options.value_column), ("--label-delimiter", options.delimiter),
             ("--attributes", ",".join(options.attributes) if options.attributes else None),
             ("--values", options.values if options.values != "auto" else None)]
    return [f"{flag}={value}" for flag, value in flags if value is not None]


# ---- the warnings of one read ----

class Problems:
    """A file's warnings, said once it is read (after the line of what was read): one by one while there are at
    most MANY, else one line per (kind, attribute) with the count and the first. The Report counts every one."""

    def __init__(self, path):
        self.path = path
        self.listed = []  # (order, line, column, kind, message), kept while there are at most MANY + 1
        self.groups = {}  # (kind, attribute) -> [count, line, message]
        self.total = 0

    def add(self, kind, line, message, *, attribute=None, column=-1, count=1, first=False):
        """first: said before the rest (lines that are not UTF-8 come before each line's own warnings)."""
        self.total += count
        if count == 1 and len(self.listed) <= MANY:
            self.listed.append((0 if first else 1, line, column, kind, message))
        group = self.groups.setdefault((kind, attribute), [0, line, message])
        group[0] += count
        if line < group[1]:
            group[1:] = [line, message]

    def emit(self, report):
        if self.total <= MANY and len(self.listed) == self.total:
            for _, line, _, kind, message in sorted(self.listed, key=lambda p: p[:3]):
                report.warn(kind, f"{self.path}:{line}: {message}")
            return
        for (kind, attribute), (count, line, message) in sorted(self.groups.items(), key=lambda g: g[1][1]):
            where = f" ({attribute})" if attribute else ""
            report.warn(kind, f"{self.path}: {count:,} x {kind}{where}, the first on line {line}: {message}",
                        count=count)


class BadCells:
    """Where the unreadable cells of a read are, with their text: the first of each attribute, and the first
    MANY + 1 of the file (for warnings one by one)."""

    def __init__(self):
        self.first = {}  # column -> (row, text)
        self.cells = []  # (row, column, text)

    def add(self, row, column, text):
        if column not in self.first:
            self.first[column] = (row, text)
        if len(self.cells) <= MANY:
            self.cells.append((row, column, text))

    def add_column(self, rows, column, texts):
        """rows (array) of a column whose cells are unreadable, with their texts (array)."""
        if not len(rows):
            return
        if column not in self.first:
            self.first[column] = (int(rows[0]), str(texts[0]))
        room = MANY + 1 - len(self.cells)
        self.cells += [(int(r), column, str(t)) for r, t in zip(rows[:room], texts[:room])]


def settle(path, raw, lines, attributes, fmt, options, problems, bad, spelled):
    """The file's mapping (forced or chosen), raw codes -> targets in place, warnings for the cells it cannot read,
    and one error if they are more than a few percent. Returns (targets, fmt with values and texts, NA cells)."""
    counts = raw_counts(raw)
    values = choose_values(counts, options.values)
    known = MAPPINGS[values][0]
    cells = raw.size
    bad_codes = [c for c in counts if c not in known]
    per_column = {c: _column_counts(raw, c) for c in bad_codes}
    n_bad = sum(int(v.sum()) for v in per_column.values())
    if n_bad > MANY and n_bad > MOSTLY_BAD * cells:
        first = min(_firsts(raw, per_column, bad, spelled), key=lambda f: (f[0], f[1]))
        row, column, text = first
        auto = choose_values(counts)
        hint = f"--values {auto} reads them" if auto != values else format_hint(fmt, text)
        forced = f" (--values {values})" if options.values != "auto" else ""
        raise UserError(f"{path}: read as {fmt.describe()} with values {MAPPINGS[values][2]}{forced}, "
                        f"{n_bad:,} of {cells:,} value cells ({n_bad / cells:.0%}) cannot be read, the first on line "
                        f"{lines[row]}: {attributes[column]} {text!r}; {hint}")
    what = MAPPINGS[values][2]
    if n_bad and problems.total + n_bad <= MANY:  # few: each cell (the text of BAD ones is in `bad`)
        texts = {(r, k): t for r, k, t in bad.cells}
        for c, in_column in per_column.items():
            for column in np.flatnonzero(in_column).tolist():
                for row in np.flatnonzero(raw[:, column] == c).tolist():
                    text = texts[row, column] if c == BAD else spelled.get(c, "")
                    problems.add("bad value", int(lines[row]), f"{attributes[column]} value {text!r} is not {what}; "
                                                               f"treated as NA", attribute=attributes[column],
                                 column=column)
    elif n_bad:
        for row, column, text in sorted(_firsts(raw, per_column, bad, spelled), key=lambda f: f[1]):
            n = int(sum(v[column] for v in per_column.values()))
            problems.add("bad value", int(lines[row]), f"{attributes[column]} value {text!r} is not {what}; treated "
                                                       f"as NA", attribute=attributes[column], count=n)
    na = sum(n for c, n in counts.items() if known.get(c, NA) == NA)
    apply_values(raw, values, counts)
    one, zero, missing = SPELLING[values]
    if values in ("bool", "yesno"):  # as the file spells them (True, YES, ...)
        yes, no = (TRUE, FALSE) if values == "bool" else (YES, NO)
        one, zero = spelled.get(yes, one), spelled.get(no, zero)
    if fmt.kind != "table" and values != "voc":
        missing = spelled.get(EMPTY, "")
    return raw, replace(fmt, values=values, texts=(one, zero, missing)), na


def _column_counts(raw, code):
    counts = np.zeros(raw.shape[1], dtype=np.int64)
    for start in range(0, len(raw), 65536):
        counts += (raw[start:start + 65536] == code).sum(0)
    return counts


def _firsts(raw, per_column, bad, spelled):
    """(row, column, text) of the first bad cell of each attribute that has one."""
    found = {}
    for code, counts in per_column.items():
        for column in np.flatnonzero(counts).tolist():
            if code == BAD and column in bad.first:
                row, text = bad.first[column]
            else:
                row, text = int(np.argmax(raw[:, column] == code)), spelled.get(code, "")
            if column not in found or row < found[column][0]:
                found[column] = (row, column, text)
    return list(found.values())


def select(path, parts, attributes):
    """A table file's rows with only the columns --attributes names, in its order (before the values settle, so
    the columns left out are not looked at)."""
    missing = [a for a in attributes if a not in parts.attributes]
    if missing:
        raise UserError(f"--attributes: {', '.join(missing)} not among the attributes of {path} "
                        f"({', '.join(parts.attributes)})")
    index = [parts.attributes.index(a) for a in attributes]
    new = {old: j for j, old in enumerate(index)}
    parts.raw = np.ascontiguousarray(parts.raw[:, index])
    parts.bad.first = {new[k]: v for k, v in parts.bad.first.items() if k in new}
    parts.bad.cells = [(r, new[k], t) for r, k, t in parts.bad.cells if k in new]
    parts.attributes = list(attributes)
    return parts


def format_hint(fmt, text):
    if fmt.kind == "table":
        if "," in text:
            return "the lines look comma-separated: --label-format csv reads them"
        return "if each line is an image and its tags, --label-format tags reads it"
    if fmt.kind == "csv":
        return ("name the attribute columns with --attributes a,b,c, or give --label-format tags (a column of tag "
                "lists) or --label-format long (a row per image and attribute)")
    return "name the column of values with --value-column (none: every listed pair is 1)"


# ---- which format a file is ----

def sniff(path, head, complete, options):
    """(the LabelFormat a file will be read as, values still to settle; what read() needs of it), from its
    extension, its first 64 KiB (head: text; complete: that is the whole file) and the options. Delimited files are
    sampled through pandas to tell csv, tags and long apart."""
    ext = os.path.splitext(path)[1].lower()
    forced = options.format
    if ext in (".parquet", ".pq"):
        frame = read_parquet(path)
        sample = frame.head(SAMPLE_ROWS).astype(object)
        sample = sample.where(sample.notna(), "").astype(str)
        return _columns_format(path, list(frame.columns), sample, options, parquet=True), frame
    lines = [line.rstrip("\r") for line in head.split("\n")]
    lines = lines if complete else lines[:-1]  # the last may be cut
    content = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if forced == "table" or (forced == "auto" and ext not in DELIMITED
                             and not (len(content) >= 2 and all("," in line for line in content[:20]))):
        return LabelFormat(kind="table"), None
    separator = "\t" if ext in (".tsv", ".tab") else _separator(content[0] if content else "")
    if forced == "tags" and ext not in DELIMITED and not any(separator in line for line in content[:20]):
        return LabelFormat(kind="tags", whitespace=True, delimiter=options.delimiter), None
    skip = 0
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            break
        skip += 1
    if not content:
        raise UserError(f"{path}: no labels in the file (expected a header line and a row per image)")
    header = [h.strip() for h in next(csv.reader([content[0]], delimiter=separator))]
    named = not (len(header) > 1 and all(raw_code(h) != BAD for h in header[1:]))  # else the first row is values
    if not named:
        header = ["image", *(f"Attr{i + 1}" for i in range(len(header) - 1))]
    if len(set(header)) != len(header):
        raise UserError(f"{path}:{skip + 1}: the header repeats a column name; make the names unique")
    sample = _read_delimited(path, separator=separator, skip=skip, nrows=SAMPLE_ROWS, dtype=object, names=header,
                             named=named)
    fmt = _columns_format(path, header, sample, options)
    return replace(fmt, separator=separator, header="full" if named else "none"), \
        SimpleNamespace(skip=skip, named=named)


def _separator(line):
    counts = {s: len(re.sub(r'"[^"]*"', "", line).split(s)) - 1 for s in (",", "\t", ";", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _find(columns, given, known, flag):
    if given is not None:
        if given not in columns:
            raise UserError(f"{flag} {given}: no such column (the columns: {', '.join(columns)})")
        return given
    lower = {c.lower(): c for c in columns}
    return next((lower[n] for n in known if n in lower), None)


def _columns_format(path, columns, sample, options, parquet=False):
    """csv, tags or long from the header and a sample of rows (str cells)."""
    if len(columns) < 2:
        raise UserError(f"{path}: one column only ({', '.join(columns)}); a labels file needs image names and "
                        "labels")
    image = _find(columns, options.image_column, IMAGE_NAMES, "--image-column") or columns[0]
    others = [c for c in columns if c != image]
    cells = {c: sample[c].fillna("").astype(str).tolist() for c in others}
    filled = {c: [v for v in cells[c] if v.strip()] for c in others}  # an empty cell says nothing of its column
    value_like = {c: sum(raw_code(v) != BAD for v in filled[c]) >= 0.5 * len(filled[c]) for c in others}
    kind = options.format
    label = _find(columns, options.label_column, LABEL_NAMES, "--label-column")
    if options.value_column == "none":
        value = None
    else:
        value = _find(columns, options.value_column, VALUE_NAMES, "--value-column")
    textual = [c for c in others if not value_like[c]]
    if kind == "auto":
        # csv: several columns of values, or no column of words; long: an image on several rows, or a column of
        # values beside the attribute names; tags: one column of words. Else a csv whose cells are not values (an
        # error that says so, with the flags that read the other formats).
        names = sample[image].fillna("").astype(str)
        names = names[names != ""]
        if options.label_column is None and (sum(value_like.values()) >= 2 or not textual or options.attributes):
            kind = "csv"
        elif names.duplicated().any() or (value not in (None, label, image) and len(textual) >= 1):
            kind = "long"
        elif len(textual) == 1 or options.label_column is not None:
            kind = "tags"
        else:
            kind = "csv"
    if kind in ("tags", "long"):
        label = label if label not in (None, image) else (textual[0] if textual else None)
        if label is None:
            raise UserError(f"{path}: read as {kind}, but no column holds attribute names; name it with "
                            "--label-column")
    if kind == "csv":
        return LabelFormat(kind="csv", columns=tuple(columns), image_column=image, parquet=parquet)
    if kind == "tags":
        return LabelFormat(kind="tags", columns=tuple(columns), image_column=image, label_column=label,
                           delimiter=options.delimiter or _tag_delimiter(cells.get(label, [])), parquet=parquet)
    if value == label or value == image:
        value = None
    return LabelFormat(kind="long", columns=tuple(columns), image_column=image, label_column=label,
                       value_column=value, parquet=parquet)


def _tag_delimiter(cells):
    for delimiter in ("|", ";", ","):
        if any(delimiter in c for c in cells):
            return delimiter
    return None


# ---- pandas ----

def pandas():
    import pandas as pd  # here, not at the top: the table format (and inference) never pays for the import
    return pd


def read_parquet(path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow), or save the file as .csv") \
            from None
    try:
        frame = pandas().read_parquet(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it as parquet ({str(e).splitlines()[0][:120]})") from None
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _read_delimited(path, *, separator, skip, dtype, names, named=True, nrows=None, chunksize=None, skipped=None):
    """pandas.read_csv of the rows below the header (named: there is one) as columns `names`, cells as written (no
    NA guessing: "" and "NA" are words here); rows with more fields than the header are skipped and (line, expected,
    found) appended to `skipped`; a row with fewer has "" in the cells it lacks. Every column is read: with usecols
    pandas would drop the extra fields of a row silently (a name with a comma in it would shift its cells)."""
    pd = pandas()
    encoding = _encoding(path)
    kwargs = dict(sep=separator, skiprows=skip, header=0 if named else None, names=names, dtype=dtype,
                  keep_default_na=False, na_filter=False, skip_blank_lines=False, on_bad_lines="warn",
                  encoding=encoding, engine="c", nrows=nrows, chunksize=chunksize)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = pd.read_csv(path, **kwargs)
            if chunksize is None:
                _skipped(caught, skipped)
                return result
        return _chunks(result, skipped, path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    except pd.errors.EmptyDataError:  # a header and no rows
        empty = pd.DataFrame({n: pd.Series([], dtype=object) for n in names})
        return empty if chunksize is None else iter([empty])
    except (pd.errors.ParserError, ValueError) as e:
        raise UserError(f"{path}: cannot read it as {'tab' if separator == chr(9) else repr(separator)}-separated "
                        f"text ({str(e).strip().splitlines()[-1][:160]})") from None


def _chunks(reader, skipped, path):
    pd = pandas()
    try:
        while True:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    chunk = next(reader)
                except StopIteration:
                    return
            _skipped(caught, skipped)
            yield chunk
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    except (pd.errors.ParserError, ValueError) as e:
        raise UserError(f"{path}: cannot read it ({str(e).strip().splitlines()[-1][:160]})") from None


SKIPPING = re.compile(r"Skipping line (\d+): expected (\d+) fields, saw (\d+)")


def _skipped(caught, skipped):
    for w in caught:
        for m in SKIPPING.finditer(str(w.message)):
            if skipped is not None:
                skipped.append((int(m.group(1)), int(m.group(2)), int(m.group(3))))


def _encoding(path):
    with open(path, "rb") as f:
        start = f.read(4)
    if start.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    return "utf-8-sig"


def _row_lines(first_line, rows, skipped):
    """File line of each of `rows` rows that start at first_line, the skipped lines left out."""
    gone = np.array(sorted(s[0] for s in skipped), dtype=np.int64)
    lines = np.arange(first_line, first_line + rows + len(gone), dtype=np.int64)
    return np.setdiff1d(lines, gone, assume_unique=True)[:rows] if len(gone) else lines


def _normalized(names):
    """`a.jpg` and `./a.jpg` are one file (as the table parser says)."""
    return [os.path.normpath(n) if "/" in n or n.startswith(".") else n for n in names]


def _keep_first(path, names, lines, problems):
    """Which rows to keep: not blank, not an image listed before (warned; the first is kept)."""
    seen, keep = {}, np.ones(len(names), dtype=bool)
    for i, (name, same) in enumerate(zip(names, _normalized(names))):
        if not name:
            keep[i] = False
        elif same in seen:
            problems.add("duplicate image", int(lines[i]), f"{name} already listed on line {seen[same]}; the first "
                                                           "is kept")
            keep[i] = False
        else:
            seen[same] = int(lines[i])
    return keep


def _codes(series):
    """(codes, texts) of a column of cells: codes index texts, -1 for a missing cell."""
    pd = pandas()
    if isinstance(series.dtype, pd.CategoricalDtype):
        return series.cat.codes.to_numpy(), [str(c) for c in series.cat.categories]
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    return codes, [str(u) for u in uniques]


def _raw_of(texts, spelled):
    """Raw codes of distinct cell texts (with a last entry for a missing cell), spellings noted."""
    raw = np.array([raw_code(t) for t in texts] + [EMPTY], dtype=np.int8)
    for t, code in zip(texts, raw.tolist()):
        spelled.setdefault(code, t.strip())
    return raw


def read(path, fmt, found, options, problems):
    """Rows of a csv, tags or long file: (attributes, names, raw or targets, lines, fmt, bad, spelled, settled)."""
    if fmt.kind == "tags" and fmt.whitespace:
        return _read_tag_lines(path, fmt, options, problems)
    wanted = _wanted(path, fmt, options)
    if fmt.parquet:
        frames, first_line, skipped = [found[wanted]], 1, []
    else:
        columns = list(fmt.columns)
        skipped = []
        dtype = {c: (object if fmt.kind == "tags" or (c == fmt.image_column and fmt.kind == "csv") else "category")
                 for c in columns}
        frames = _read_delimited(path, separator=fmt.separator, skip=found.skip, dtype=dtype, names=columns,
                                 named=found.named, chunksize=CHUNK_ROWS if fmt.kind == "csv" else None,
                                 skipped=skipped)
        frames = frames if fmt.kind == "csv" else [frames]
        first_line = found.skip + 1 + found.named
    reader = {"csv": _read_wide, "tags": _read_tags, "long": _read_long}[fmt.kind]
    return reader(path, fmt, options, problems, frames, first_line, skipped)


def _wanted(path, fmt, options):
    columns = list(fmt.columns)
    if fmt.kind == "csv":
        attributes = list(options.attributes) if options.attributes else [c for c in columns if c != fmt.image_column]
        missing = [a for a in attributes if a not in columns]
        if missing:
            raise UserError(f"--attributes: {', '.join(missing)} not among the columns of {path} "
                            f"({', '.join(columns)})")
        return [fmt.image_column] + [a for a in attributes if a != fmt.image_column]
    return [c for c in (fmt.image_column, fmt.label_column, fmt.value_column) if c]


def _skipped_problems(skipped, problems):
    for line, expected, saw in skipped:
        problems.add("wrong field count", line, f"expected {expected} fields, found {saw}; line skipped")


def _read_wide(path, fmt, options, problems, frames, first_line, skipped):
    attributes = list(options.attributes) if options.attributes else [c for c in fmt.columns
                                                                       if c != fmt.image_column]
    names, blocks, bad, spelled, rows = [], [], BadCells(), {}, 0
    for chunk in frames:
        block = np.empty((len(chunk), len(attributes)), dtype=np.int8)
        for j, attribute in enumerate(attributes):
            codes, texts = _codes(chunk[attribute])
            raw = _raw_of(texts, spelled)
            block[:, j] = raw[codes]
            if (raw == BAD).any():
                where = np.flatnonzero(block[:, j] == BAD)
                bad.add_column(where + rows, j, np.asarray(texts, dtype=object)[codes[where]])
        names += [str(n).strip() for n in chunk[fmt.image_column].fillna("").tolist()]
        blocks.append(block)
        rows += len(chunk)
    raw = np.concatenate(blocks) if len(blocks) > 1 else blocks[0] if blocks else \
        np.zeros((0, len(attributes)), dtype=np.int8)
    lines = _row_lines(first_line, rows, skipped)
    _skipped_problems(skipped, problems)
    keep = _keep_first(path, names, lines, problems)
    blank = np.array([not n for n in names], dtype=bool)
    for i in np.flatnonzero(blank & (raw != EMPTY).any(1)).tolist():
        problems.add("no image name", int(lines[i]), "no image name; row skipped")
    if not keep.all():
        index = np.flatnonzero(keep)
        old_row = np.full(len(names), -1)
        old_row[index] = np.arange(len(index))
        bad.first = {k: (int(old_row[r]), t) for k, (r, t) in bad.first.items() if old_row[r] >= 0}
        bad.cells = [(int(old_row[r]), k, t) for r, k, t in bad.cells if old_row[r] >= 0]
        raw, lines, names = raw[index], lines[index], [names[i] for i in index.tolist()]
    fmt = replace(fmt, columns=tuple(c for c in fmt.columns if c == fmt.image_column or c in attributes)
                   if options.attributes else fmt.columns)
    return SimpleNamespace(attributes=attributes, names=names, raw=raw, lines=lines, fmt=fmt, bad=bad,
                           spelled=spelled, settled=False)


def _split_tags(text, delimiter):
    if delimiter is None:
        return text.split()
    return [t.strip() for t in text.split(delimiter) if t.strip()]


def _tag_table(path, fmt, options, problems, names, tag_cells, lines):
    keep = _keep_first(path, names, lines, problems)
    names = [n for n, k in zip(names, keep) if k]
    lists = [_split_tags(c, fmt.delimiter) for c, k in zip(tag_cells, keep) if k]
    lines = lines[keep]
    attributes = list(options.attributes) if options.attributes else sorted({t for tags in lists for t in tags})
    if not attributes:
        raise UserError(f"{path}: read as {fmt.describe()}, but no image has a tag; give the tag column with "
                        "--label-column")
    column = {a: k for k, a in enumerate(attributes)}
    rows, cols = [], []
    for i, tags in enumerate(lists):
        for t in tags:
            k = column.get(t)
            if k is not None:
                rows.append(i)
                cols.append(k)
    targets = np.zeros((len(names), len(attributes)), dtype=np.int8)
    targets[rows, cols] = 1
    fmt = replace(fmt, values="tags", texts=("1", "0", ""))
    return SimpleNamespace(attributes=attributes, names=names, raw=targets, lines=lines, fmt=fmt, bad=BadCells(),
                           spelled={}, settled=True, na=0)


def _read_tags(path, fmt, options, problems, frames, first_line, skipped):
    (frame,) = frames
    lines = _row_lines(first_line, len(frame), skipped)
    _skipped_problems(skipped, problems)
    names = [str(n).strip() for n in frame[fmt.image_column].fillna("").astype(str).tolist()]
    tags = [str(t) for t in frame[fmt.label_column].fillna("").astype(str).tolist()]
    return _tag_table(path, fmt, options, problems, names, tags, lines)


def _read_tag_lines(path, fmt, options, problems):
    """`image tag tag ...` lines (tags forced on a whitespace file): no columns, no pandas."""
    try:
        with open(path, encoding=_encoding(path)) as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    names, tags, lines = [], [], []
    for number, line in enumerate(text.split("\n"), start=1):
        fields = line.split(None, 1)
        if not fields or fields[0].startswith("#"):
            continue
        names.append(fields[0])
        tags.append(fields[1] if len(fields) > 1 else "")
        lines.append(number)
    fmt = replace(fmt, image_column="image_name", label_column="tags")
    return _tag_table(path, fmt, options, problems, names, tags, np.array(lines, dtype=np.int64))


def dense_limit():
    """Bytes a dense (N, K) table may take: half the machine's memory (the rest is for training)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _line_of(first_line, rows, skipped):
    """row index (int or array) -> file line, without an array of every row's line unless lines were skipped."""
    if not skipped:
        return lambda row: first_line + row
    lines = _row_lines(first_line, rows, skipped)
    return lambda row: lines[row]


def _read_long(path, fmt, options, problems, frames, first_line, skipped):
    """Open Images' 9M rows take ~25 s and, past the 0.6 GB pandas takes to parse them, little more than the dense
    table: per row only int32 codes, and one int64 (image, attribute, value) key sorted in place."""
    frame = frames.pop()
    rows = len(frame)
    line_of = _line_of(first_line, rows, skipped)
    _skipped_problems(skipped, problems)
    image_codes, image_texts = _codes(frame[fmt.image_column])
    label_codes, label_texts = _codes(frame[fmt.label_column])
    value_codes, value_texts = _codes(frame[fmt.value_column]) if fmt.value_column else (None, None)
    del frame  # the codes are kept, the columns go
    # Images in the order of their first row; `a.jpg` and `./a.jpg` are one. A missing cell (code -1) is "".
    pd = pandas()
    merged, images = pd.factorize(pd.Index([n.strip() for n in _normalized(image_texts)] + [""]))
    image_of = merged.astype(np.int32)[image_codes]
    empty_image = int(images.get_loc(""))
    labels_read = [t.strip() for t in label_texts]
    attributes = list(options.attributes) if options.attributes else sorted({t for t in labels_read if t})
    if not attributes:
        raise UserError(f"{path}: read as {fmt.describe()}, but no row names an attribute (expected rows like "
                        "`img.jpg,cat,1`)")
    column = {a: k for k, a in enumerate(attributes)}
    label_of = np.array([column.get(t, -1) for t in labels_read] + [-1], dtype=np.int32)[label_codes]
    listed = image_of != empty_image
    for i in np.flatnonzero(~listed & (label_of >= 0))[:MANY + 1].tolist():
        problems.add("no image name", int(line_of(i)), "no image name; row skipped")
    values, value, bad_rows, spelled = _long_values(path, fmt, options, problems, value_codes, value_texts,
                                                    counted=listed & (label_of >= 0), line_of=line_of,
                                                    label_of_row=lambda i: labels_read[label_codes[i]])
    n, k = len(images) - 1, len(attributes)
    if n * k > dense_limit():
        raise UserError(f"{path}: {n:,} images x {k:,} attributes would be a dense table of {size_text(n * k)} "
                        f"(int8), more than half of this machine's memory; read fewer attributes "
                        f"(--attributes a,b,c) or split the file")
    first = np.full(len(images), rows, dtype=np.int64)
    np.minimum.at(first, image_of, np.arange(rows, dtype=np.int64 if rows >= 2**31 else np.int32))
    order = np.argsort(first, kind="stable")
    order = order[order != empty_image]
    rank = np.full(len(images), -1, dtype=np.int64)
    rank[order] = np.arange(len(order))
    use = listed & (label_of >= 0) & ~bad_rows
    # One int64 per listed pair: (row * K + column) * 4 + value + 1, sorted in place: equal cells side by side.
    pair = rank[image_of[use]]
    pair *= k
    pair += label_of[use]
    pair *= 4
    pair += value[use] + 1
    pair.sort()
    got = (pair.astype(np.int8) & 3) - 1  # the low bits: the value
    pair >>= 2
    targets = np.full((n, k), NA, dtype=np.int8)
    flat = targets.reshape(-1)
    flat[pair] = got
    differ = (pair[1:] == pair[:-1]) & (got[1:] != got[:-1])
    if differ.any():
        conflicted = np.unique(pair[1:][differ])
        flat[conflicted] = NA
        _disagreements(problems, conflicted, k, attributes, [images[i] for i in order.tolist()], line_of,
                       rows=np.flatnonzero(use), keys=lambda r: rank[image_of[r]] * k + label_of[r], value=value)
    del pair, got
    texts = SPELLING.get(values, ("1", "0", ""))
    fmt = replace(fmt, values=values, texts=(texts[0], texts[1], ""))
    return SimpleNamespace(attributes=attributes, names=[images[i] for i in order.tolist()], raw=targets,
                           lines=np.asarray(line_of(first[order]), dtype=np.int64), fmt=fmt, bad=BadCells(),
                           spelled=spelled, settled=True, na=count_na(targets))


def _long_values(path, fmt, options, problems, codes, texts, *, counted, line_of, label_of_row):
    """(convention, value of each row as int8, rows whose value cannot be read, spellings): one convention for the
    file, or a confidence thresholded at 0.5; with no value column every row is 1."""
    rows = len(counted)
    if codes is None:
        return "listed", np.ones(rows, dtype=np.int8), np.zeros(rows, dtype=bool), {}
    confidence = _confidences(texts)
    if confidence is not None and options.values == "auto":
        table = np.append(np.where(np.isnan(confidence), NA, confidence >= 0.5).astype(np.int8), NA)
        return "confidence", table[codes], np.zeros(rows, dtype=bool), {}
    spelled = {}
    raw = _raw_of(texts, spelled)[codes]
    values = choose_values(raw_counts(raw[counted]), options.values)
    bad = counted & ~np.isin(raw, list(MAPPINGS[values][0]))
    n_bad, what = int(bad.sum()), MAPPINGS[values][2]
    if n_bad:
        def text(i):
            return texts[codes[i]] if codes[i] >= 0 else ""

        i = int(np.argmax(bad))
        if n_bad > MANY and n_bad > MOSTLY_BAD * max(int(counted.sum()), 1):
            raise UserError(f"{path}: read as {fmt.describe()} with values {what}, {n_bad:,} of "
                            f"{int(counted.sum()):,} values cannot be read, the first on line {line_of(i)}: "
                            f"{text(i)!r}; {format_hint(fmt, text(i))}")
        for i in np.flatnonzero(bad)[:MANY + 1 if n_bad <= MANY else 1].tolist():
            problems.add("bad value", int(line_of(i)), f"{label_of_row(i)} value {text(i)!r} is not {what}; row "
                                                       "skipped", count=1 if n_bad <= MANY else n_bad)
    return values, lookup(values)[raw.view(np.uint8)], bad, spelled


def _disagreements(problems, conflicted, k, attributes, names, line_of, *, rows, keys, value):
    """A warning per pair listed with two values (the first row and the first that disagrees with it), or, when
    there are many, one per attribute with the count."""
    column = conflicted % k
    if len(conflicted) <= MANY:
        said, counts = conflicted, np.ones(len(conflicted), dtype=np.int64)
    else:
        per_attribute = np.bincount(column, minlength=k)
        present = np.flatnonzero(per_attribute)
        said = np.array([conflicted[np.argmax(column == a)] for a in present.tolist()], dtype=np.int64)
        counts = per_attribute[present]
    of_row = keys(rows)
    mine = np.isin(of_row, said)
    rows, of_row = rows[mine], of_row[mine]
    for key, count in zip(said.tolist(), counts.tolist()):
        listed = rows[of_row == key]  # in file order
        s = int(listed[0])
        d = int(listed[np.argmax(value[listed] != value[s])])
        problems.add("disagreeing duplicate", int(line_of(d)),
                     f"{names[key // k]} {attributes[key % k]} listed as {int(value[d])} here and as "
                     f"{int(value[s])} on line {int(line_of(s))}; the cell is NA", attribute=attributes[key % k],
                     count=int(count))


def _confidences(texts):
    """The value column as floats when it holds confidences (numbers in [0, 1], not only 0 and 1), else None."""
    try:
        numbers = np.array([float(t) if t.strip() else np.nan for t in texts], dtype=np.float64)
    except ValueError:
        return None
    known = numbers[~np.isnan(numbers)]
    if not len(known) or known.min() < 0 or known.max() > 1 or np.isin(known, (0.0, 1.0)).all():
        return None
    return numbers


# ---- the writers of csv, tags and long, beside their readers ----

def write(out, fmt, attributes, names, targets, comments=(), *, path=""):
    """Rows as fmt's file (csv, tags, long) into the text stream out, read back by read() as the same table: the
    header and column order as read (columns that were not read are not written), tags in attribute order, long
    files without their NA pairs (an image with none is one row with no attribute). path: for messages."""
    targets = np.asarray(targets)
    for comment in comments:
        out.write(comment + "\n")
    rows = csv.writer(out, delimiter=fmt.separator, lineterminator="\n")
    if fmt.kind == "csv":
        image = fmt.image_column
        columns = [c for c in fmt.columns if c == image or c in attributes] or [image]
        columns += [a for a in attributes if a not in columns]
        order = np.array([attributes.index(c) for c in columns if c != image], dtype=np.int64)
        at = columns.index(image)
        if fmt.header != "none":
            rows.writerow(columns)
        cells = np.array([fmt.texts[2], fmt.texts[1], fmt.texts[0]], dtype=object)
        for start in range(0, len(targets), 10_000):
            block = cells[targets[start:start + 10_000][:, order].astype(np.int64) + 1].tolist()
            for name, row in zip(names[start:start + 10_000], block):
                row.insert(at, name)
                rows.writerow(row)
        return
    if fmt.kind == "tags":
        if (targets == NA).any():
            i, k = map(int, np.argwhere(targets == NA)[0])
            raise UserError(f"{path}: a tag list cannot say that a tag is unknown ({names[i]} {attributes[k]} is "
                            "NA); fill the NA cells first")
        joiner = " " if fmt.delimiter is None else fmt.delimiter
        image_first = fmt.whitespace or fmt.columns.index(fmt.image_column) < fmt.columns.index(fmt.label_column)
        if not fmt.whitespace:
            rows.writerow([fmt.image_column, fmt.label_column] if image_first else [fmt.label_column, fmt.image_column])
        for name, tags in zip(names, _listed(targets, attributes, lambda v: v == 1)):
            tags = joiner.join(a for a, _ in tags)
            if fmt.whitespace:
                out.write(f"{name} {tags}".rstrip() + "\n")
            else:
                rows.writerow([name, tags] if image_first else [tags, name])
        return
    value_column = fmt.value_column or ("value" if (targets == 0).any() else None)
    columns = [c for c in fmt.columns if c in (fmt.image_column, fmt.label_column, value_column)]
    columns += [c for c in (fmt.image_column, fmt.label_column, value_column) if c and c not in columns]
    rows.writerow(columns)
    plain = fmt.values in ("confidence", "listed", "tags")
    spelled = {1: "1" if plain else fmt.texts[0], 0: "0" if plain else fmt.texts[1]}
    for name, pairs in zip(names, _listed(targets, attributes, lambda v: v != NA)):
        for a, v in pairs or [("", None)]:  # an image with no known pair: one row that names no attribute
            cell = {fmt.image_column: name, fmt.label_column: a, value_column: "" if v is None else spelled[v]}
            rows.writerow([cell[c] for c in columns])


def _listed(targets, attributes, chosen):
    """Per row, the (attribute, target) pairs where chosen(targets) holds, from one nonzero per block of rows."""
    for start in range(0, len(targets), 10_000):
        block = targets[start:start + 10_000]
        rows, columns = np.nonzero(chosen(block))
        values = block[rows, columns].tolist()
        ends = np.searchsorted(rows, np.arange(1, len(block) + 1)).tolist()
        columns, begin = columns.tolist(), 0
        for end in ends:
            yield [(attributes[c], v) for c, v in zip(columns[begin:end], values[begin:end])]
            begin = end


def write_parquet(path, fmt, attributes, names, targets):
    pd = pandas()
    targets = np.asarray(targets)
    if fmt.kind == "csv":
        value = {"01": (1, 0), "pm1": (1, -1), "voc": (1, -1)}.get(fmt.values)
        data = {fmt.image_column: list(names)}
        for k, a in enumerate(attributes):
            t = targets[:, k]
            if value is None:  # bool, yesno: as words
                data[a] = pd.Series(np.where(t == 1, fmt.texts[0], np.where(t == 0, fmt.texts[1], None)),
                                    dtype=object)
            else:
                column = pd.array(np.where(t == 1, value[0], value[1]), dtype="Int8")
                column[t == NA] = 0 if fmt.values == "voc" else pd.NA
                data[a] = column
        frame = pd.DataFrame(data)
        frame = frame[[c for c in fmt.columns if c in data] + [c for c in data if c not in fmt.columns]]
    else:
        text = io.StringIO()
        write(text, replace(fmt, separator=","), attributes, names, targets)
        text.seek(0)
        frame = pd.read_csv(text, dtype=str, keep_default_na=False)
    frame.to_parquet(path, index=False)

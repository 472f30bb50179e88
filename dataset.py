"""Labels file + images -> tensors, and the image transforms.

The labels file has one image per line: `image_name v1 v2 ... vK`, values 1 / 0 / NA.
An optional header line names the attributes (CelebA's count line may come before it). NA becomes -1 in the target
tensor: the row is kept and only that cell is ignored by the loss and the metrics. Targets are int8 (1, 0, -1) from
the parser to the batch: a 1M x 228 file takes 228 MB. That format is parsed here, streaming; csv, tag lists and
long files, and the value conventions (1/-1, VOC's 0, true/false), are labels.py's: parse_labels reads them all.
"""
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from torchvision import transforms

import labels
from images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, list_images, load_image  # noqa: F401 (re-exported)
from labels import (BAD, EMPTY, MINUS, LabelFormat, LabelOptions, add_label_flags, label_argv,  # noqa: F401
                    label_options, raw_code)
from utils import Report, UserError, atomic_write

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NA = -1


@dataclass
class LabelTable:
    """The rows of a labels file: targets (N, K) int8 (1, 0, NA = -1), names, and the line number of each row."""
    path: str
    attributes: list
    names: "Names" = None  # image names, in file order
    targets: np.ndarray = None
    lines: np.ndarray = None  # line number of each row, for messages
    format: LabelFormat = None  # how the file was written (labels.py), for the writers; None: a plain table

    def __post_init__(self):
        if self.names is None:
            self.names = Names()
        if self.targets is None:
            self.targets = np.zeros((0, len(self.attributes)), dtype=np.int8)
        if self.lines is None:
            self.lines = np.zeros(0, dtype=np.int64)


class Names(Sequence):
    """Image names as one newline-joined UTF-8 blob and end offsets: 1M names take ~30 MB, not ~110 MB of str
    objects. Indexing gives str; equal to a list of the same names."""

    def __init__(self, blob=b"", ends=None):
        self.blob = bytes(blob)
        self.ends = np.zeros(0, dtype=np.int64) if ends is None else np.asarray(ends, dtype=np.int64)

    @classmethod
    def from_bytes(cls, names):
        names = list(names)
        lengths = np.fromiter(map(len, names), dtype=np.int64, count=len(names))
        return cls(b"\n".join(names), np.cumsum(lengths + 1) - 1)  # each name ends before its separator

    def __len__(self):
        return len(self.ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = int(self.ends[i - 1]) + 1 if i else 0
        return self.blob[start:int(self.ends[i])].decode("utf-8")

    def __iter__(self):
        return iter(self.blob.decode("utf-8").split("\n") if len(self) else [])

    def __eq__(self, other):
        return list(self) == list(other) if isinstance(other, (Sequence, Names)) else NotImplemented

    def __repr__(self):
        return f"Names({len(self)})"

    def take(self, index):
        pieces = self.blob.split(b"\n") if len(self) else []
        return Names.from_bytes(pieces[i] for i in np.asarray(index, dtype=np.int64).tolist())


# ---- the labels parser: streaming, in chunks of whole lines ----
# Plain ASCII lines (nearly all of them) are split into tokens with numpy, where bytes <= 32 are whitespace; a line
# with any other control byte, a NUL or a byte >= 0x80 goes through Python's decode and str.split() instead, so
# both agree with str.split() on every line (it splits on \t\n\v\f\r, \x1c-\x1f and space among ASCII).
CHUNK_BYTES = 1 << 22  # 4 MiB of lines at a time: the numpy temporaries of a chunk stay under 100 MB
HEAD_BYTES = 1 << 16  # what the format is told from
_SPACES = bytes(range(33))


def _open_labels(path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path}: labels file not found (give its path with --labels)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the labels file ({e.strerror})") from None


def _head(path):
    """(the file's first HEAD_BYTES as text, whether that is all of it): what sniffing the format reads."""
    with _open_labels(path) as f:
        try:
            data = f.read(HEAD_BYTES + 1)
        except OSError as e:
            raise UserError(f"{path}: cannot read the labels file ({e.strerror})") from None
    complete, data = len(data) <= HEAD_BYTES, data[:HEAD_BYTES]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="ignore"), complete
    return data.decode("utf-8", errors="replace").lstrip("\ufeff"), complete


def _read_chunks(path):
    """(number of its first line, bytes of whole lines each ending in b"\n"), streaming through the file."""
    with _open_labels(path) as f:
        def read(n=CHUNK_BYTES):
            try:
                return f.read(n)
            except OSError as e:
                raise UserError(f"{path}: cannot read the labels file ({e.strerror})") from None

        block = read()
        if block.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16, as "Unicode text" exports write it
            try:
                block = (block + read(-1)).decode("utf-16").encode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}: looks like UTF-16 but does not decode; save it as UTF-8") from None
        if block.startswith(b"\xef\xbb\xbf"):  # a BOM, as spreadsheets write it
            block = block[3:]
        number, carry = 1, b""
        while block:
            data = carry + block
            cut = data.rfind(b"\n") + 1
            chunk, carry = data[:cut], data[cut:]
            if chunk:
                yield number, chunk
                number += chunk.count(b"\n")
            block = read()
        if carry:
            yield number, carry + b"\n"


def _python_line(line):
    """Fields of a line that is not plain ASCII, exactly as str.split() gives them; None if it is not UTF-8."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in text:
        return None
    text = text.strip()
    return [] if not text or text.startswith("#") else text.split()


def _scan(chunk):
    """The tokens of a chunk of lines. Per line: width (fields; 0 for blank, comment and non-UTF-8 lines) and its
    first token's index; `other` maps the lines that are not plain ASCII to their fields (None: not UTF-8)."""
    buf = np.frombuffer(chunk, dtype=np.uint8)
    space = buf <= 32
    edges = np.diff(space.view(np.int8))  # -1: a token starts at the next byte, +1: one ends there
    starts = np.flatnonzero(edges == -1) + 1
    if not space[0]:
        starts = np.concatenate(([0], starts))
    newlines = np.flatnonzero(buf == 10)
    width = np.diff(np.searchsorted(starts, newlines), prepend=0)
    first = np.cumsum(width) - width
    if len(starts):
        width[(width > 0) & (buf[starts[np.minimum(first, len(starts) - 1)]] == ord("#"))] = 0  # comments
    other = {}
    odd = np.flatnonzero((buf >= 127) | (buf < 9) | ((buf > 13) & (buf < 28)))
    if len(odd):
        line_starts = np.concatenate(([0], newlines[:-1] + 1))
        for i in np.unique(np.searchsorted(newlines, odd)).tolist():
            other[i] = _python_line(chunk[line_starts[i]:newlines[i]])
            width[i] = len(other[i] or ())
    return SimpleNamespace(buf=buf, chunk=chunk, space=space, starts=starts, width=width, first=first, other=other)


def _fields(scan, i):
    if i in scan.other:
        return scan.other[i]
    return [_ascii_token(scan, int(scan.starts[t])) for t in range(scan.first[i], scan.first[i] + scan.width[i])]


def _ascii_token(scan, start):
    end = start + int(np.argmax(scan.space[start:]))  # every chunk ends in a newline
    return scan.chunk[start:end].decode("ascii")


def _common_width(widths):
    """The most common width; among equally common ones the first seen (as Counter does). None if no widths."""
    values, first_seen, counts = np.unique(widths, return_index=True, return_counts=True)
    return values[np.lexsort((first_seen, -counts))[0]] if len(values) else None


def _is_count(line):
    """CelebA's first line: a number of rows, above 1 and without a leading zero."""
    return len(line) == 1 and line[0].isascii() and line[0].isdigit() and line[0][0] != "0" and line[0] != "1"


def _names_attributes(line):
    """A header's cells are none of the values (1, 0, NA, -1, true, false, yes, no)."""
    return all(raw_code(c) == BAD for c in line)


def _attributes(path, widths, first_number, first, second_number=None, second=None):
    """(attribute names, the line numbers that are not rows, the header's style: full | attributes | none, and
    whether a count line comes first) by the rules in the module docstring."""
    if first is None:
        raise UserError(f"{path}: no labels in the file (expected lines like `img.jpg 1 0 NA 1`)")
    if second is not None and _is_count(first) and len(second) > 1 and _names_attributes(second) and \
            not any(c.lower().endswith(IMAGE_EXTENSIONS) for c in second):
        # CelebA's list_attr_celeba.txt: the number of rows, then the names (of the attributes only), then the rows.
        common = _common_width(widths[2:])
        if common is not None and common > 1 and common in (len(second), len(second) + 1):
            attributes = second if common == len(second) + 1 else second[1:]
            if len(set(attributes)) != len(attributes):
                raise UserError(f"{path}:{second_number}: the header repeats an attribute name; make the names unique")
            return attributes, (first_number, second_number), "attributes" if attributes is second else "full", True
    if len(first) > 1 and _names_attributes(first[1:]):
        # Usually `image_name A1 .. AK`; a header that names only the attributes has one cell less than the rows.
        common = _common_width(widths[1:])
        attributes = first if common == len(first) + 1 else first[1:]
        if len(set(attributes)) != len(attributes):
            raise UserError(f"{path}:{first_number}: the header repeats an attribute name; make the names unique")
        return attributes, (first_number,), "attributes" if attributes is first else "full", False
    # K is what most lines say, so one broken line cannot redefine the file (ties: the wider).
    counts = np.bincount(widths[widths > 1])
    if not counts.any():
        raise UserError(f"{path}: no line has attribute values (expected lines like `img.jpg 1 0 NA 1`)")
    return [f"Attr{i + 1}" for i in range(len(counts) - 2 - int(np.argmax(counts[::-1])))], (), "none", False


def parse_labels(path, report=None, *, options=None):
    """Read a labels file of any format (labels.py) into a LabelTable; problems go to `report`. Says what was read
    in one line (report.info), then the warnings.

    The table format (`image v1 .. vK`) is read here in one streaming pass: K comes from the first chunk's lines
    and the rows go into an int8 array as they are read; if the whole file's line widths say otherwise (K is what
    most lines say), a second pass reads the rows again. Warnings wait for the end of the pass, then come in the
    order of a whole-file read: lines that are not UTF-8 first, then each line's own (labels.Problems)."""
    report = report or Report()
    options = options or LabelOptions()
    fmt, found = labels.sniff(path, *_head(path), options)
    if fmt.kind == "table":
        parts = _parse_table(path, report)
        if options.attributes:
            parts = labels.select(path, parts, options.attributes)
    else:
        problems = labels.Problems(path)
        parts = labels.read(path, fmt, found, options, problems)
        parts.problems = problems
    if parts.settled:
        targets, fmt, na = parts.raw, parts.fmt, parts.na
    else:
        targets, fmt, na = labels.settle(path, parts.raw, parts.lines, parts.attributes, parts.fmt, options,
                                         parts.problems, parts.bad, parts.spelled)
    names = parts.names if isinstance(parts.names, Names) else Names.from_bytes(n.encode("utf-8") for n in parts.names)
    n, k = len(names), len(parts.attributes)
    report.info(f"labels: {os.path.basename(path)} read as {fmt.describe()}, {n:,} row{'s' * (n != 1)} x "
                f"{k:,} attribute{'s' * (k != 1)}, values {labels.describe_values(fmt)}, {na:,} NA")
    parts.problems.emit(report)
    return LabelTable(path=path, attributes=list(parts.attributes), names=names, targets=targets,
                      lines=np.asarray(parts.lines, dtype=np.int64), format=fmt)


def _parse_table(path, report):
    """The rows of a table-format file as raw codes (labels.py), with its problems and what it looked like; report:
    where the lines that are not UTF-8 are said when the file has no labels at all (before that error)."""
    not_utf8, widths, first_number, first, rows, guess = [], [], None, None, None, None
    second_number, second = None, None
    for number, chunk in _read_chunks(path):
        scan = _scan(chunk)
        not_utf8 += [number + i for i, fields in scan.other.items() if fields is None]
        content = np.flatnonzero(scan.width)
        widths.append(scan.width[content])
        if first is not None and second is None and len(content):
            second_number, second = number + int(content[0]), _fields(scan, int(content[0]))
        if first is None and len(content):
            first_number, first = number + int(content[0]), _fields(scan, int(content[0]))
            if len(content) > 1:
                second_number, second = number + int(content[1]), _fields(scan, int(content[1]))
            try:
                guess = _attributes(path, np.concatenate(widths), first_number, first, second_number, second)
                rows = _Rows(path, *guess[:2], size_hint=os.path.getsize(path) * len(content) / len(chunk))
            except UserError:  # decided (or refused) on the whole file below
                pass
        if rows is not None:
            rows.add(number, scan)
    widths = np.concatenate(widths) if widths else np.zeros(0, dtype=np.int64)
    try:
        found = _attributes(path, widths, first_number, first, second_number, second)
    except UserError:
        for line in not_utf8:
            report.warn("not UTF-8", f"{path}:{line}: line is not UTF-8 text, skipped (save the file as UTF-8)")
        raise
    if found != guess:
        rows = _Rows(path, *found[:2], size_hint=len(widths))
        for number, chunk in _read_chunks(path):
            rows.add(number, _scan(chunk))
    for line in not_utf8:
        rows.problems.add("not UTF-8", line, "line is not UTF-8 text, skipped (save the file as UTF-8)", first=True)
    parts = rows.parts()
    parts.fmt = LabelFormat(kind="table", header=found[2], count_line=found[3],
                            columns=tuple(found[0]))  # columns: every attribute of the file, for rewrite_labels
    return parts


def _cells(scan, full, k):
    """(raw codes, bad) of the k value cells of the lines `full`: 1 / 0 / NA (-1) / -1 (labels.MINUS) as int8, and
    which cells are none of `1`, `0`, `NA` in any case and `-1` (labels.BAD; their words are looked at in Python)."""
    buf, space = scan.buf, scan.space
    # What a token starting at each byte would be (-2: not a value), from fast comparisons; then read at the cells.
    one = space[1:].view(np.int8)
    code = np.full(len(buf), -2, dtype=np.int8)
    code[:-1] += one * (3 * (buf[:-1] == ord("1")).view(np.int8) + 2 * (buf[:-1] == ord("0")).view(np.int8))
    code[:-2] += (((buf[:-2] | 32) == ord("n")) & ((buf[1:-1] | 32) == ord("a")) & space[2:]).view(np.int8)
    if scan.chunk.find(b"-") >= 0:  # -1 (labels.MINUS): CelebA's and VOC's 0; the seed's files skip the test
        code[:-2] += 4 * ((buf[:-2] == ord("-")) & (buf[1:-1] == ord("1")) & space[2:]).view(np.int8)
    if len(full) * (k + 1) == len(scan.starts):  # every token is on a line of k + 1 fields (the usual chunk)
        starts = scan.starts.reshape(-1, k + 1)[:, 1:]
    else:
        starts = scan.starts[scan.first[full][:, None] + np.arange(1, k + 1)]
    cells = code[starts]
    return cells, cells == BAD


class _Rows:
    """The rows of the lines with k + 1 fields, appended chunk by chunk into an int8 array of raw codes; the
    problems of each line are kept for the end of the pass."""

    def __init__(self, path, attributes, skip, *, size_hint):
        self.path, self.attributes, self.skip = path, attributes, set(skip)
        self.targets = np.empty((int(size_hint * 1.02) + 16, len(attributes)), dtype=np.int8)
        self.n, self.seen, self.names, self.lines = 0, {}, [], []
        self.problems, self.bad = labels.Problems(path), labels.BadCells()
        self.spelled = {1: "1", 0: "0", EMPTY: "NA", MINUS: "-1"}

    def add(self, number, scan):
        k = len(self.attributes)
        if not len(scan.starts) and not scan.other:
            return
        ascii_width = scan.width.copy()
        ascii_width[list(scan.other)] = 0  # lines that are not plain ASCII come as Python fields instead
        full = np.flatnonzero(ascii_width == k + 1)
        rank = np.full(len(scan.width), -1)
        rank[full] = np.arange(len(full))
        if len(scan.starts):
            values, bad = _cells(scan, full, k)
            name_start = scan.starts[np.minimum(scan.first, len(scan.starts) - 1)].tolist()
            name_end = (scan.starts[np.minimum(scan.first + 1, len(scan.starts) - 1)]).tolist()
        else:  # only lines that take the Python path (a lone control byte, say): no ASCII token to look at
            values, bad = np.zeros((0, k), dtype=np.int8), np.zeros((0, k), dtype=bool)
            name_start = name_end = [0] * len(scan.width)
        rank, has_bad = rank.tolist(), bad.any(1).tolist()
        width, keep, odd = scan.width.tolist(), [], {}
        for i in np.flatnonzero(scan.width).tolist():
            line = number + i
            if line in self.skip:
                continue
            if width[i] != k + 1:
                self.problems.add("wrong field count", line, f"expected an image name and {k} values, found "
                                                             f"{width[i]} fields; line skipped")
                continue
            fields = scan.other.get(i)
            name = fields[0].encode("utf-8") if fields else scan.chunk[name_start[i]:name_end[i]].rstrip(_SPACES)
            same = name if b"/" not in name and not name.startswith(b".") else os.path.normpath(name)
            if same in self.seen:  # `a.jpg` and `./a.jpg` are one file
                self.problems.add("duplicate image", line, f"{name.decode('utf-8')} already listed on line "
                                                           f"{self.seen[same]}; the first is kept")
                continue
            self.seen[same] = line
            row = self.n + len(keep)
            if fields:
                odd[len(keep)] = self._values(row, fields[1:])
            elif has_bad[rank[i]]:
                for j in np.flatnonzero(bad[rank[i]]).tolist():
                    cell = _ascii_token(scan, int(scan.starts[scan.first[i] + 1 + j]))
                    values[rank[i], j] = self._code(row, j, cell)
            keep.append(rank[i])
            self.names.append(name)
            self.lines.append(line)
        self._append(values, np.array(keep, dtype=np.int64), odd)

    def _append(self, values, keep, odd):
        if self.n + len(keep) > len(self.targets):
            grown = np.empty((2 * (self.n + len(keep)), len(self.attributes)), dtype=np.int8)
            grown[:self.n] = self.targets[:self.n]
            self.targets = grown
        block = self.targets[self.n:self.n + len(keep)]
        block[keep >= 0] = values[keep[keep >= 0]]
        for j, row in odd.items():
            block[j] = row
        self.n += len(keep)

    def _values(self, row, cells):
        return [self._code(row, j, cell) for j, cell in enumerate(cells)]

    def _code(self, row, column, cell):
        """A cell the fast path did not read: a word of another convention (true, yes, ...) or a bad cell."""
        code = raw_code(cell)
        if code == BAD:
            self.bad.add(row, column, cell)
        else:
            self.spelled.setdefault(code, cell)
        return code

    def parts(self):
        # A view when the estimate was close; a copy when it was far over (the rest would stay allocated).
        targets = self.targets[:self.n]
        if len(self.targets) > 1.1 * self.n + 16:
            targets = targets.copy()
        return SimpleNamespace(attributes=self.attributes, names=Names.from_bytes(self.names), raw=targets,
                               lines=np.array(self.lines, dtype=np.int64), problems=self.problems, bad=self.bad,
                               spelled=self.spelled, settled=False)


def _plain_format(attributes, names):
    """The table format where it can hold these names (no spaces, no name read as a value or a comment); else a
    csv, which can."""
    def fits(text):
        return text and not text.startswith("#") and not any(c.isspace() for c in text)

    if all(fits(a) and raw_code(a) == BAD for a in attributes) and all(fits(n) for n in names):
        return LabelFormat()
    return LabelFormat(kind="csv", columns=("image_name", *attributes), image_column="image_name",
                       texts=("1", "0", ""))


def write_labels(path, attributes, names, targets, comment=None, *, fmt=None):
    """Write rows in fmt's format (the LabelTable.format of a file read; default: the table format, or a csv where
    a name does not fit it), atomically, so that parse_labels reads them back as the same table; comment: a first
    line starting with # (not in a .parquet)."""
    fmt = fmt or _plain_format(attributes, names)
    targets = np.asarray(targets)
    if fmt.kind != "table":
        if fmt.parquet:
            atomic_write(path, lambda tmp: labels.write_parquet(tmp, fmt, attributes, names, targets))
            return

        def write_other(tmp):
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                labels.write(f, fmt, list(attributes), names, targets, comments=[comment] if comment else [],
                             path=path)

        atomic_write(path, write_other)
        return
    text = {1: fmt.texts[0], 0: fmt.texts[1], NA: fmt.texts[2]}

    def write(tmp):
        with open(tmp, "w") as f:
            if comment:
                f.write(comment + "\n")
            if fmt.count_line:
                f.write(f"{len(names)}\n")
            f.write(("" if fmt.header == "attributes" else "image_name ") + " ".join(attributes) + "\n")
            for name, row in zip(names, targets.tolist()):
                f.write(name + " " + " ".join(text[v] for v in row) + "\n")

    atomic_write(path, write)


def _read_as_parsed(path):
    """(prefix, bytes) of a labels file as parse_labels reads it: a UTF-8 BOM set aside (to be written back),
    UTF-16 as UTF-8; line n of the parser's messages and LabelTable.lines is line n - 1 of bytes.split(b"\\n")."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read the labels file ({e.strerror})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return b"", data.decode("utf-16").encode("utf-8")
    if data.startswith(b"\xef\xbb\xbf"):
        return data[:3], data[3:]
    return b"", data


_SEPARATED = re.compile(rb"([\x00-\x20]+)")  # the parser's whitespace on a plain ASCII line: bytes <= 32


def _rewrite_line(line, name, old, new, text=None, columns=None, width=None):
    """A labels line with the value cells that differ between old and new (int8 rows) set to new, everything else
    as it was (separators, a \\r); a line whose fields cannot be matched to the parser's (unusual Unicode spacing)
    is written plainly. text: target -> cell (default VALUE_TEXT); columns: the file's value column of each cell
    and width: how many it has, where --attributes read some of them."""
    text = text or VALUE_TEXT
    columns = list(range(len(new))) if columns is None else columns
    parts = _SEPARATED.split(line)
    fields = [j for j, part in enumerate(parts) if part and not _SEPARATED.fullmatch(part)]
    if len(fields) == (width or len(new)) + 1 and parts[fields[0]] == name.encode("utf-8"):
        for c, a, b in zip(columns, old.tolist(), new.tolist()):
            if a != b:
                parts[fields[1 + c]] = text[b].encode()
        return b"".join(parts)
    return (name + " " + " ".join(text[v] for v in new.tolist())).encode("utf-8") + \
        (b"\r" if line.endswith(b"\r") else b"")


VALUE_TEXT = {1: "1", 0: "0", -1: "NA"}  # a target as the labels file writes it


def rewrite_labels(path, table, targets, comments=()):
    """The bytes of the labels file at path (which parse_labels read into table) with each value cell where
    targets (int8, NA = -1) differs from table.targets set to targets. A table-format file keeps every other byte
    as it was (header or none, comments, separators, CRLF line ends, a BOM, the rows whose image is missing, in
    its value convention); a csv, tags or long file is written anew in its format (write_labels), with the
    columns that were read. comments: lines starting with # that go first (not in a .parquet)."""
    fmt = table.format or LabelFormat()
    if fmt.kind != "table":
        if fmt.parquet:
            out = io.BytesIO()
            labels.write_parquet(out, fmt, table.attributes, table.names, targets)
            return out.getvalue()
        out = io.StringIO(newline="")
        labels.write(out, fmt, list(table.attributes), table.names, np.asarray(targets), comments=comments,
                     path=path)
        return out.getvalue().encode("utf-8")
    text = {1: fmt.texts[0], 0: fmt.texts[1], NA: fmt.texts[2]}
    subset = fmt.columns and list(fmt.columns) != list(table.attributes)
    columns, width = ([fmt.columns.index(a) for a in table.attributes], len(fmt.columns)) if subset else (None, None)
    prefix, data = _read_as_parsed(path)
    lines = data.split(b"\n")
    for i in np.flatnonzero((np.asarray(targets) != table.targets).any(1)).tolist():
        n = table.lines[i] - 1
        lines[n] = _rewrite_line(lines[n], table.names[i], table.targets[i], np.asarray(targets)[i], text, columns,
                                  width)
    newline = b"\r\n" if lines[0].endswith(b"\r") else b"\n"
    head = b"".join(c.encode("utf-8") + newline for c in comments)
    return prefix + head + b"\n".join(lines)


def drop_missing_images(table, images_dir, report):
    """Keep the rows whose image file exists; return the table of those rows (the same table if all exist)."""
    keep = np.ones(len(table.names), dtype=bool)
    for i, name in enumerate(table.names):
        path = os.path.join(images_dir, name)
        if not os.path.isfile(path):
            report.warn("image not found", f"{table.path}:{table.lines[i]}: {path} not found; skipped")
            keep[i] = False
    if keep.all():
        return table
    index = np.flatnonzero(keep)
    return LabelTable(path=table.path, attributes=table.attributes, names=table.names.take(index),
                      targets=table.targets[index], lines=table.lines[index], format=table.format)


def label_counts(targets):
    """Per-attribute positive, negative and NA counts of an (N, K) target tensor with NA = -1."""
    counts = np.zeros((3, targets.shape[1]), dtype=np.int64)
    for start in range(0, len(targets), 65536):  # in blocks: a bool sum casts the whole operand to int64 (8x)
        block = np.asarray(targets[start:start + 65536])
        counts += [(block == 1).sum(0), (block == 0).sum(0), (block == NA).sum(0)]
    return {"positive": counts[0].tolist(), "negative": counts[1].tolist(), "na": counts[2].tolist()}


def format_counts(attributes, counts):
    rows = [f"{'attribute':<12} {'positive':>8} {'negative':>8} {'NA':>6}"]
    for i, name in enumerate(attributes):
        rows.append(f"{name:<12} {counts['positive'][i]:>8} {counts['negative'][i]:>8} {counts['na'][i]:>6}")
    return "\n".join(rows)


def eval_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The one preprocessing used for validation, evaluation and inference."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def train_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment="flip"):
    if augment == "flip":
        # The flip comes after the resize so that it equals torch.flip of the eval tensor exactly:
        # the feature cache relies on that.
        return transforms.Compose([
            transforms.Resize((image_size, image_size)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])
    if augment == "strong":
        return transforms.Compose([
            transforms.RandomResizedCrop(image_size, scale=(0.6, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.3, 0.3, 0.3, 0.02),
            transforms.RandomRotation(10, fill=255),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])
    raise UserError(f"unknown augment {augment!r}; use flip or strong")


class ImageDataset(torch.utils.data.Dataset):
    """Images with (N, K) targets. An image that fails to decode yields None; the collate drops it."""

    def __init__(self, paths, targets, transform):
        self.paths = list(paths)
        self.targets = targets
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            image = self.transform(load_image(self.paths[index]))
        except UserError as e:
            return index, None, str(e)
        return index, image, None


def collate(batch):
    """Stack the good samples; return (indices, images, errors) where errors lists (index, message)."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    errors = [(i, message) for i, _, message in batch if message is not None]
    if not good:
        return torch.empty(0, dtype=torch.long), None, errors
    indices = torch.tensor([i for i, _ in good])
    return indices, torch.stack([x for _, x in good]), errors


def load_dataset(labels_path, images_dir, report, *, options=None):
    """Parse the labels file (options: label_options of the label flags) and drop rows without an image; returns
    (table, paths, (N, K) int8 targets tensor)."""
    if not os.path.isdir(images_dir):
        raise UserError(f"{images_dir}: images folder not found (give it with --images)")
    table = drop_missing_images(parse_labels(labels_path, report, options=options), images_dir, report)
    if not table.names:
        raise UserError(f"{labels_path}: no usable row (every line was skipped or no listed image exists in {images_dir})")
    paths = [os.path.join(images_dir, n) for n in table.names]
    # int8 all the way: 1M x 228 targets take 228 MB; a batch becomes float where the loss needs it.
    return table, paths, torch.from_numpy(table.targets)

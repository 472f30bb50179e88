"""Labels file + images -> tensors, and the image transforms.

The labels file has one image per line: `image_name v1 v2 ... vK`, values 1 / 0 / NA.
An optional header line names the attributes. NA becomes -1 in the target tensor: the row
is kept and only that cell is ignored by the loss and the metrics.
"""
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
from torchvision import transforms

from images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, list_images, load_image  # noqa: F401 (re-exported)
from utils import Report, UserError, atomic_write

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NA = -1


@dataclass
class LabelTable:
    path: str
    attributes: list
    names: list = field(default_factory=list)  # image names, in file order
    targets: list = field(default_factory=list)  # one list of K ints (1, 0, NA) per image
    lines: list = field(default_factory=list)  # line number of each row, for messages


def _cell_value(cell):
    low = cell.lower()
    if low == "1":
        return 1
    if low == "0":
        return 0
    if low == "na":
        return NA
    return None


def parse_labels(path, report=None):
    """Read a labels file into a LabelTable; problems go to `report` (see the module docstring)."""
    report = report or Report()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: labels file not found (give its path with --labels)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the labels file ({e.strerror})") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16, as "Unicode text" exports write it
        try:
            raw = raw.decode("utf-16").encode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path}: looks like UTF-16 but does not decode; save it as UTF-8") from None
    if raw.startswith(b"\xef\xbb\xbf"):  # a BOM, as spreadsheets write it
        raw = raw[3:]

    content = []  # (line number, fields)
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
            if "\x00" in text:
                raise UnicodeDecodeError("utf-8", line, 0, 1, "NUL byte")
        except UnicodeDecodeError:
            report.warn("not UTF-8", f"{path}:{number}: line is not UTF-8 text, skipped (save the file as UTF-8)")
            continue
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        content.append((number, text.split()))
    if not content:
        raise UserError(f"{path}: no labels in the file (expected lines like `img.jpg 1 0 NA 1`)")

    first_number, first = content[0]
    header = len(first) > 1 and all(_cell_value(c) is None for c in first[1:])
    if header:
        # Usually `image_name A1 .. AK`; a header that names only the attributes has one cell less than the rows.
        widths = Counter(len(fields) for _, fields in content[1:])
        attributes = first if widths and widths.most_common(1)[0][0] == len(first) + 1 else first[1:]
        if len(set(attributes)) != len(attributes):
            raise UserError(f"{path}:{first_number}: the header repeats an attribute name; make the names unique")
        content = content[1:]
    else:
        # K is what most lines say, so one broken line cannot redefine the file.
        counts = Counter(len(fields) for _, fields in content if len(fields) > 1)
        if not counts:
            raise UserError(f"{path}: no line has attribute values (expected lines like `img.jpg 1 0 NA 1`)")
        attributes = [f"Attr{i + 1}" for i in range(max(counts, key=lambda n: (counts[n], n)) - 1)]

    table = LabelTable(path=path, attributes=attributes)
    seen = {}
    k = len(attributes)
    for number, fields in content:
        if len(fields) != k + 1:
            report.warn("wrong field count",
                        f"{path}:{number}: expected an image name and {k} values, found {len(fields)} fields; line skipped")
            continue
        name, cells = fields[0], fields[1:]
        same = os.path.normpath(name)  # `a.jpg` and `./a.jpg` are one file
        if same in seen:
            report.warn("duplicate image",
                        f"{path}:{number}: {name} already listed on line {seen[same]}; the first is kept")
            continue
        values = []
        for attribute, cell in zip(attributes, cells):
            value = _cell_value(cell)
            if value is None:
                report.warn("bad value",
                            f"{path}:{number}: {attribute} value {cell!r} is not 1, 0 or NA; treated as NA")
                value = NA
            values.append(value)
        seen[same] = number
        table.names.append(name)
        table.targets.append(values)
        table.lines.append(number)
    return table


def write_labels(path, attributes, names, targets, comment=None):
    """Write rows in the format parse_labels reads (a header line, NA for unknown cells), atomically; comment: a
    first line starting with #."""
    def write(tmp):
        with open(tmp, "w") as f:
            if comment:
                f.write(comment + "\n")
            f.write("image_name " + " ".join(attributes) + "\n")
            for name, row in zip(names, targets.tolist()):
                f.write(name + " " + " ".join("NA" if v < 0 else str(v) for v in row) + "\n")

    atomic_write(path, write)


def drop_missing_images(table, images_dir, report):
    """Keep the rows whose image file exists; return the table of those rows."""
    kept = LabelTable(path=table.path, attributes=table.attributes)
    for name, values, number in zip(table.names, table.targets, table.lines):
        if not os.path.isfile(os.path.join(images_dir, name)):
            report.warn("image not found", f"{table.path}:{number}: {os.path.join(images_dir, name)} not found; skipped")
            continue
        kept.names.append(name)
        kept.targets.append(values)
        kept.lines.append(number)
    return kept


def label_counts(targets):
    """Per-attribute positive, negative and NA counts of an (N, K) target tensor with NA = -1."""
    return {
        "positive": (targets == 1).sum(0).tolist(),
        "negative": (targets == 0).sum(0).tolist(),
        "na": (targets == NA).sum(0).tolist(),
    }


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


def load_dataset(labels_path, images_dir, report):
    """Parse the labels file and drop rows without an image; returns (table, paths, targets tensor)."""
    if not os.path.isdir(images_dir):
        raise UserError(f"{images_dir}: images folder not found (give it with --images)")
    table = drop_missing_images(parse_labels(labels_path, report), images_dir, report)
    if not table.names:
        raise UserError(f"{labels_path}: no usable row (every line was skipped or no listed image exists in {images_dir})")
    paths = [os.path.join(images_dir, n) for n in table.names]
    return table, paths, torch.tensor(table.targets, dtype=torch.long)

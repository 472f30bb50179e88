"""Features of a frozen backbone, computed once per image and per mirror image, kept on disk.

With the backbone frozen and flip-only augmentation, every epoch of the usual loop recomputes the same
forward passes. Here each image is run through the backbone twice (as is, and mirrored) and the pooled
features are stored; training the head then picks one of the two views per image and epoch, which is
exactly RandomHorizontalFlip(p=0.5). Validation images only need the first view, so their mirror view is
computed only if a later run trains on them.

Layout: <cache dir>/<fingerprint>/features.f32 (raw float32 rows of 2 x D) and index.json, which maps
"path|size|mtime_ns" to (row, crc32 of view 0, crc32 of view 1 or null when it is not stored). The fingerprint hashes the backbone's weights, the image size and the
normalization, so any change of those lands in a new folder. Rows are appended and the index is replaced
atomically afterwards, so a crash leaves rows without index entries (cut off on the next run), never an
index entry without its row. A damaged index or a row whose checksum fails is rebuilt, never trusted.
"""
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib

import numpy as np
import torch

from data_loader import make_loader
from dataset import ImageDataset, eval_transform
from model import fold_batchnorm
from utils import Progress, UserError, amp_context, log

CACHE_VERSION = 2


def fingerprint(model, backbone_name, image_size, mean, std, amp):
    h = hashlib.sha1(json.dumps([CACHE_VERSION, backbone_name, image_size, list(mean), list(std), bool(amp)]).encode())
    for key, value in sorted(model.backbone.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def image_key(path):
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


class FeatureStore:
    """Disk-backed (rows, 2, D) float32 array plus an index from image key to row."""

    def __init__(self, folder, dim, warn=print):
        self.folder, self.dim, self.warn = folder, dim, warn
        try:
            os.makedirs(folder, exist_ok=True)
            self._lock = open(os.path.join(folder, "lock"), "w")
        except OSError as e:
            raise UserError(f"{folder}: cannot use it for the feature cache ({e.strerror}); "
                            "give another --cache-dir or use --no-cache") from None
        self.data_path = os.path.join(folder, "features.f32")
        self.index_path = os.path.join(folder, "index.json")
        self.row_bytes = 2 * dim * 4

        fcntl.flock(self._lock, fcntl.LOCK_EX)  # two runs sharing a cache take turns
        self.rows = self._read_index()
        # Cut off rows a crashed run appended without indexing them.
        with open(self.data_path, "ab") as f:
            f.truncate(len(self.rows) * self.row_bytes)

    def _read_index(self):
        if not os.path.exists(self.index_path):
            return {}
        try:
            with open(self.index_path) as f:
                index = json.load(f)
            rows = index["rows"]
            ok = (index["version"] == CACHE_VERSION and index["dim"] == self.dim
                  and os.path.getsize(self.data_path) >= len(rows) * self.row_bytes
                  and sorted(r for r, _, _ in rows.values()) == list(range(len(rows))))
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            self.warn(f"feature cache {self.folder} is damaged; rebuilding it")
            return {}
        return {k: list(v) for k, v in rows.items()}

    def close(self):
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()

    def lookup(self, keys):
        """(row of each key or -1 where missing, whether its mirror view is stored). If any stored view fails
        its checksum the whole cache is treated as damaged and emptied: one bad row says the file cannot be
        trusted."""
        rows = np.full(len(keys), -1, dtype=np.int64)
        mirrored = np.zeros(len(keys), dtype=bool)
        if not self.rows:
            return rows, mirrored
        data = self.array()
        for i, key in enumerate(keys):
            entry = self.rows.get(key)
            if entry is None:
                continue
            row, crc0, crc1 = entry
            if zlib.crc32(data[row, 0].tobytes()) != crc0 or (crc1 is not None and
                                                               zlib.crc32(data[row, 1].tobytes()) != crc1):
                self.warn(f"feature cache {self.folder} is damaged (checksum of {key.split('|')[0]}); rebuilding it")
                self.rows = {}
                with open(self.data_path, "ab") as f:
                    f.truncate(0)
                self.write_index()
                return np.full(len(keys), -1, dtype=np.int64), np.zeros(len(keys), dtype=bool)
            rows[i], mirrored[i] = row, crc1 is not None
        return rows, mirrored

    def append(self, keys, features, write_index=True):
        """Store features (n, V, D) for keys, V = 2 (as is, mirrored) or 1 (as is only); returns their rows."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        mirrored = features.shape[1] == 2
        if not mirrored:
            features = np.concatenate([features, np.zeros_like(features)], axis=1)
        start = len(self.rows)
        with open(self.data_path, "ab") as f:
            f.write(features.tobytes())
            f.flush()
            os.fsync(f.fileno())
        rows = np.arange(start, start + len(keys))
        for key, row, feature in zip(keys, rows, features):
            self.rows[key] = [int(row), zlib.crc32(feature[0].tobytes()),
                              zlib.crc32(feature[1].tobytes()) if mirrored else None]
        if write_index:
            self.write_index()
        return rows

    def add_mirror(self, keys, features, write_index=True):
        """Write the mirror view (n, D) into the stored rows of keys. Its checksum enters the index only after
        the bytes are on disk, so a crash in between leaves the view unused, not trusted."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        with open(self.data_path, "r+b") as f:
            for key, feature in zip(keys, features):
                f.seek(self.rows[key][0] * self.row_bytes + self.row_bytes // 2)
                f.write(feature.tobytes())
            f.flush()
            os.fsync(f.fileno())
        for key, feature in zip(keys, features):
            self.rows[key][2] = zlib.crc32(feature.tobytes())
        if write_index:
            self.write_index()

    def write_index(self):
        tmp = self.index_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"version": CACHE_VERSION, "dim": self.dim, "rows": self.rows}, f)
        os.replace(tmp, self.index_path)

    def array(self):
        n = os.path.getsize(self.data_path) // self.row_bytes
        if n == 0:
            return np.zeros((0, 2, self.dim), dtype=np.float32)
        return np.memmap(self.data_path, dtype=np.float32, mode="r", shape=(n, 2, self.dim))


def extract(model, paths, image_size, mean, std, batch_size, num_workers, device, amp, views=(0, 1)):
    """Yield (indices, features (b, len(views), D), errors) over paths: view 0 as is, view 1 mirrored."""
    dataset = ImageDataset(paths, None, eval_transform(image_size, mean, std))
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers, device=device)
    model.eval()  # the backbone's BatchNorm must use, never update, its running statistics
    backbone = fold_batchnorm(model.backbone).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for indices, images, errors in loader:
            if images is None:
                yield indices.numpy(), None, errors
                continue
            x = images.to(device, non_blocking=True)
            # Flipping the normalized tensor equals RandomHorizontalFlip after the resize, exactly.
            x = torch.cat([torch.flip(x, dims=[3]) if v else x for v in views])
            with amp_context(device, amp):
                f = backbone(x.contiguous(memory_format=torch.channels_last))
            f = f.float().cpu().numpy().reshape(len(views), len(indices), -1).transpose(1, 0, 2)
            yield indices.numpy(), f, errors


def cached_features(model, paths, *, backbone, image_size, mean, std, cache_dir, batch_size, num_workers, device,
                    amp, report, stop=None, mirror=None):
    """Features for paths, reusing the disk cache; returns (array (rows, 2, D), row of each path, ok mask).

    mirror marks the paths whose mirror view is needed (the training images; default all); the others get
    view 0 only. Images that fail to decode are warned about through report and have ok False. A Ctrl-C
    (stop.requested) ends the extraction early, keeping what was stored. With cache_dir None the store lives in
    a temporary folder and the array is copied to memory.
    """
    def warn(message):  # damage of the cache is our problem, not the user's: --strict does not stop on it
        report.warn("feature cache", message, False)

    def should_stop():
        return stop is not None and stop.requested

    dim = model.feature_dim
    mirror = np.ones(len(paths), dtype=bool) if mirror is None else np.asarray(mirror, dtype=bool)
    temporary = tempfile.mkdtemp(prefix="features-") if cache_dir is None else None
    folder = temporary or os.path.join(cache_dir, fingerprint(model, backbone, image_size, mean, std, amp))
    store = FeatureStore(folder, dim, warn=warn)
    try:
        keys = [image_key(p) for p in paths]
        rows, mirrored = store.lookup(keys)
        # One file under two names (`a.jpg`, `./a.jpg`) is one image: the first name stands for both.
        first = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
            mirror[first[k]] |= mirror[i]
        unique = np.array([first[k] == i for i, k in enumerate(keys)], dtype=bool)
        jobs = [  # (indices into paths, views to compute, how to store them)
            (np.flatnonzero(unique & (rows < 0) & mirror), (0, 1), store.append),
            (np.flatnonzero(unique & (rows < 0) & ~mirror), (0,), store.append),
            (np.flatnonzero(unique & (rows >= 0) & ~mirrored & mirror), (1,), None),
        ]
        ok = np.ones(len(paths), dtype=bool)
        forwards = sum(len(todo) * len(views) for todo, views, _ in jobs)
        found = int(np.sum(unique & (rows >= 0)))
        if cache_dir is not None:
            log(f"feature cache: {found} of {int(unique.sum())} images found in {folder}")
        if forwards:
            log(f"extracting {backbone} features: {forwards} forwards "
                f"({len(jobs[0][0])} images x 2 views, {len(jobs[1][0])} x 1, {len(jobs[2][0])} mirror only)")
            started, last_index_write = time.time(), time.time()
            bar = Progress(sum(len(todo) for todo, _, _ in jobs), "extract")
            for todo, views, store_fn in jobs:
                if not len(todo) or should_stop():
                    continue
                for indices, features, errors in extract(model, [paths[i] for i in todo], image_size, mean, std,
                                                         batch_size, num_workers, device, amp, views):
                    for i, message in errors:
                        ok[todo[i]] = False
                        report.warn("unreadable image", f"{message}; skipped")
                    if features is not None:
                        batch_keys = [keys[todo[i]] for i in indices]
                        if store_fn is None:
                            store.add_mirror(batch_keys, features[:, 0], write_index=False)
                        else:
                            rows[todo[indices]] = store_fn(batch_keys, features, write_index=False)
                    if time.time() - last_index_write > 30:  # an interrupted extraction keeps what it did
                        store.write_index()
                        last_index_write = time.time()
                    bar(len(indices) + len(errors))
                    if should_stop():
                        break
            store.write_index()
            elapsed = time.time() - started
            log(f"extracted in {elapsed:.1f}s ({forwards / max(elapsed, 1e-9):.1f} forwards/s)")
        for i, k in enumerate(keys):
            rows[i], ok[i] = rows[first[k]], ok[first[k]]
        data = store.array()
        if temporary:
            data = np.array(data)
        ok &= rows >= 0
        return data, rows, ok
    finally:
        store.close()
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)

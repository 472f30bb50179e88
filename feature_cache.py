"""Features of a frozen backbone, computed once per image and per mirror image, kept on disk.

With the backbone frozen and flip-only augmentation, every epoch of the usual loop recomputes the same
forward passes. Here each image is run through the backbone twice (as is, and mirrored) and the pooled
features are stored; training the head then picks one of the two views per image and epoch, which is
exactly RandomHorizontalFlip(p=0.5).

Layout: <cache dir>/<fingerprint>/features.f32 (raw float32 rows of 2 x D) and index.json, which maps
"path|size|mtime_ns" to (row, crc32). The fingerprint hashes the backbone's weights, the image size and the
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
from dataset import ImageDataset, UserError, eval_transform
from model import amp_context

CACHE_VERSION = 1


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
                  and sorted(r for r, _ in rows.values()) == list(range(len(rows))))
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            self.warn(f"feature cache {self.folder} is damaged; rebuilding it")
            return {}
        return {k: tuple(v) for k, v in rows.items()}

    def close(self):
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()

    def lookup(self, keys):
        """Row of each key, -1 where missing. If any stored row fails its checksum the whole cache is
        treated as damaged and emptied: one bad row says the file cannot be trusted."""
        rows = np.full(len(keys), -1, dtype=np.int64)
        if not self.rows:
            return rows
        data = self.array()
        for i, key in enumerate(keys):
            entry = self.rows.get(key)
            if entry is None:
                continue
            row, crc = entry
            if zlib.crc32(data[row].tobytes()) != crc:
                self.warn(f"feature cache {self.folder} is damaged (checksum of {key.split('|')[0]}); rebuilding it")
                self.rows = {}
                with open(self.data_path, "ab") as f:
                    f.truncate(0)
                self.write_index()
                return np.full(len(keys), -1, dtype=np.int64)
            rows[i] = row
        return rows

    def append(self, keys, features, write_index=True):
        """Store features (n, 2, D) for keys; returns their rows. The index is rewritten afterwards."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        start = len(self.rows)
        with open(self.data_path, "ab") as f:
            f.write(features.tobytes())
            f.flush()
            os.fsync(f.fileno())
        rows = np.arange(start, start + len(keys))
        for key, row, feature in zip(keys, rows, features):
            self.rows[key] = (int(row), zlib.crc32(feature.tobytes()))
        if write_index:
            self.write_index()
        return rows

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


def extract(model, paths, image_size, mean, std, batch_size, num_workers, device, amp):
    """Yield (indices, features (b, 2, D), errors) over paths: view 0 as is, view 1 mirrored."""
    dataset = ImageDataset(paths, None, eval_transform(image_size, mean, std))
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers, device=device)
    model.eval()  # the backbone's BatchNorm must use, never update, its running statistics
    backbone = model.backbone.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for indices, images, errors in loader:
            if images is None:
                yield indices.numpy(), None, errors
                continue
            x = images.to(device, non_blocking=True)
            # Flipping the normalized tensor equals RandomHorizontalFlip after the resize, exactly.
            x = torch.cat([x, torch.flip(x, dims=[3])]).contiguous(memory_format=torch.channels_last)
            with amp_context(device, amp):
                f = backbone(x)
            f = f.float().cpu().numpy().reshape(2, len(indices), -1).transpose(1, 0, 2)
            yield indices.numpy(), f, errors


def cached_features(model, backbone_name, paths, image_size, mean, std, cache_dir, batch_size, num_workers,
                    device, amp, warn, log, progress, should_stop=lambda: False):
    """Features for paths, reusing the disk cache; returns (array (rows, 2, D), row of each path, ok mask).

    Images that fail to decode are reported through warn(reason, message) and have ok False.
    With cache_dir None the store lives in a temporary folder and the array is copied to memory.
    """
    dim = model.head.in_features
    temporary = tempfile.mkdtemp(prefix="features-") if cache_dir is None else None
    folder = temporary or os.path.join(cache_dir, fingerprint(model, backbone_name, image_size, mean, std, amp))
    store = FeatureStore(folder, dim, warn=lambda m: warn("feature cache", m, False))
    try:
        keys = [image_key(p) for p in paths]
        rows = store.lookup(keys)
        # One file under two names (`a.jpg`, `./a.jpg`) is extracted once.
        first = {}
        todo = np.array([i for i, k in enumerate(keys) if rows[i] < 0 and first.setdefault(k, i) == i], dtype=np.int64)
        ok = np.ones(len(paths), dtype=bool)
        if cache_dir is not None:
            log(f"feature cache: {len(paths) - len(todo)} of {len(paths)} images found in {folder}")
        if len(todo):
            log(f"extracting {backbone_name} features of {len(todo)} images x 2 views")
            started, last_index_write = time.time(), time.time()
            bar = progress(len(todo), "extract")
            for indices, features, errors in extract(model, [paths[i] for i in todo], image_size, mean, std,
                                                     batch_size, num_workers, device, amp):
                for i, message in errors:
                    ok[todo[i]] = False
                    warn("unreadable image", f"{message}; skipped", True)
                if features is not None:
                    rows[todo[indices]] = store.append([keys[todo[i]] for i in indices], features, write_index=False)
                if time.time() - last_index_write > 30:  # an interrupted extraction keeps what it did
                    store.write_index()
                    last_index_write = time.time()
                bar(len(indices) + len(errors))
                if should_stop():
                    break
            store.write_index()
            for i, k in enumerate(keys):
                rows[i], ok[i] = rows[first.get(k, i)], ok[first.get(k, i)]
            elapsed = time.time() - started
            log(f"extracted {len(todo)} images in {elapsed:.1f}s ({2 * len(todo) / max(elapsed, 1e-9):.1f} forwards/s)")
        data = store.array()
        if temporary:
            data = np.array(data)
        ok &= rows >= 0
        return data, rows, ok
    finally:
        store.close()
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)

"""Features of a frozen backbone, computed once per image and per mirror image, kept on disk.

With the backbone frozen and flip-only augmentation, every epoch of the usual loop recomputes the same
forward passes. Here each image is run through the backbone twice (as is, and mirrored) and the pooled
features are stored; training the head then picks one of the two views per image and epoch, which is
exactly RandomHorizontalFlip(p=0.5). Validation images only need the first view, so their mirror view is
computed only if a later run trains on them.

Layout: <cache dir>/<fingerprint>/ holds a data file features-<token>.f32 (raw float32 rows of 2 x D) and
index.npz (numpy arrays, no pickle): `meta` (JSON: version, D, the data file's name), `keys` (the image keys
"path|size|mtime_ns" of rows 0..n-1, joined by NUL) and `crc` (n x 2 int64: crc32 of view 0 and of view 1, -1
where the mirror view is not stored). The fingerprint hashes the backbone's weights, the image size and the
normalization, so any change of those lands in a new folder. Arrays, not JSON: at 1M rows the index is written
and read in 1-2 s (benchmarks/bench_cache_index.py; as JSON, a dict of lists, it took 12-15 s each way).

Crash and sharing safety. Runs sharing a folder take turns on a lock file, but a run trains from a memory map
of the data file after it has let go of the lock, so:
- Rows are written past the indexed ones and the index is replaced atomically afterwards: a crash (or a full
  disk) leaves rows without index entries, which the next run writes over, never an index entry without its
  row. The rows already indexed stay usable.
- A data file is never cut below its indexed rows, and their bytes are never rewritten: another run may have
  them mapped (truncating a mapped file kills that run with SIGBUS). Only the partial rows of a failed append,
  past every indexed row, are cut off, to give the index room on a full disk. The only in-place write is a
  mirror view into a row whose index entry says it has none, bytes that no run reads; its checksum enters the
  index after they are on disk.
- A damaged cache (an index that cannot be read or has the wrong shape, types, version or D, a data file shorter
  than the index, a row whose checksum fails) is rebuilt, never trusted, with a warning: into a new data file,
  the index switched to it atomically, the old file unlinked (runs that have it mapped keep it until they end).
"""
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
import zlib

import numpy as np
import torch

import distributed
from data_loader import make_loader
from dataset import ImageDataset, eval_transform
from model import fold_batchnorm
from utils import Progress, UserError, amp_context, atomic_write, disk_error, log

CACHE_VERSION = 3
CACHE_HINT = "give another --cache-dir or use --no-cache"
DATA_NAME = re.compile(r"features-[0-9a-f]{16}\.f32")  # what an index may name: no other path, no folder


def fingerprint(model, *, backbone_name, image_size, mean, std, amp):
    h = hashlib.sha1(json.dumps([CACHE_VERSION, backbone_name, image_size, list(mean), list(std), bool(amp),
                                 model.feature_dim]).encode())  # the same weights may give other features
    for key, value in sorted(model.backbone.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def image_key(path):
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def encode_keys(keys):
    # NUL cannot occur in a path; surrogateescape round-trips file names that are not UTF-8.
    return np.frombuffer("\0".join(keys).encode("utf-8", "surrogateescape"), dtype=np.uint8)


def decode_keys(blob, n):
    return str(memoryview(blob), "utf-8", "surrogateescape").split("\0") if n else []


class FeatureStore:
    """Disk-backed (rows, 2, D) float32 array plus an index from image key to row (see the module docstring)."""

    def __init__(self, folder, dim, warn=print):
        self.folder, self.dim, self.warn = folder, dim, warn
        try:
            os.makedirs(folder, exist_ok=True)
            self._lock = open(os.path.join(folder, "lock"), "a")
        except OSError as e:
            raise UserError(f"the feature cache folder {folder} cannot be used ({e.strerror}); {CACHE_HINT}") from None
        self.index_path = os.path.join(folder, "index.npz")
        self.row_bytes = 2 * dim * 4
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # two runs sharing a cache take turns
        try:
            if not self._read_index():
                self._new_data_file()
            self._remove_stale_files()
        except BaseException:
            self.close()
            raise

    @property
    def crc(self):
        """(rows, 2) int64: crc32 of view 0 and of view 1 of each row, -1 where the mirror view is not stored."""
        return self._crc[:len(self.keys)]

    def _set_rows(self, keys, crc, row_of=None):
        self.keys, self._crc = keys, crc
        self.row_of = dict(zip(keys, range(len(keys)))) if row_of is None else row_of

    @property
    def data_path(self):
        return os.path.join(self.folder, self.data_name)

    def _read_index(self):
        """Load the index into keys / row_of / crc; False (with a warning if it existed) when it cannot be trusted."""
        if not os.path.exists(self.index_path):
            return False
        try:
            keys, row_of, crc, data_name = self._parse_index()
        except Exception as e:  # noqa: BLE001 -- whatever the damage, the index is not trusted
            self.warn(f"feature cache {self.folder} is damaged ({e}); rebuilding it")
            return False
        self.data_name = data_name
        self._set_rows(keys, crc, row_of)
        return True

    def _parse_index(self):
        with np.load(self.index_path, allow_pickle=False) as z:
            meta, blob, crc = json.loads(z["meta"].tobytes()), z["keys"], z["crc"]
        if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION or meta.get("dim") != self.dim:
            raise ValueError(f"index of another version or feature size: {str(meta)[:80]}")
        data_name = meta.get("data")
        if not isinstance(data_name, str) or not DATA_NAME.fullmatch(data_name):
            raise ValueError(f"index names no valid data file: {str(data_name)[:80]}")
        if blob.dtype != np.uint8 or blob.ndim != 1 or crc.dtype != np.int64 or crc.ndim != 2 or crc.shape[1] != 2:
            raise ValueError("index arrays of the wrong type or shape")
        n = len(crc)
        keys = decode_keys(blob, n)
        row_of = dict(zip(keys, range(n)))  # most of the time of reading an index at 1M rows (~1 s)
        if len(keys) != n or len(row_of) != n:
            raise ValueError(f"{len(keys)} keys for {n} rows, or a key twice")
        if n and (crc.min() < -1 or crc.max() >= 2**32 or crc[:, 0].min() < 0):
            raise ValueError("checksums out of range")
        size = os.path.getsize(os.path.join(self.folder, data_name))
        if size < n * self.row_bytes:
            raise ValueError(f"its data file holds {size // self.row_bytes} of the {n} indexed rows")
        return keys, row_of, np.array(crc), data_name

    def _new_data_file(self):
        """Start over in a new, empty data file, switch the index to it, and unlink the old one: a run that has
        the old file mapped keeps reading it (the inode lives until it is unmapped), where truncating it would
        kill that run with SIGBUS."""
        old = getattr(self, "data_name", None)
        self.data_name = f"features-{secrets.token_hex(8)}.f32"
        self._set_rows([], np.zeros((0, 2), dtype=np.int64))
        try:
            open(self.data_path, "xb").close()
        except OSError as e:
            raise disk_error(self.data_path, e, hint=CACHE_HINT) from e
        self.write_index()
        if old:
            self._unlink(old)

    def _remove_stale_files(self):
        """Data files no index names (left by a rebuild that crashed, or by a damaged index) and temporary
        index files of crashed runs: under the lock, no run is writing them."""
        for name in os.listdir(self.folder):
            if (name.startswith("features-") and name != self.data_name) or name.startswith("index.npz.tmp"):
                self._unlink(name)

    def _unlink(self, name):
        try:
            os.remove(os.path.join(self.folder, name))
        except OSError:  # already gone, or not ours to remove: it only costs disk space
            pass

    def close(self):
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()

    def lookup(self, keys):
        """(row of each key or -1 where missing, whether its mirror view is stored). If any stored view fails
        its checksum the whole cache is treated as damaged and rebuilt: one bad row says the file cannot be
        trusted."""
        rows = np.full(len(keys), -1, dtype=np.int64)
        mirrored = np.zeros(len(keys), dtype=bool)
        if not self.keys:
            return rows, mirrored
        data = self.array()
        for i, key in enumerate(keys):
            row = self.row_of.get(key)
            if row is None:
                continue
            crc0, crc1 = self._crc[row].tolist()
            if zlib.crc32(data[row, 0]) != crc0 or (crc1 >= 0 and zlib.crc32(data[row, 1]) != crc1):
                self.warn(f"feature cache {self.folder} is damaged (checksum of {key.split('|')[0]}); rebuilding it")
                del data
                self._new_data_file()
                return np.full(len(keys), -1, dtype=np.int64), np.zeros(len(keys), dtype=bool)
            rows[i], mirrored[i] = row, crc1 >= 0
        return rows, mirrored

    def _write_rows(self, pieces):
        """Write each (offset, float32 array) of pieces into the data file and sync; a full disk, quota or
        read-only folder is one UserError that says the rows stored before are kept."""
        try:
            fd = os.open(self.data_path, os.O_WRONLY)
            try:
                for offset, array in pieces:
                    view = memoryview(array).cast("B")
                    while view:
                        written = os.pwrite(fd, view, offset)
                        view, offset = view[written:], offset + written
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            if disk_error(self.data_path, e) is e:
                raise
            # Index what this run stored before the failure, so the next run need not extract it again. An
            # append's partial bytes lie past every indexed row, where no run has the file mapped: cut them off,
            # which may leave just the room the index needs.
            if pieces[0][0] >= len(self.keys) * self.row_bytes:
                with contextlib.suppress(OSError):
                    os.truncate(self.data_path, pieces[0][0])
            try:
                self.write_index()
                kept = f"the {len(self.keys)} feature rows stored before are kept"
            except UserError:
                kept = "the feature rows indexed before are kept"
            needed = sum(array.nbytes for _, array in pieces)
            raise disk_error(self.data_path, e, needed=needed, hint=f"{CACHE_HINT} ({kept})") from e

    def append(self, keys, features, write_index=True):
        """Store features (n, V, D) for keys, V = 2 (as is, mirrored) or 1 (as is only); returns their rows."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        mirrored = features.shape[1] == 2
        if not mirrored:
            features = np.concatenate([features, np.zeros_like(features)], axis=1)
        start, end = len(self.keys), len(self.keys) + len(keys)
        self._write_rows([(start * self.row_bytes, features)])  # past the indexed rows: over a crashed run's
        if end > len(self._crc):  # grown by doubling: appends cost O(1) each, also at 1M rows
            self._crc = np.concatenate([self._crc, np.zeros((max(end, 2 * len(self._crc)) - len(self._crc), 2),
                                                            dtype=np.int64)])
        for row, feature in enumerate(features, start):
            self._crc[row] = zlib.crc32(feature[0]), zlib.crc32(feature[1]) if mirrored else -1
        for row, key in enumerate(keys, start):
            self.row_of[key] = row
        self.keys.extend(keys)
        if write_index:
            self.write_index()
        return np.arange(start, end)

    def add_mirror(self, keys, features, write_index=True):
        """Write the mirror view (n, D) into the stored rows of keys: bytes no run reads while the index says
        the row has no mirror view. Its checksum enters the index only after the bytes are on disk, so a crash in
        between leaves the view unused, not trusted."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        rows = [self.row_of[key] for key in keys]
        self._write_rows([(row * self.row_bytes + self.row_bytes // 2, f) for row, f in zip(rows, features)])
        for row, feature in zip(rows, features):
            self._crc[row, 1] = zlib.crc32(feature)
        if write_index:
            self.write_index()

    def write_index(self):
        meta = json.dumps({"version": CACHE_VERSION, "dim": self.dim, "data": self.data_name}).encode()
        arrays = {"meta": np.frombuffer(meta, dtype=np.uint8), "keys": encode_keys(self.keys), "crc": self.crc}

        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: given a name, np.savez would append ".npz" to it
                np.savez(f, **arrays)

        atomic_write(self.index_path, write, size=sum(a.nbytes for a in arrays.values()), hint=CACHE_HINT)

    def array(self):
        """The indexed rows, memory-mapped read-only (rows past them may be a crashed run's and are not shown)."""
        n = len(self.keys)
        if n == 0:
            return np.zeros((0, 2, self.dim), dtype=np.float32)
        return np.memmap(self.data_path, dtype=np.float32, mode="r", shape=(n, 2, self.dim))


def folded_backbone(model):
    model.eval()  # the backbone's BatchNorm must use, never update, its running statistics
    return fold_batchnorm(model.backbone).to(memory_format=torch.channels_last)


def extract(model, paths, *, image_size, mean, std, batch_size, num_workers, device, amp, views=(0, 1),
            backbone=None):
    """Yield (indices, features (b, len(views), D), errors) over paths: view 0 as is, view 1 mirrored.
    backbone: folded_backbone(model), from a caller that extracts more than once (folding traces the model:
    0.1-0.3 s, more than a small extraction)."""
    dataset = ImageDataset(paths, None, eval_transform(image_size, mean, std))
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, device=device)
    backbone = folded_backbone(model) if backbone is None else backbone
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


def shared_extract(model, paths, **settings):
    """extract() over every rank's share of paths, in step: rank 0 yields each round's batches of all ranks
    (indices into paths), the other ranks yield nothing. One process: extract() itself. A rank's share is every
    world_size-th batch of the one-process run, from its rank-th, so each batch holds the same images as there
    (and its features are bitwise the same on the same device)."""
    if not distributed.active():
        yield from extract(model, paths, **settings)
        return
    batches, rounds = distributed.shard_batches(len(paths), settings["batch_size"])
    mine = np.concatenate(batches + [np.zeros(0, dtype=np.int64)])
    batches = extract(model, [paths[i] for i in mine], **settings)
    for _ in range(rounds):
        indices, features, errors = next(batches, (np.zeros(0, dtype=np.int64), None, []))
        piece = (mine[indices], features, [(int(mine[i]), message) for i, message in errors])
        pieces = [None] * distributed.world_size() if distributed.is_main() else None
        torch.distributed.gather_object(piece, pieces, dst=0)
        for indices, features, errors in pieces or []:
            if len(indices) or errors:
                yield indices, features, errors


def shared_array(store, folder, dim, *, copy):
    """The store's rows on every rank: rank 0's memory map, read by the other ranks from the same file where they
    see it whole (a shared filesystem), else sent to them by rank 0 (and always for a temporary store)."""
    data = store.array() if store else None
    if copy and store:
        data = np.array(data)
    if not distributed.active():
        return data
    name, n = distributed.broadcast((store.data_name, len(store.keys)) if store else None)
    path = os.path.join(folder, name)
    seen = not copy and (store is not None or (os.path.exists(path) and os.path.getsize(path) >= n * 2 * dim * 4))
    if distributed.all_sum([not seen])[0]:
        return distributed.broadcast(np.asarray(data) if store else None)
    if store or not n:
        return data if store else np.zeros((0, 2, dim), dtype=np.float32)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n, 2, dim))


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

    def should_stop():  # under torchrun every rank extracts in step with the others to the end
        return stop is not None and stop.requested and not distributed.active()

    dim = model.feature_dim
    mirror = np.ones(len(paths), dtype=bool) if mirror is None else np.asarray(mirror, dtype=bool)
    temporary = tempfile.mkdtemp(prefix="features-") if cache_dir is None else None
    folder = temporary or os.path.join(cache_dir, fingerprint(model, backbone_name=backbone, image_size=image_size,
                                                                     mean=mean, std=std, amp=amp))
    # Under torchrun only rank 0 opens the store (reads, writes, locks it): the other ranks extract their share and
    # send it to rank 0 through the process group, so no lock and no file is shared between processes.
    store = FeatureStore(folder, dim, warn=warn) if distributed.is_main() else None
    try:
        keys = [image_key(p) for p in paths]
        rows, mirrored = distributed.broadcast(store.lookup(keys) if store else None)
        # One file under two names (`a.jpg`, `./a.jpg`) is one image: the first name stands for both.
        first = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
            mirror[first[k]] |= mirror[i]
        unique = np.array([first[k] == i for i, k in enumerate(keys)], dtype=bool)
        jobs = [  # (indices into paths, views to compute, how to store them: rank 0's store only)
            (np.flatnonzero(unique & (rows < 0) & mirror), (0, 1), store and store.append),
            (np.flatnonzero(unique & (rows < 0) & ~mirror), (0,), store and store.append),
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
            started = time.time()
            _extract_into(store, jobs, model=model, paths=paths, keys=keys, rows=rows, ok=ok, report=report,
                          should_stop=should_stop, image_size=image_size, mean=mean, std=std, batch_size=batch_size,
                          num_workers=num_workers, device=device, amp=amp)
            elapsed = time.time() - started
            log(f"extracted in {elapsed:.1f}s ({forwards / max(elapsed, 1e-9):.1f} forwards/s)")
        if distributed.active():
            rows, ok = distributed.broadcast((rows, ok) if store else None)
        for i, k in enumerate(keys):
            rows[i], ok[i] = rows[first[k]], ok[first[k]]
        data = shared_array(store, folder, dim, copy=bool(temporary))
        ok &= rows >= 0
        return data, rows, ok
    finally:
        if store:
            store.close()
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


def _extract_into(store, jobs, *, model, paths, keys, rows, ok, report, should_stop, **settings):
    """Run the extraction jobs (indices into paths, views, store function), storing every batch as it comes and
    the index every 30 s, so an interrupted extraction keeps what it did. Fills rows and ok in place."""
    last_index_write = time.time()
    bar = Progress(sum(len(todo) for todo, _, _ in jobs), "extract")
    if any(len(todo) for todo, _, _ in jobs):
        settings["backbone"] = folded_backbone(model)  # once for every job
    for todo, views, store_fn in jobs:
        if not len(todo) or should_stop():
            continue
        for indices, features, errors in shared_extract(model, [paths[i] for i in todo], views=views, **settings):
            for i, message in errors:
                ok[todo[i]] = False
                report.warn("unreadable image", f"{message}; skipped")
            if features is not None:
                batch_keys = [keys[todo[i]] for i in indices]
                if store_fn is None:
                    store.add_mirror(batch_keys, features[:, 0], write_index=False)
                else:
                    rows[todo[indices]] = store_fn(batch_keys, features, write_index=False)
            if time.time() - last_index_write > 30:
                store.write_index()
                last_index_write = time.time()
            bar(len(indices) + len(errors))
            if should_stop():
                break
    bar.close()
    if store:  # rank 0's (distributed.py): the other ranks sent it their features
        store.write_index()

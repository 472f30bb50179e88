"""The feature cache's index at 10k, 100k and 1M images: write and read time, size on disk, before and now.

    python benchmarks/bench_cache_index.py                 # 10k, 100k, 1M keys (about a minute, 2 cores)
    python benchmarks/bench_cache_index.py --sizes 10000   # a quick look that it runs

"before" is the version-2 index (index.json: a dict of "path|size|mtime_ns" -> [row, crc0, crc1], written with
json.dump and read with json.load plus its checks), reimplemented here as it was. "now" is FeatureStore itself:
write_index (index.npz: NUL-joined keys and an n x 2 int64 checksum array, written atomically and synced) and
opening the store (lock, read, every check of feature_cache.FeatureStore._parse_index, the key -> row dict). The
data file is a sparse file of the right size (ResNet50 rows, 16 KiB each), so 1M rows take no disk. Keys look
like iMaterialist's: an absolute path of ~45 characters plus size and modification time. Best of --repeat runs.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_lines, table  # noqa: E402

import feature_cache  # noqa: E402

DIM = 2048  # ResNet50


def make_keys(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(20_000, 400_000, n)
    return [f"/data/imaterialist/train/{i:08d}.jpg|{s}|{1_700_000_000_000_000_000 + i * 977}"
            for i, s in enumerate(sizes.tolist())]


def json_write(path, keys, crc):
    """Version 2: {"version", "dim", "rows": {key: [row, crc0, crc1 or null]}}, via a temporary file and a rename."""
    rows = {k: [i, int(c0), None if c1 < 0 else int(c1)] for i, (k, (c0, c1)) in enumerate(zip(keys, crc.tolist()))}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"version": 2, "dim": DIM, "rows": rows}, f)
    os.replace(tmp, path)


def json_read(path, data_path):
    with open(path) as f:
        index = json.load(f)
    rows = index["rows"]
    ok = (index["version"] == 2 and index["dim"] == DIM
          and os.path.getsize(data_path) >= len(rows) * 2 * DIM * 4
          and sorted(r for r, _, _ in rows.values()) == list(range(len(rows))))
    assert ok
    return {k: list(v) for k, v in rows.items()}


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(n, repeat, scratch):
    keys = make_keys(n)
    crc = np.random.default_rng(1).integers(0, 2**32, (n, 2), dtype=np.int64)
    crc[::10, 1] = -1  # validation images: no mirror view
    folder = os.path.join(scratch, f"n{n}")

    store = feature_cache.FeatureStore(folder, DIM, warn=print)
    os.truncate(store.data_path, n * store.row_bytes)  # sparse: the right size, no disk used
    store._set_rows(keys, crc)
    now_write = best(store.write_index, repeat)
    store.close()
    now_size = os.path.getsize(store.index_path)

    def now_open():
        s = feature_cache.FeatureStore(folder, DIM, warn=print)
        assert len(s.keys) == n
        s.close()

    now_read = best(now_open, repeat)

    json_path = os.path.join(folder, "index.json")
    before_write = best(lambda: json_write(json_path, keys, crc), repeat)
    before_size = os.path.getsize(json_path)
    before_read = best(lambda: json_read(json_path, store.data_path), repeat)
    os.remove(json_path)
    os.remove(store.data_path)
    return [f"{n:,}", f"{before_write:.2f}", f"{before_read:.2f}", f"{before_size / 1e6:.1f}",
            f"{now_write:.2f}", f"{now_read:.2f}", f"{now_size / 1e6:.1f}",
            f"{before_write / now_write:.1f}x / {before_read / now_read:.1f}x"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    print("\n".join(machine_lines()))
    with tempfile.TemporaryDirectory(prefix="bench-index-", dir=".") as scratch:
        rows = [measure(n, args.repeat, scratch) for n in args.sizes]
    print()
    print(table(["images", "before: write s", "read s", "MB", "now: write s", "open s", "MB",
                 "faster (write / read)"], rows))


if __name__ == "__main__":
    main()

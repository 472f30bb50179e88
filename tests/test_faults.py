"""Faults made to happen for real: a full disk (a small tmpfs), a read-only folder, two runs on one cache with a
forced rebuild while one of them trains from its memory map, crafted cache files, Ctrl-C with loader workers.
None of them may lose what was already safe or end in a traceback (utils.atomic_write, feature_cache.FeatureStore,
train.write_pending, utils.StopFlag)."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import feature_cache
import train
import utils
from conftest import FAST, ROOT
from model import save_checkpoint
from utils import UserError

DIM = 256  # 2 KiB a row: crafted caches need no model
ROW_BYTES = 2 * DIM * 4


@contextlib.contextmanager
def tmpfs(folder, size="2m", read_only=False):
    """A real filesystem of `size` at folder (root only; skipped otherwise), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    os.makedirs(folder, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield str(folder)
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path / "small") as folder:
        yield folder


def fill(folder, leave):
    """Take all but about `leave` bytes of the filesystem of folder."""
    free = utils.free_space(os.path.join(folder, "x"))
    with open(os.path.join(folder, "filler"), "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


# ---- a full disk ----

def test_a_write_that_does_not_fit_is_one_error_and_leaves_the_old_file(small_disk):
    path = os.path.join(small_disk, "metrics.json")
    utils.write_json(path, {"old": 1})
    with pytest.raises(UserError) as e:
        utils.atomic_write(path, b"x" * 3_000_000)
    message = str(e.value)
    assert message.startswith(f"{path}: cannot write it: no space left on the device")
    assert "3.0 MB needed" in message and "free" in message
    assert json.load(open(path)) == {"old": 1}
    assert os.listdir(small_disk) == ["metrics.json"]  # no temporary file


def test_a_checkpoint_that_does_not_fit_is_one_error_not_a_torch_traceback(small_disk):
    path = os.path.join(small_disk, "model.pth")
    with pytest.raises(UserError, match="model.pth: cannot write it: no space left on the device"):
        save_checkpoint({"weights": torch.zeros(1_000_000)}, path)  # 4 MB
    assert os.listdir(small_disk) == []


def test_the_message_without_a_real_disk(tmp_path):
    # The same message where no tmpfs can be mounted: the errno is what counts.
    def full(tmp):
        open(tmp, "w").write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match=r"out\.txt: cannot write it: no space left on the device \(.* free\)"):
        utils.atomic_write(str(tmp_path / "out.txt"), full)
    assert os.listdir(tmp_path) == []
    with pytest.raises(UserError, match="Read-only file system; give another"):
        utils.atomic_write(str(tmp_path / "a"), lambda tmp: (_ for _ in ()).throw(OSError(30, "Read-only file system")),
                           hint="give another")


def train_argv(tiny_set, out, cache, *extra):
    labels, images = tiny_set
    return [*FAST, "--backbone", "mobilenet_v3_large", "--labels", labels, "--images", images,
            "--out", os.path.join(out, "model.pth"), "--curve", os.path.join(out, "curve.png"),
            "--cache-dir", cache, "--epochs", "2", "--patience", "0", *extra]


def train_in_process(capsys, argv):
    capsys.readouterr()
    code = train.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_training_onto_a_full_disk_names_every_checkpoint_not_written(tiny_set, tmp_path, small_disk, capsys):
    # The cached path keeps its checkpoints in memory and writes them at the end (train.write_pending).
    code, _, err = train_in_process(capsys, train_argv(tiny_set, small_disk, str(tmp_path / "cache")))
    assert code == 2, err
    error = one_error_line(err)
    assert "2 of 2 checkpoints of this run not written" in error
    for name in ("model.pth", "model_last.pth"):
        assert f"{os.path.join(small_disk, name)}: cannot write it: no space left on the device" in error
    assert "needed" in error
    assert os.listdir(small_disk) == []


def test_a_cache_on_a_full_disk_keeps_the_rows_stored_before(tiny_set, tmp_path, small_disk, capsys):
    cache = os.path.join(small_disk, "cache")
    fill(small_disk, leave=100_000)  # room for one batch of 8 (mobilenet: 7.5 KiB a row), not two
    code, _, err = train_in_process(capsys, train_argv(tiny_set, str(tmp_path / "out"), cache))
    assert code == 2, err
    error = one_error_line(err)
    assert "error: " + cache in error and ".f32: cannot write it: no space left on the device" in error
    assert "needed" in error and "the 8 feature rows stored before are kept" in error
    (folder,) = os.listdir(cache)
    assert not [n for n in os.listdir(os.path.join(cache, folder)) if ".tmp" in n]

    os.remove(os.path.join(small_disk, "filler"))
    code, out, err = train_in_process(capsys, train_argv(tiny_set, str(tmp_path / "out"), cache))
    assert code == 0, err
    assert "feature cache: 8 of 24 images found" in out
    assert "warning" not in err


def test_a_store_that_fills_the_disk_keeps_every_row_it_indexed(small_disk):
    warnings = []
    store = feature_cache.FeatureStore(os.path.join(small_disk, "f"), DIM, warn=warnings.append)
    rng, stored = np.random.default_rng(0), {}
    with pytest.raises(UserError, match="cannot write it: no space left on the device") as e:
        for batch in range(10_000):
            features = rng.standard_normal((16, 2, DIM)).astype(np.float32)
            keys = [f"img{batch}_{i}" for i in range(16)]
            store.append(keys, features, write_index=False)  # the index is written only when the disk fills
            stored.update(zip(keys, features))
    store.close()
    assert f"the {len(stored)} feature rows stored before are kept" in str(e.value)
    assert len(stored) > 100
    store = feature_cache.FeatureStore(os.path.join(small_disk, "f"), DIM, warn=warnings.append)
    rows, mirrored = store.lookup(list(stored))
    assert (rows >= 0).all() and mirrored.all() and warnings == []
    np.testing.assert_array_equal(store.array()[rows], np.stack(list(stored.values())))
    store.close()


# ---- a read-only folder ----

def test_a_read_only_cache_folder_is_named_before_training(tiny_set, tmp_path):
    with tmpfs(tmp_path / "ro", size="1m", read_only=True) as ro:
        for cache, says in [(ro, f"the feature cache folder {ro} is not writable"),
                            (os.path.join(ro, "cache"), f"the feature cache folder {os.path.join(ro, 'cache')} "
                                                        "cannot be created (Read-only file system)")]:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                assert train.main(train_argv(tiny_set, str(tmp_path / "out"), cache)) == 2
            assert one_error_line(err.getvalue()) == f"error: {says}; give another --cache-dir or use --no-cache"
        with pytest.raises(UserError, match=f"{ro}/m.pth: cannot write it: Read-only file system"):
            utils.write_json(os.path.join(ro, "m.pth"), {})


# ---- two runs on one cache: a rebuild while the other trains from its memory map ----

TRAINER = """
import sys
import numpy as np, torch
import feature_cache
from data_loader import FeatureBatches
folder, dim, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = feature_cache.FeatureStore(folder, dim)
rows, mirrored = store.lookup([f"k{i}" for i in range(n)])
assert (rows >= 0).all() and mirrored.all()
data = store.array()
store.close()  # as cached_features does: the lock is let go, the memory map stays
print("mapped", flush=True)
sys.stdin.readline()  # meanwhile, another run rebuilds the cache
batches = FeatureBatches(data, rows, np.arange(n), torch.zeros(n, 1), batch_size=8, shuffle=True, seed=0)
head, total = torch.nn.Linear(dim, 1), 0.0
for epoch in range(3):
    batches.set_epoch(epoch)
    for _, x, y in batches:
        head(x).sum().backward()
print(float(np.asarray(data, dtype=np.float64).sum()), flush=True)
"""


def damage_index_file(folder):
    with open(os.path.join(folder, "index.npz"), "wb") as f:
        f.write(b"not an index")


def damage_a_checksum(folder):
    index = dict(np.load(os.path.join(folder, "index.npz")))
    index["crc"][3, 0] ^= 1
    with open(os.path.join(folder, "index.npz"), "wb") as f:
        np.savez(f, **index)


@pytest.mark.parametrize("damage", [damage_index_file, damage_a_checksum])
def test_a_rebuild_by_another_run_never_takes_the_features_a_run_trains_on(tmp_path, damage):
    folder, n = str(tmp_path / "cache"), 64
    first = np.random.default_rng(0).standard_normal((n, 2, DIM)).astype(np.float32)
    store = feature_cache.FeatureStore(folder, DIM)
    store.append([f"k{i}" for i in range(n)], first)
    old_data = store.data_path
    store.close()

    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, folder, str(DIM), str(n)], cwd=ROOT,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline().strip() == "mapped", trainer.stderr.read()
        damage(folder)
        warnings = []
        store = feature_cache.FeatureStore(folder, DIM, warn=warnings.append)
        rows, _ = store.lookup([f"k{i}" for i in range(n)])
        assert (rows < 0).all() and len(warnings) == 1 and "damaged" in warnings[0]
        store.append([f"k{i}" for i in range(n)], -first)  # the rebuilt cache, with other numbers
        assert store.data_path != old_data and not os.path.exists(old_data)
        store.close()
        out, err = trainer.communicate("go\n", timeout=60)
    finally:
        trainer.kill()
    assert trainer.returncode == 0, f"exit {trainer.returncode} (-7: SIGBUS, 135 in a shell)\n{err}"
    assert float(out) == pytest.approx(float(first.astype(np.float64).sum()), rel=1e-9)  # its own features


# ---- crafted cache files: detected, rebuilt with a warning, never trusted, never fatal ----

def write_index(folder, **arrays):
    with open(os.path.join(folder, "index.npz"), "wb") as f:
        np.savez(f, **arrays)


def index_of(folder):
    with np.load(os.path.join(folder, "index.npz")) as z:
        return {k: z[k] for k in z.files}


def with_meta(meta):
    def craft(folder):
        write_index(folder, **dict(index_of(folder), meta=np.frombuffer(json.dumps(meta).encode(), np.uint8)))
    return craft


def with_array(name, value):
    def craft(folder):
        arrays = index_of(folder)
        arrays[name] = value(arrays)
        if arrays[name] is None:
            del arrays[name]
        write_index(folder, **arrays)
    return craft


def truncate(name, keep):
    def craft(folder):
        (path,) = [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(name)]
        os.truncate(path, int(os.path.getsize(path) * keep))
    return craft


def data_named(name):
    def craft(folder):
        meta = json.loads(index_of(folder)["meta"].tobytes())
        with_meta(dict(meta, data=name))(folder)
    return craft


CRAFTS = {
    "meta: a JSON list": with_meta([]),
    "meta: a JSON string": with_meta("index"),
    "meta: null": with_meta(None),
    "meta: no dim": with_meta({"version": feature_cache.CACHE_VERSION}),
    "meta: dim as a string": with_meta({"version": feature_cache.CACHE_VERSION, "dim": str(DIM)}),
    "meta: wrong dims": with_meta({"version": feature_cache.CACHE_VERSION, "dim": DIM * 2}),
    "meta: not JSON": with_array("meta", lambda a: np.frombuffer(b"\xff{", np.uint8)),
    "data file outside the folder": data_named("../features-0000000000000000.f32"),
    "data file name a number": data_named(7),
    "no keys array": with_array("keys", lambda a: None),
    "keys of the wrong type": with_array("keys", lambda a: a["keys"].astype(np.int64)),
    "a key twice": with_array("keys", lambda a: np.frombuffer(a["keys"].tobytes().replace(b"k1\0", b"k0\0"), np.uint8)),
    "fewer keys than rows": with_array("crc", lambda a: np.concatenate([a["crc"], a["crc"][:1]])),
    "checksums 1-D": with_array("crc", lambda a: a["crc"].ravel()),
    "checksums as floats": with_array("crc", lambda a: a["crc"].astype(np.float64)),
    "checksums out of range": with_array("crc", lambda a: a["crc"] + 2**33),
    "an object array (pickle)": with_array("crc", lambda a: np.array([None, {"a": 1}], dtype=object)),
    "index truncated": truncate("index.npz", 0.5),
    "index empty": truncate("index.npz", 0),
    "data file truncated": truncate("features-", 0.9),
}


@pytest.mark.parametrize("craft", list(CRAFTS))
def test_a_crafted_cache_file_is_rebuilt_with_one_warning(tmp_path, craft):
    folder = str(tmp_path / "cache")
    features = np.random.default_rng(1).standard_normal((4, 2, DIM)).astype(np.float32)
    store = feature_cache.FeatureStore(folder, DIM)
    store.append([f"k{i}" for i in range(4)], features)
    store.close()
    CRAFTS[craft](folder)

    warnings = []
    store = feature_cache.FeatureStore(folder, DIM, warn=warnings.append)
    assert len(warnings) == 1 and "is damaged" in warnings[0] and "rebuilding it" in warnings[0]
    assert store.keys == [] and len(store.array()) == 0
    store.append(["k0"], features[:1])
    store.close()
    assert sorted(n for n in os.listdir(folder) if n.startswith("features-")) == [os.path.basename(store.data_path)]

    warnings = []
    store = feature_cache.FeatureStore(folder, DIM, warn=warnings.append)  # whole again: trusted, silently
    rows, _ = store.lookup(["k0", "k1"])
    assert rows.tolist() == [0, -1] and warnings == []
    np.testing.assert_array_equal(store.array()[0], features[0])
    store.close()


# ---- Ctrl-C with loader workers ----

def test_ctrl_c_in_a_worker_process_says_nothing(monkeypatch, capsys):
    flag = utils.StopFlag()
    try:
        monkeypatch.setattr(os, "getpid", lambda: flag.pid + 1)  # as in a forked DataLoader worker
        flag._handle(signal.SIGINT, None)
        assert not flag.requested and capsys.readouterr().err == ""
        monkeypatch.undo()
        flag._handle(signal.SIGINT, None)
        assert flag.requested and capsys.readouterr().err.count("interrupted") == 1
    finally:
        flag.restore()


def test_ctrl_c_to_the_whole_process_group_prints_interrupted_once(tiny_set, tmp_path):
    # The terminal sends Ctrl-C to every process of the group: the main process and its 2 loader workers.
    argv = train_argv(tiny_set, str(tmp_path / "out"), str(tmp_path / "cache"), "--augment", "strong")
    argv[argv.index("--num-workers") + 1], argv[argv.index("--epochs") + 1] = "2", "50"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in process.stdout:
            if line.startswith("epoch   1/50"):
                time.sleep(0.5)  # the next epoch's workers are running
                os.killpg(process.pid, signal.SIGINT)
                break
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert err.count("interrupted") == 1 and "Traceback" not in err, err

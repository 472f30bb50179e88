"""feature_cache.py: cached head inputs equal the full model's, the disk cache is reused, and damage is rebuilt."""
import contextlib
import copy
import functools
import io
import json
import math
import os
import re
import tempfile
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import feature_cache
import make_sample
import train
from conftest import FAST
from dataset import IMAGENET_MEAN, IMAGENET_STD, eval_transform, load_image
from model import build_model
from utils import Report

SIZE = 64
N = 5
# The cheapest backbone, with its packaged (offline) ImageNet weights: random-init efficientnet and mobilenet
# features are ~1e-10, which would make any two feature vectors "allclose".
BACKBONE = "efficientnet_lite0"


@functools.lru_cache(maxsize=None)
def _model(backbone, seed, image_size):
    torch.manual_seed(seed)
    if backbone != BACKBONE:
        return build_model(backbone, 4, "none", image_size=image_size).eval()
    m = build_model(backbone, 4, "imagenet", image_size=image_size).eval()
    with torch.no_grad():  # another seed, other backbone weights
        for p in m.backbone.parameters():
            p.mul_(1 + 0.05 * torch.rand(p.shape))
    return m


def make_model(backbone=BACKBONE, seed=0, image_size=SIZE):
    """A fresh copy (extract() moves the model to channels_last and eval) of the model of that seed."""
    return copy.deepcopy(_model(backbone, seed, image_size))


@pytest.fixture(scope="module", autouse=True)
def _free_models(one_thread):
    yield
    _model.cache_clear()


class Calls(Report):
    """What cached_features reports, recorded: warnings as (reason, message, fatal), log lines, progress."""

    def __init__(self):
        super().__init__(stream=io.StringIO())
        self.warnings, self.logs, self.progress_done = [], [], 0

    def warn(self, reason, message, fatal=True):
        self.warnings.append((reason, message, fatal))

    @contextlib.contextmanager
    def recording(self):
        calls = self

        class Bar:
            def __init__(self, total, label):
                pass

            def __call__(self, n=1, note=""):
                calls.progress_done += n

            def close(self):
                pass

        with mock.patch.object(feature_cache, "log", self.logs.append), \
                mock.patch.object(feature_cache, "Progress", Bar):
            yield


def run_cached(model, paths, cache_dir, calls, image_size=SIZE, batch_size=4, backbone=BACKBONE, mirror=None):
    with calls.recording():
        return feature_cache.cached_features(
            model, paths, backbone=backbone, image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            cache_dir=cache_dir, batch_size=batch_size, num_workers=0, device=torch.device("cpu"), amp=False,
            report=calls, mirror=mirror)


@pytest.fixture
def extracted(monkeypatch):
    """Every path feature_cache.extract is asked to run through the backbone, in order."""
    seen = []
    real = feature_cache.extract

    def counting(model, paths, *args, **kwargs):
        seen.extend(paths)
        return real(model, paths, *args, **kwargs)

    monkeypatch.setattr(feature_cache, "extract", counting)
    return seen


@pytest.fixture
def paths(tmp_path):
    folder = tmp_path / "images"
    make_sample.generate(N, str(folder), str(tmp_path / "labels.txt"), seed=3, na_rate=0.0)
    return sorted(str(p) for p in folder.iterdir())


def cached(model, paths, cache_dir, calls=None, image_size=SIZE, batch_size=4, backbone=BACKBONE):
    data, rows, ok = run_cached(model, paths, cache_dir, calls or Calls(), image_size, batch_size, backbone)
    return np.array(data[rows[ok]]), rows, ok  # (n_ok, 2, D), copied out of the memmap


def full_logits(model, paths):
    """The full model's logits (n, 2, K) of each image as is and mirrored, in one batch."""
    images = [load_image(p) for p in paths]
    images += [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images]
    with torch.no_grad():
        logits = model(torch.stack([eval_transform(SIZE)(im) for im in images]))
    return logits.view(2, len(paths), -1).transpose(0, 1)


def assert_features_of(model, paths, features):
    """features (n, 2, D) give, through the head, the full model's logits of each image and of its mirror."""
    assert features.shape == (len(paths), 2, model.head.in_features)
    with torch.no_grad():
        from_cache = model.head(torch.from_numpy(np.ascontiguousarray(features)))
    torch.testing.assert_close(from_cache, full_logits(model, paths), atol=1e-4, rtol=1e-4)


def fingerprint_folders(cache_dir):
    return sorted(os.listdir(cache_dir))


def data_file(folder):
    """The one data file of a cache folder (a rebuild starts a new one under another name)."""
    (name,) = [n for n in os.listdir(folder) if n.startswith("features-") and n.endswith(".f32")]
    return os.path.join(folder, name)


def read_index(folder):
    with np.load(os.path.join(folder, "index.npz")) as z:
        return {name: z[name] for name in z.files}


# ---- the two paths agree ----

@pytest.mark.parametrize("backbone", ["resnet50", BACKBONE])
def test_cached_features_through_the_head_equal_the_full_model(tmp_path, paths, backbone):
    m = make_model(backbone)
    features, rows, ok = cached(m, paths[:2], str(tmp_path / "cache"), backbone=backbone)
    assert ok.all() and sorted(rows.tolist()) == [0, 1]
    # Features big enough that a wrong image, view or normalization could not pass for right.
    assert np.abs(features).mean() > 0.1
    # The views differ (the images are not symmetric), so view 1 really is the mirror image.
    assert not np.allclose(features[:, 0], features[:, 1], atol=1e-3)
    assert not np.allclose(features[0], features[1], atol=1e-3)
    assert_features_of(make_model(backbone), paths[:2], features)  # a model extract() has not touched


# ---- the disk cache is reused, and only what changed is extracted again ----

def test_second_run_extracts_nothing_and_returns_the_same_features(tmp_path, paths, extracted):
    m, cache_dir = make_model(), str(tmp_path / "cache")
    first_calls, second_calls = Calls(), Calls()
    first, _, _ = cached(m, paths, cache_dir, first_calls)
    assert extracted == paths
    assert first_calls.progress_done == N
    assert any(f"0 of {N} images found" in line for line in first_calls.logs)
    del extracted[:]
    second, _, ok = cached(m, paths, cache_dir, second_calls)
    assert extracted == []
    assert any(f"{N} of {N} images found" in line for line in second_calls.logs)
    assert not any("extracting" in line for line in second_calls.logs)
    assert ok.all()
    np.testing.assert_array_equal(second, first)
    assert first_calls.warnings == second_calls.warnings == []
    assert len(fingerprint_folders(cache_dir)) == 1


def test_a_touched_image_is_extracted_again_alone(tmp_path, paths, extracted):
    m, cache_dir = make_model(), str(tmp_path / "cache")
    first, _, _ = cached(m, paths, cache_dir)
    st = os.stat(paths[2])
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    del extracted[:]
    second, _, _ = cached(m, paths, cache_dir)
    assert extracted == [paths[2]]
    np.testing.assert_allclose(second, first, atol=1e-5)


def test_a_rewritten_image_gets_the_new_pictures_features(tmp_path, paths, extracted):
    m, cache_dir = make_model(), str(tmp_path / "cache")
    cached(m, paths, cache_dir)
    # Same name, other picture: the mirror image, saved again (new size and modification time).
    image = load_image(paths[1]).transpose(Image.FLIP_LEFT_RIGHT)
    image.save(paths[1], quality=70)
    del extracted[:]
    second, _, _ = cached(m, paths, cache_dir)
    assert extracted == [paths[1]]
    assert_features_of(make_model(), paths, second)


def test_other_weights_or_image_size_use_another_fingerprint_folder(tmp_path, paths, extracted):
    cache_dir = str(tmp_path / "cache")
    cached(make_model(seed=0), paths[:2], cache_dir)
    assert len(fingerprint_folders(cache_dir)) == 1
    del extracted[:]
    other, _, _ = cached(make_model(seed=1), paths[:2], cache_dir)  # other random weights
    assert extracted == paths[:2]
    assert len(fingerprint_folders(cache_dir)) == 2
    assert_features_of(make_model(seed=1), paths[:2], other)
    del extracted[:]
    cached(make_model(seed=0), paths[:2], cache_dir, image_size=SIZE + 32)
    assert extracted == paths[:2]
    assert len(fingerprint_folders(cache_dir)) == 3
    del extracted[:]
    cached(make_model(seed=1), paths[:2], cache_dir)  # the second model's folder is still there
    assert extracted == []


# ---- a damaged cache is rebuilt, never trusted ----

def damage_index(folder, row_bytes):
    with open(os.path.join(folder, "index.npz"), "w") as f:
        f.write("{not an index at all")


def damage_bytes(folder, row_bytes):
    path = data_file(folder)
    with open(path, "r+b") as f:
        for offset in (row_bytes + 40, 3 * row_bytes + 400):  # inside rows 1 and 3
            f.seek(offset)
            chunk = f.read(4)
            f.seek(offset)
            f.write(bytes(b ^ 0x5A for b in chunk))


def damage_truncate(folder, row_bytes):
    path = data_file(folder)
    os.truncate(path, os.path.getsize(path) - 10)


def damage_delete(folder, row_bytes):
    os.remove(data_file(folder))


def damage_index_rows(folder, row_bytes):
    # A valid index file, wrong content: one image listed for two rows.
    index = read_index(folder)
    keys = index["keys"].tobytes().split(b"\0")
    keys[1] = keys[0]
    index["keys"] = np.frombuffer(b"\0".join(keys), dtype=np.uint8)
    with open(os.path.join(folder, "index.npz"), "wb") as f:
        np.savez(f, **index)


@pytest.mark.parametrize("damage", [damage_index, damage_bytes, damage_truncate, damage_delete, damage_index_rows])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, paths, extracted, damage):
    m, cache_dir = make_model(), str(tmp_path / "cache")
    reference, _, _ = cached(m, paths, cache_dir)
    (folder,) = [os.path.join(cache_dir, f) for f in fingerprint_folders(cache_dir)]
    row_bytes = 2 * m.head.in_features * 4
    assert os.path.getsize(data_file(folder)) == N * row_bytes
    damage(folder, row_bytes)

    del extracted[:]
    calls = Calls()
    rebuilt, _, ok = cached(m, paths, cache_dir, calls)
    assert ok.all()
    assert extracted == paths  # rebuilt from the images
    assert calls.warnings and all(reason == "feature cache" and not fatal for reason, _, fatal in calls.warnings)
    assert any("damaged" in message for _, message, _ in calls.warnings)
    np.testing.assert_allclose(rebuilt, reference, atol=1e-5)  # never the damaged numbers

    # The rebuilt cache is whole again: the next run trusts it, silently.
    del extracted[:]
    calls = Calls()
    again, _, _ = cached(m, paths, cache_dir, calls)
    assert extracted == [] and calls.warnings == []
    np.testing.assert_array_equal(again, rebuilt)
    assert os.path.getsize(data_file(folder)) == N * row_bytes  # the damaged data file is gone


def test_rows_a_crashed_run_left_past_the_index_are_written_over(tmp_path, paths, extracted):
    # Never cut off: another run may have the file memory-mapped (truncating it would kill that run with SIGBUS).
    m, cache_dir = make_model(), str(tmp_path / "cache")
    reference, _, _ = cached(m, paths[:3], cache_dir)
    (folder,) = [os.path.join(cache_dir, f) for f in fingerprint_folders(cache_dir)]
    data_path = data_file(folder)
    row_bytes = 2 * m.head.in_features * 4
    with open(data_path, "ab") as f:  # one and a half rows written, the index never updated
        f.write(np.random.default_rng(0).standard_normal(row_bytes * 3 // 8).astype(np.float32).tobytes())
    assert os.path.getsize(data_path) > 3 * row_bytes

    del extracted[:]
    calls = Calls()
    again, rows, _ = cached(m, paths[:3], cache_dir, calls)
    assert extracted == []
    np.testing.assert_array_equal(again, reference)
    assert os.path.getsize(data_path) == 4.5 * row_bytes  # the junk is not shown, and not cut off

    # New images land right after the indexed rows, not after the junk.
    del extracted[:]
    more, rows, _ = cached(m, paths, cache_dir, calls)
    assert extracted == paths[3:]
    assert sorted(rows.tolist()) == list(range(N))
    assert os.path.getsize(data_path) == N * row_bytes
    assert calls.warnings == []
    assert_features_of(make_model(), paths, more)


# ---- --no-cache, unreadable images ----

def test_no_cache_leaves_nothing_behind(tmp_path, paths, monkeypatch):
    scratch, cwd = tmp_path / "scratch", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(cwd)
    m = make_model()
    in_memory, rows, ok = cached(m, paths, None)
    assert ok.all()
    assert os.listdir(scratch) == [] and os.listdir(cwd) == []
    on_disk, _, _ = cached(m, paths, str(tmp_path / "cache"))
    np.testing.assert_array_equal(in_memory, on_disk)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_an_unreadable_image_is_reported_and_the_others_are_fine(tmp_path, paths, batch_size):
    bad = tmp_path / "images" / "broken.jpg"
    bad.write_text("this is not a JPEG\n")
    mixed = paths[:2] + [str(bad)] + paths[2:]
    calls = Calls()
    m = make_model()
    features, rows, ok = cached(m, mixed, str(tmp_path / "cache"), calls, batch_size=batch_size)
    assert ok.tolist() == [True, True, False, True, True, True]
    unreadable = [(r, msg) for r, msg, _ in calls.warnings if "broken.jpg" in msg]
    assert len(unreadable) == 1 and len(calls.warnings) == 1
    assert calls.progress_done == len(mixed)
    assert_features_of(make_model(), paths, features)


# ---- train.py: the cached path's loss curve, and reuse across runs ----

def run_train(capsys, labels, images, out, *extra):
    code = train.main([*FAST, "--backbone", BACKBONE, "--labels", labels, "--images", images, "--out", str(out / "model.pth"),
                       "--curve", str(out / "curve.png"), "--patience", "0", *extra])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    n_train = int(re.search(r"data: \d+ images used \((\d+) train", stdout).group(1))
    steps = int(re.search(r"wrote .*curve\.png \((\d+) steps\)", stdout).group(1))
    history = json.load(open(out / "metrics.json"))["history"]
    return stdout, n_train, steps, history


def test_train_loss_curve_has_one_point_per_step_on_both_paths(tmp_path, tiny_set, capsys):
    labels, images = tiny_set
    cache_dir = str(tmp_path / "cache")
    batch_size = int(FAST[FAST.index("--batch-size") + 1])

    stdout, n_train, steps, history = run_train(capsys, labels, images, tmp_path / "a", "--epochs", "2",
                                                "--cache-dir", cache_dir)
    assert "path: cached features" in stdout
    assert "extracting" in stdout
    assert n_train % batch_size  # a short last batch, which still counts as a step
    assert steps == 2 * math.ceil(n_train / batch_size)
    assert [h["epoch"] for h in history] == [1, 2]

    # Other head settings, same backbone and images: nothing is extracted again.
    stdout, n_train2, steps, _ = run_train(capsys, labels, images, tmp_path / "b", "--epochs", "1",
                                           "--lr", "0.01", "--cache-dir", cache_dir)
    assert "24 of 24 images found" in stdout
    assert "extracting" not in stdout
    assert steps == math.ceil(n_train2 / batch_size)

    # The full loop counts its steps the same way.
    stdout, n_train3, full_steps, _ = run_train(capsys, labels, images, tmp_path / "c", "--epochs", "1",
                                                "--augment", "strong", "--cache-dir", cache_dir)
    assert "path: full loop" in stdout
    assert n_train3 == n_train
    assert full_steps == math.ceil(n_train / batch_size)


def test_one_image_under_two_names_gets_right_features_for_every_path(tmp_path, paths):
    # `x.jpg` and `./x.jpg` in a labels file are two rows (the names differ) but one file, so one cache key.
    folder, name = os.path.split(paths[0])
    twice = [paths[0], paths[1], os.path.join(folder, ".", name), paths[2], paths[3]]
    m, cache_dir = make_model(), str(tmp_path / "cache")
    calls = Calls()
    features, rows, ok = cached(m, twice, cache_dir, calls)
    assert ok.all()
    assert_features_of(make_model(), twice, features)
    # ... and the cache it leaves behind is whole: the next run finds everything, with no warning.
    calls = Calls()
    again, _, _ = cached(m, twice, cache_dir, calls)
    assert calls.warnings == []
    np.testing.assert_array_equal(again, features)


def test_cache_dir_that_cannot_be_created_is_a_user_error(tmp_path, paths):
    # STYLE: an error the user can cause (here --cache-dir naming a file) ends in one line naming the path.
    from utils import UserError

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where --cache-dir should be a folder\n")
    with pytest.raises(UserError, match="not_a_folder"):
        cached(make_model(), paths[:1], str(blocker))


# ---- validation images get view 0 only; their mirror view is added when a later run trains on them ----

def test_mirror_view_only_where_needed_and_added_later(tmp_path, paths, extracted):
    m, cache_dir = make_model(), str(tmp_path / "cache")
    mirror = np.array([True, True, False, False, True])
    calls = Calls()
    data, rows, ok = run_cached(m, paths, cache_dir, calls, mirror=mirror)
    assert ok.all()
    # 3 images x 2 views + 2 images x 1 view = 8 forwards.
    assert any("8 forwards (3 images x 2 views, 2 x 1, 0 mirror only)" in line for line in calls.logs)
    crc = read_index(os.path.join(cache_dir, fingerprint_folders(cache_dir)[0]))["crc"]
    assert sorted((crc[:, 1] == -1).tolist()) == [False, False, False, True, True]
    view0 = np.array(data[rows])[:, 0]

    del extracted[:]
    features, rows, ok = cached(m, paths, cache_dir)  # now every image is a training image
    assert extracted == [paths[2], paths[3]]  # only the two missing mirror views are computed
    np.testing.assert_array_equal(features[:, 0], view0)
    assert_features_of(make_model(), paths, features)


def test_a_mirror_view_written_without_its_index_entry_is_not_trusted(tmp_path, paths):
    # A crash between writing the mirror bytes and the index: the index still says "no mirror view".
    m, cache_dir = make_model(), str(tmp_path / "cache")
    calls = Calls()
    run_cached(m, paths[:2], cache_dir, calls, mirror=[False, False])
    folder = os.path.join(cache_dir, fingerprint_folders(cache_dir)[0])
    store = feature_cache.FeatureStore(folder, m.head.in_features)
    key = feature_cache.image_key(paths[0])
    with open(store.data_path, "r+b") as f:  # garbage where the mirror view would go
        f.seek(store.row_of[key] * store.row_bytes + store.row_bytes // 2)
        f.write(b"\x7f" * (store.row_bytes // 2))
    store.close()
    features, _, ok = cached(m, paths[:2], cache_dir)
    assert ok.all()
    assert_features_of(make_model(), paths[:2], features)

"""Shared fixtures: small generated data sets, and running the scripts in-process or as the user does."""
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import make_sample  # noqa: E402

# Small images and a small backbone keep every forward and checkpoint cheap; the pipeline does not care about
# either (ResNet50, 94 MB a checkpoint, doubles a tiny run: the tests that are about it say --backbone resnet50).
# "--folds 0": one validation split, whose outputs (val_labels.txt, a best epoch) most tests check; the
# cross-validation tests (test_train.py) leave it out. --no-report: report.html has its own tests (test_report.py).
FAST = ["--backbone", "mobilenet_v3_large", "--weights", "none", "--image-size", "64", "--num-workers", "0",
        "--batch-size", "8", "--folds", "0", "--no-report"]


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny convolutions: a second thread gains nothing there, and when
    other work shares the CPUs, spinning OpenMP threads make such tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_set(tmp_path):
    """24 generated garment images with labels (header-less, ~9% NA): returns (labels path, images dir)."""
    images = tmp_path / "images"
    labels = tmp_path / "labels.txt"
    make_sample.generate(24, str(images), str(labels), seed=7, na_rate=0.09)
    return str(labels), str(images)


def run_script(script, *args, cwd=None, timeout=300):
    """Run one of the project's scripts as the user would; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would win over TORCH_HOME
    assert torch.hub.get_dir() == str(home / "hub")
    return home


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt raises URLError, as it does on a machine without internet; returns the attempts."""
    attempts = []

    def refuse(url, *args, **kwargs):
        attempts.append(url if isinstance(url, str) else getattr(url, "full_url", url))
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return attempts


def write_checkpoint(path, backbone="mobilenet_v3_large", image_size=64, seed=0, weights="none", **facts):
    """A model.pth as train.py writes it, untrained: a seeded random head on the backbone's `weights`; facts:
    more of the checkpoint's keys (calibration, learnt, p_values, tta)."""
    from dataset import IMAGENET_MEAN, IMAGENET_STD
    from model import build_model, make_checkpoint, save_checkpoint

    torch.manual_seed(seed)
    model = build_model(backbone, 4, weights, image_size=image_size)
    with torch.no_grad():  # a head that spreads the probabilities, so thresholds and outputs differ between images
        model.head.weight.normal_(0, 2.0 / model.head.in_features ** 0.5)
    save_checkpoint(make_checkpoint(model, backbone=backbone, attributes=["Attr1", "Attr2", "Attr3", "Attr4"],
                                    image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                    thresholds=[0.5, 0.45, 0.55, 0.5], config={"unfreeze": "none"}, epoch=1,
                                    **facts),
                    str(path))
    return str(path)


@pytest.fixture(scope="session")
def lite0_cache(tmp_path_factory):
    """One feature cache for the tests that use EfficientNet-Lite0 ImageNet features of the shipped sample at
    160 px (test_audit.py, test_train.py): its 300 images are extracted once per session (at 160 px in
    half the time of 224, and the tests' margins hold: their docstrings say what was measured)."""
    return str(tmp_path_factory.mktemp("lite0_cache"))


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Playwright, Debian's chromium as its executable (no browser download); the test
    is skipped with the reason where it is not installed (.ci/run installs it)."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        yield browser
        browser.close()


def free_port():
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server script in a subprocess on a free loopback port (argv gets --port): .url, .log(), .stop() (SIGTERM,
    its exit code), .kill() (SIGKILL). Started when `ready` answers 200, within `timeout` seconds."""

    def __init__(self, argv, *, folder, name, ready, cwd=ROOT, env=None, timeout=90):
        import contextlib
        import time

        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = open(os.path.join(folder, f"{name}-{self.port}.log"), "w+")
        self.process = subprocess.Popen([sys.executable, *argv, "--port", str(self.port)], cwd=cwd, stdout=self.out,
                                        stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.process.poll() is None, self.log()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + ready, timeout=5).status_code == 200:
                    return
            time.sleep(0.1)
        self.process.kill()
        raise AssertionError(f"{name} did not answer {ready} in {timeout} s: {self.log()}")

    def log(self):
        self.out.flush()
        self.out.seek(0)
        return self.out.read()

    def kill(self):
        import signal

        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self, timeout=30):
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

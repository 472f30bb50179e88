"""Shared fixtures: small generated data sets, and running the scripts in-process or as the user does."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import make_sample  # noqa: E402

# Small images keep every backbone forward cheap; the pipeline does not care about the size.
FAST = ["--weights", "none", "--image-size", "64", "--num-workers", "0", "--batch-size", "8"]


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

"""audit.py: out-of-fold probabilities, cleanlab scores with NA cells left out, the two output files, and the
measured recall of deliberately flipped labels on the sample set."""
import csv
import hashlib
import os

import numpy as np
import pytest
import torch

import audit
from conftest import FAST, ROOT
from dataset import parse_labels
from utils import Report


def test_scores_are_one_minus_the_probability_of_the_given_label_and_na_has_none():
    p = np.array([[0.9, 0.3], [0.2, 0.6], [0.6, 0.5]], dtype=np.float32)
    y = torch.tensor([[1, 0], [1, 1], [-1, 0]])
    score = audit.label_quality(p, y)
    np.testing.assert_allclose(score[:2], [[0.1, 0.3], [0.8, 0.4]], atol=1e-6)
    assert np.isnan(score[2, 0]) and score[2, 1] == pytest.approx(0.5)
    rows = audit.audit_rows(["a", "b", "c"], ["A", "B"], y, p, score)
    assert [(r["image"], r["attribute"]) for r in rows] == [("b", "A"), ("c", "B"), ("b", "B"), ("a", "B"),
                                                            ("a", "A"), ("c", "A")]
    assert rows[-1] == {"image": "c", "attribute": "A", "given": "NA", "suggested": 1,
                        "probability": pytest.approx(0.6), "score": None}


def test_na_cells_are_filled_only_where_confident_and_known_cells_never_change():
    y = torch.tensor([[-1, -1, -1, 1]])
    p = np.array([[0.95, 0.05, 0.5, 0.0]])
    assert audit.suggested_targets(y, p, 0.9).tolist() == [[1, 0, -1, 1]]


def test_flip_known_flips_five_percent_of_known_cells_only():
    y = torch.tensor([[1, 0, -1, 1]] * 50)  # 150 known cells
    flipped_y, flipped = audit.flip_known(y, 0.05, seed=3)
    assert flipped.sum() == 8 and not flipped[:, 2].any()
    assert (flipped_y[torch.as_tensor(flipped)] == 1 - y[torch.as_tensor(flipped)]).all()
    assert audit.recall_in_top(np.where(flipped, 1.0, 0.0), flipped) == 1.0
    assert audit.recall_in_top(np.where(flipped, 0.0, 1.0), flipped) == 0.0


def test_cli_writes_the_csv_and_the_suggested_labels_and_leaves_the_labels_file_alone(tiny_set, tmp_path, capsys):
    labels, images = tiny_set
    before = hashlib.sha1(open(labels, "rb").read()).hexdigest()
    out = tmp_path / "audit"
    fast = [a for a in FAST if a != "--no-report"]  # a train.py flag
    args = [*fast, "--labels", labels, "--images", images, "--out", str(out), "--cache-dir", str(tmp_path / "c"),
            "--backbone", "mobilenet_v3_large", "--epochs", "3", "--folds", "3"]
    assert audit.main(args) == 0
    assert hashlib.sha1(open(labels, "rb").read()).hexdigest() == before
    given = parse_labels(labels)
    with open(out / "label_audit.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(audit.AUDIT_COLUMNS)
    assert len(rows) == len(given.names) * len(given.attributes)
    scores = [float(r["score"]) for r in rows if r["score"]]
    assert scores == sorted(scores, reverse=True)
    na_rows = [r for r in rows if r["given"] == "NA"]
    assert na_rows and rows[-len(na_rows):] == na_rows and all(not r["score"] for r in na_rows)
    suggested = parse_labels(str(out / "labels_suggested.txt"))
    assert suggested.names == given.names
    first = open(out / "labels_suggested.txt").readline()
    assert first.startswith("#") and "0.9" in first
    probability = {(r["image"], r["attribute"]): float(r["probability"]) for r in rows}
    for name, old, new in zip(given.names, given.targets, suggested.targets):
        for attribute, a, b in zip(given.attributes, old, new):
            p = probability[(name, attribute)]
            assert b == (a if a >= 0 else 1 if p >= 0.9 else 0 if p <= 0.1 else -1)
    assert audit.main([*args, "--out", str(tmp_path), "--labels", str(tmp_path / "labels_suggested.txt")]) == 2


@pytest.fixture(scope="module")
def sample_features(lite0_cache):
    """EfficientNet-Lite0 features (ImageNet weights, offline) of the shipped sample, view 0, 160 px."""
    args = audit.parse_args(["--labels", os.path.join(ROOT, "labels.txt"), "--images", os.path.join(ROOT, "images"),
                             "--backbone", "efficientnet_lite0", "--num-workers", "0", "--image-size", "160",
                             "--cache-dir", lite0_cache])
    _, _, targets, features, ok = audit.audit_features(args, Report())
    assert ok.all()
    return features, targets


def test_flipped_labels_of_the_sample_set_are_found(sample_features):
    """5% of the known cells flipped (seeded): at least 80% of them must be among the top 2 x (number flipped)
    suspects. Measured with 3 folds: 0.95, 1.00, 0.95 for seeds 0, 1, 2 (55 cells flipped of 1091 known; with
    audit.py's 5 folds 0.93, 0.96, 0.91, in twice the time)."""
    features, targets = sample_features
    y, flipped = audit.flip_known(targets, 0.05, seed=0)
    probabilities = audit.out_of_fold(features, y, seed=0, folds=3)
    assert audit.recall_in_top(audit.label_quality(probabilities, y), flipped) >= 0.8

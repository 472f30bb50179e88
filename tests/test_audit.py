"""audit.py: out-of-fold probabilities, cleanlab scores with NA cells left out, the two output files, and the
measured recall of deliberately flipped labels on the sample set."""
import csv
import hashlib
import os

import numpy as np
import pytest
import torch

import audit
import train
from conftest import FAST, ROOT
from dataset import parse_labels, write_labels
from engine import read_oof


def read_audit_csv(path):
    """(the `# not audited` line or None, the rows)."""
    with open(path) as f:
        first = f.readline()
        comment = first.strip() if first.startswith("#") else None
        if comment is None:
            f.seek(0)
        return comment, list(csv.DictReader(f))


def test_an_attribute_not_learnt_has_no_suspect_no_suggestion_and_no_queue_row():
    p = np.array([[0.01, 0.3], [0.99, 0.6], [0.999, 0.95]], dtype=np.float32)
    y = np.array([[1, 0], [0, 1], [-1, -1]], dtype=np.int8)
    learnt = [False, True]
    score = audit.label_quality(p, y, learnt)
    assert np.isnan(score[:, 0]).all() and score[:2, 1] == pytest.approx([0.3, 0.4])
    rows = audit.audit_rows(["a", "b", "c"], ["A", "B"], y, p, score, learnt)
    assert [(r["image"], r["attribute"]) for r in rows] == [("b", "B"), ("a", "B"), ("c", "B")]
    # A's NA cell at p 0.999 stays NA; B's at 0.95 is filled.
    assert audit.suggested_targets(y, p, 0.9, learnt).tolist() == [[1, 0], [0, 1], [-1, 1]]
    assert audit.label_quality(p, y, [False, False])[np.isfinite(audit.label_quality(p, y))].size == 4
    assert np.isnan(audit.label_quality(p, y, [False, False])).all()


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


def test_the_score_is_cleanlabs_self_confidence_per_attribute_over_its_known_cells():
    from cleanlab.rank import get_label_quality_scores

    g = np.random.default_rng(0)
    y = g.integers(-1, 2, size=(200, 3)).astype(np.int8)
    p = g.random((200, 3)).astype(np.float32)
    score = audit.label_quality(p, y)
    for k in range(3):
        known = y[:, k] >= 0
        pk = p[known, k].astype(np.float64)
        quality = get_label_quality_scores(y[known, k], np.stack([1 - pk, pk], 1), method="self_confidence")
        np.testing.assert_allclose(score[known, k], 1 - quality, atol=1e-12)
        assert np.isnan(score[~known, k]).all()


def test_na_cells_are_filled_only_where_confident_and_known_cells_never_change():
    y = torch.tensor([[-1, -1, -1, 1]])
    p = np.array([[0.95, 0.05, 0.5, 0.0]])
    assert audit.suggested_targets(y, p, 0.9).tolist() == [[1, 0, -1, 1]]


def test_flip_known_flips_five_percent_of_known_cells_only():
    y = torch.tensor([[1, 0, -1, 1]] * 50)  # 150 known cells
    flipped_y, flipped = audit.flip_known(y, 0.05, seed=3)
    assert flipped.sum() == 8 and not flipped[:, 2].any()
    assert (flipped_y[flipped] == 1 - y.numpy()[flipped]).all() and (flipped_y[~flipped] == y.numpy()[~flipped]).all()
    assert audit.recall_in_top(np.where(flipped, 1.0, 0.0), flipped) == 1.0
    assert audit.recall_in_top(np.where(flipped, 0.0, 1.0), flipped) == 0.0


def test_cli_writes_the_csv_and_the_suggested_labels_and_leaves_the_labels_file_alone(tiny_set, tmp_path, capsys):
    """No run beside --model: audit.py runs train.py's cross-validation itself (train.py's flags passed on). 24
    images on a random backbone: nothing is learnt, so nothing is suspected or filled, and both files say why."""
    labels, images = tiny_set
    before = hashlib.sha1(open(labels, "rb").read()).hexdigest()
    out = tmp_path / "audit"
    fast = [a for a in FAST if a != "--no-report"]  # a train.py flag; its --folds 0 is overridden below
    args = [*fast, "--labels", labels, "--images", images, "--out", str(out), "--cache-dir", str(tmp_path / "c"),
            "--model", str(tmp_path / "none" / "model.pth"), "--epochs", "3", "--folds", "3", "--repeats", "1"]
    assert audit.main(args) == 0
    said = capsys.readouterr().out
    assert "computing the out-of-fold predictions" in said
    assert "not audited: Attr1 (p " in said and "no suspect and no suggestion" in said
    assert "suspect:" not in said
    assert hashlib.sha1(open(labels, "rb").read()).hexdigest() == before
    given = parse_labels(labels)
    comment, rows = read_audit_csv(out / "label_audit.csv")
    assert comment.startswith("# not audited, not learnt") and all(a in comment for a in given.attributes)
    assert rows == []
    with open(out / "label_audit.csv") as f:
        f.readline()  # the comment
        assert next(csv.reader(f)) == list(audit.AUDIT_COLUMNS)
    audited = set()
    suggested = parse_labels(str(out / "labels_suggested.txt"))
    assert suggested.names == given.names
    first = open(out / "labels_suggested.txt").readline()
    assert first.startswith("#") and "0.9" in first and "with 0 NA cells filled" in first and "not filled" in first
    assert suggested.targets.tolist() == given.targets.tolist()
    probability = {(r["image"], r["attribute"]): float(r["probability"]) for r in rows}
    for name, old, new in zip(given.names, given.targets, suggested.targets):
        for attribute, a, b in zip(given.attributes, old, new):
            if attribute not in audited:  # not learnt: nothing filled
                assert b == a
                continue
            p = probability[(name, attribute)]
            assert b == (a if a >= 0 else 1 if p >= 0.9 else 0 if p <= 0.1 else -1)
    assert audit.main([*args, "--out", str(tmp_path), "--labels", str(tmp_path / "labels_suggested.txt")]) == 2
    capsys.readouterr()
    for flags in (["--folds", "0"], ["--unfreeze", "last"], ["--augment=strong"]):  # no out-of-fold predictions
        assert audit.main([*args, *flags]) == 2
        err = capsys.readouterr().err
        assert "the audit needs the out-of-fold predictions" in err and err.count("\n") == 1, err


def test_the_audit_reads_the_runs_out_of_fold_predictions_and_trains_nothing(tiny_set, tmp_path, capsys):
    labels, images = tiny_set
    run = [*FAST, "--folds", "2"]  # the last --folds counts
    assert train.main([*run, "--labels", labels, "--images", images, "--out", str(tmp_path / "model.pth"),
                       "--curve", str(tmp_path / "curve.png"), "--cache-dir", str(tmp_path / "c"), "--epochs", "2",
                       "--repeats", "2"]) == 0
    capsys.readouterr()
    assert audit.main(["--labels", labels, "--images", images, "--model", str(tmp_path / "model.pth"),
                       "--out", str(tmp_path / "audit")]) == 0
    out = capsys.readouterr().out
    assert "repeat " not in out and "extracting" not in out and f"from {tmp_path / 'oof.npz'}" in out
    oof = read_oof(str(tmp_path / "oof.npz"))
    written = {(r["image"], r["attribute"]): float(r["probability"])
               for r in read_audit_csv(tmp_path / "audit" / "label_audit.csv")[1]}
    for i, name in enumerate(oof.names):
        for k, attribute in enumerate(oof.attributes):
            if oof.learnt[k]:
                assert written[(name, attribute)] == pytest.approx(float(oof.probabilities[i, k]), abs=1e-6)
            else:  # not learnt: not audited
                assert (name, attribute) not in written
    # The labels file changed since the run (one cell): its predictions are stale, said so, and made anew.
    lines = open(labels).read().splitlines()
    cells = lines[0].split()
    cells[1] = "0" if cells[1] == "1" else "1"
    edited = tmp_path / "edited.txt"
    edited.write_text("\n".join([" ".join(cells), *lines[1:]]) + "\n")
    data = audit.audit_data(str(edited), images, model=str(tmp_path / "model.pth"),
                            train_flags=[*run, "--epochs", "1", "--repeats", "1",
                                         "--cache-dir", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert "not used: " in out and "computing the out-of-fold predictions" in out and "extracting" not in out
    assert data.source.startswith("computed now by train.py") and data.model is None
    assert data.targets[0].tolist() == [int(c) if c != "NA" else -1 for c in cells[1:]]


def test_flipped_labels_of_the_sample_set_are_found(tmp_path, lite0_cache, capsys):
    """5% of the known cells flipped (seeded), the run's own cross-validation (3 folds, 1 repeat, 160 px): at least
    80% of them must be among the top 2 x (number flipped) suspects. Measured: see the assertion's message."""
    given = parse_labels(os.path.join(ROOT, "labels.txt"))
    y, flipped = audit.flip_known(given.targets, 0.05, seed=0)
    labels = tmp_path / "flipped.txt"
    write_labels(str(labels), given.attributes, given.names, y)
    assert train.main(["--backbone", "efficientnet_lite0", "--image-size", "160", "--labels", str(labels),
                       "--images", os.path.join(ROOT, "images"), "--cache-dir", lite0_cache, "--num-workers", "0",
                       "--folds", "3", "--repeats", "1", "--no-report", "--out", str(tmp_path / "model.pth"),
                       "--curve", str(tmp_path / "curve.png")]) == 0
    capsys.readouterr()
    data = audit.audit_data(str(labels), os.path.join(ROOT, "images"), model=str(tmp_path / "model.pth"))
    recall = audit.recall_in_top(data.score, flipped)
    assert recall >= 0.8, recall


def reference_order(targets, probabilities, score, learnt):
    """The audit's order as audit_rows made it before the ranking (one Python object per cell, two stable sorts):
    known cells of the attributes learnt by -score, then their NA cells by -|p - 0.5|; flat indices."""
    y, width = np.asarray(targets), len(learnt)
    cells = [(i * width + k, y[i, k] < 0, float(probabilities[i, k]), float(score[i, k]))
             for i in range(len(y)) for k in range(width) if learnt[k]]
    known = sorted((c for c in cells if not c[1]), key=lambda c: -c[3])
    na = sorted((c for c in cells if c[1]), key=lambda c: -abs(c[2] - 0.5))
    return [c[0] for c in known + na]


def generated(n=2000, k=30, seed=5):
    """n x k targets (20% NA), probabilities with many ties (rounded to 0.05 in the first 500 rows), a learnt mask
    with some attributes not learnt, and the scores."""
    g = np.random.default_rng(seed)
    y = g.choice(np.array([-1, 0, 1], dtype=np.int8), size=(n, k), p=[0.2, 0.4, 0.4])
    p = g.random((n, k)).astype(np.float32)
    p[:500] = np.round(p[:500] * 20) / 20
    learnt = np.ones(k, dtype=bool)
    learnt[[3, 17]] = False
    return y, p, audit.label_quality(p, y, learnt), learnt


@pytest.mark.parametrize("sizes", [(audit.FULL_SORT, audit.BLOCK, audit.SAMPLE), (200, 1000, 300)],
                         ids=["sorted whole", "top by threshold"])
def test_the_ranking_is_the_order_of_the_old_per_cell_sorts(sizes, monkeypatch):
    """2,000 x 30 (more than the sample's 600 x 4), ties included: whole, its top, one kind, one column and the
    positions of cells equal the reference; small FULL_SORT, BLOCK and SAMPLE take the threshold path of a top."""
    for name, value in zip(("FULL_SORT", "BLOCK", "SAMPLE"), sizes):
        monkeypatch.setattr(audit, name, value)
    y, p, score, learnt = generated()
    reference = reference_order(y, p, score, learnt)
    known = int(((y >= 0) & learnt).sum())
    assert len(reference) == int(learnt.sum()) * len(y) and audit.part_size(y, learnt, "known") == known
    order = audit.ranking(y, p, score, learnt)
    assert order.dtype == np.uint32 and order.tolist() == reference
    for top in (1, 7, 1000, known, known + 10, len(reference) + 1):
        assert audit.ranking(y, p, score, learnt, top=top).tolist() == reference[:top]
    assert audit.ranking(y, p, score, learnt, kind="na", top=500).tolist() == reference[known:known + 500]
    assert audit.ranking(y, p, score, learnt, kind="known").tolist() == reference[:known]
    for k in (0, 3, 29):
        assert audit.ranking(y, p, score, learnt, column=k).tolist() == [c for c in reference if c % 30 == k]
    cells = np.random.default_rng(0).choice(y.size, 300, replace=False)
    where = {c: i for i, c in enumerate(reference)}
    assert audit.rank_of(cells, y, p, score, learnt).tolist() == [where.get(c, -1) for c in cells]


def test_label_audit_csv_is_written_from_the_ranking_in_chunks_all_or_the_top_of_each_part(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "CHUNK", 1000)  # 48 chunks
    y, p, score, learnt = generated()
    names, attributes = [f"im{i:05d}.jpg" for i in range(len(y))], [f"A{k}" for k in range(y.shape[1])]
    data = audit.AuditData(labels="", attributes=attributes, names=names, paths=[], targets=y, probabilities=p,
                           score=score, source="", model=None, labels_sha256="",
                           verdicts=[{"attribute": a, "learnt": bool(ok), "p_adjusted": 0.5} for a, ok in
                                     zip(attributes, learnt)])
    reference = reference_order(y, p, score, learnt)
    known = int(((y >= 0) & learnt).sum())
    path = tmp_path / "label_audit.csv"
    assert audit.write_audit_csv(path, data, audit.audit_chunks(data), comment="not audited, ...: A3, A17") == \
        len(reference)
    comment, rows = read_audit_csv(path)
    assert comment == "# not audited, ...: A3, A17"
    expected = audit.audit_rows(names, attributes, y, p, score, learnt)
    assert [(r["image"], r["attribute"]) for r in rows] == [(names[c // 30], attributes[c % 30]) for c in reference]
    assert rows == [{"image": r["image"], "attribute": r["attribute"], "given": str(r["given"]),
                     "suggested": str(r["suggested"]), "probability": f"{r['probability']:.6f}",
                     "score": "" if r["score"] is None else f"{r['score']:.6f}"} for r in expected]
    assert rows[0]["score"] == f"{np.nanmax(score):.6f}" and rows[-1]["given"] == "NA"
    # The top 100 of each part: the 100 most suspect known cells, then the 100 most confident NA cells.
    assert audit.write_audit_csv(path, data, audit.audit_chunks(data, 100)) == 200
    top = read_audit_csv(path)
    assert top[0] is None and top[1] == rows[:100] + rows[known:known + 100]


def test_audit_py_writes_the_top_of_each_part_by_default_says_so_and_every_cell_with_all(tmp_path, monkeypatch,
                                                                                         capsys):
    y, p, score, learnt = generated()
    names, attributes = [f"im{i:05d}.jpg" for i in range(len(y))], [f"A{k}" for k in range(y.shape[1])]
    labels = tmp_path / "labels.txt"
    write_labels(str(labels), attributes, names, y)
    data = audit.AuditData(labels=str(labels), attributes=attributes, names=names, paths=[], targets=y,
                           probabilities=p, score=score, source="generated", model=None, labels_sha256="",
                           verdicts=[{"attribute": a, "learnt": bool(ok), "p_adjusted": 0.01 if ok else 0.7}
                                     for a, ok in zip(attributes, learnt)])
    monkeypatch.setattr(audit, "audit_data", lambda *a, **kw: data)
    reference = reference_order(y, p, score, learnt)
    known = int(((y >= 0) & learnt).sum())
    flags = ["--labels", str(labels), "--out", str(tmp_path)]
    assert audit.main([*flags, "--top", "40"]) == 0
    said = capsys.readouterr().out
    comment, rows = read_audit_csv(tmp_path / "label_audit.csv")
    assert comment == (f"# not audited, not learnt (no better than chance out of fold): A3 (p 0.70), A17 (p 0.70); "
                       f"the 40 most suspect of {known:,} known cells and the 40 most confident of "
                       f"{len(reference) - known:,} NA cells (audit.py --all: every cell)")
    cells = reference[:40] + reference[known:known + 40]
    assert [(r["image"], r["attribute"]) for r in rows] == [(names[c // 30], attributes[c % 30]) for c in cells]
    assert f"(80 of {len(reference)} cells, the most suspect first)" in said and said.count("  suspect: ") == 10
    assert audit.main([*flags, "--all"]) == 0
    comment, rows = read_audit_csv(tmp_path / "label_audit.csv")
    assert comment.endswith("A17 (p 0.70)") and len(rows) == len(reference)

"""engine.py: the cross-validation's heads and their out-of-fold rows, an interrupted cross-validation resumed,
oof.npz read back and recognised when stale, and the imports of the whole project flowing one way."""
import argparse
import ast
import os
import time

import numpy as np
import pytest
import torch

import engine
import train
from conftest import ROOT
from data_loader import FeatureBatches
from utils import UserError


def recipe(**changes):
    args = train.parse_args(["--epochs", "3", "--folds", "3", "--repeats", "2", "--batch-size", "4"])
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def synthetic(n=30, dim=8, seed=0):
    """Two views of n feature rows and targets that follow them (one NA per five rows in attribute 1)."""
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, 2, dim)).astype(np.float32)
    y = np.stack([x[:, 0, 0] > 0, x[:, 0, 1] > 0], 1).astype(np.int8)
    y[::5, 1] = -1
    return x, torch.from_numpy(y)


class Recorded:
    """A batches(rows, train, seed) factory that remembers the rows each call was given."""

    def __init__(self, features, targets):
        self.features, self.targets, self.calls = features, targets, []

    def __call__(self, rows, train, seed):
        self.calls.append((np.array(rows), train))
        return FeatureBatches(self.features, np.arange(len(self.features)), rows, self.targets, batch_size=4,
                              shuffle=train, seed=seed, both_views=not train)


def test_every_row_is_scored_once_per_repeat_by_a_head_that_never_trained_on_it():
    x, y = synthetic()
    args, index = recipe(), np.arange(30)
    state = engine.start_out_of_fold(y.numpy(), folds=3, repeats=2, epochs=3, seed=0)
    batches = Recorded(x, y)
    assert engine.out_of_fold(batches, index, y, args=args, feature_dim=8, device=torch.device("cpu"), state=state,
                              workers=1)  # one head after the other: the calls come in head order
    assert state.heads_done == 6 and len(batches.calls) == 12
    for repeat in range(2):
        scored = []
        for f in range(3):
            (trained, is_train), (held, is_eval) = batches.calls[2 * (repeat * 3 + f): 2 * (repeat * 3 + f) + 2]
            assert is_train and not is_eval and not set(trained) & set(held)
            assert sorted([*trained, *held]) == list(range(30))
            assert (state.folds[held, repeat] == f).all()
            scored += held.tolist()
        assert sorted(scored) == list(range(30))
    assert (state.folds[:, 0] != state.folds[:, 1]).any()
    # One logit per row, epoch and repeat: finite, and not constant.
    assert np.isfinite(state.scores).all() and state.scores.mean(0).std() > 0


def test_repeat_r_is_the_same_heads_whatever_follows_and_its_own_map_is_kept():
    """The first repeat of a 2-repeat run is the 1-repeat run (each head depends on its seed alone), bit for bit;
    repeat_maps[r] is repeat r's own mAP at the chosen epoch."""
    from metrics import attribute_metrics

    x, y = synthetic()
    index, cpu = np.arange(30), torch.device("cpu")
    one = engine.start_out_of_fold(y.numpy(), folds=3, repeats=1, epochs=3, seed=0)
    assert engine.out_of_fold(Recorded(x, y), index, y, args=recipe(repeats=1), feature_dim=8, device=cpu, state=one)
    two = engine.start_out_of_fold(y.numpy(), folds=3, repeats=2, epochs=3, seed=0)
    assert engine.out_of_fold(Recorded(x, y), index, y, args=recipe(), feature_dim=8, device=cpu, state=two)
    np.testing.assert_array_equal(two.folds[:, 0], one.folds[:, 0])
    np.testing.assert_array_equal(two.scores[0], one.scores[0])
    second = two.scores[1]
    assert np.isfinite(second).all() and not np.allclose(second, one.scores[0])
    cv = engine.finish_out_of_fold(two, index, y, attributes=["a", "b"], thresholds="0.5",
                                   loss_fn=engine.make_loss_for(recipe(), y))
    expected = [attribute_metrics(engine.sigmoid(r[cv.epochs - 1]), y.numpy(), None, ["a", "b"])["map"]
                for r in two.scores]
    assert cv.repeat_maps == pytest.approx(expected, abs=1e-9)


def test_heads_side_by_side_in_threads_give_the_scores_of_one_head_after_the_other():
    x, y = synthetic(n=60, dim=16)
    index, cpu = np.arange(60), torch.device("cpu")
    states = []
    for workers in (1, 2):
        state = engine.start_out_of_fold(y.numpy(), folds=3, repeats=2, epochs=3, seed=0)
        assert engine.out_of_fold(Recorded(x, y), index, y, args=recipe(), feature_dim=16, device=cpu, state=state,
                                  workers=workers)
        states.append(state)
    np.testing.assert_array_equal(states[0].scores, states[1].scores)
    assert states[1].done.all()


class StopAfter:
    """Ctrl-C after a number of optimizer steps (train_one_epoch asks after each step)."""

    def __init__(self, steps):
        self.left = steps

    @property
    def requested(self):
        self.left -= 1
        return self.left < 0


def test_a_stopped_cross_validation_goes_on_with_the_next_head_and_ends_as_if_never_stopped():
    x, y = synthetic()
    args, index = recipe(), np.arange(30)
    settings = dict(args=args, feature_dim=8, device=torch.device("cpu"), workers=1)  # a count of steps: in order
    straight = engine.start_out_of_fold(y.numpy(), folds=3, repeats=2, epochs=3, seed=0)
    assert engine.out_of_fold(Recorded(x, y), index, y, state=straight, **settings)
    stopped = engine.start_out_of_fold(y.numpy(), folds=3, repeats=2, epochs=3, seed=0)
    # 5 steps a head-epoch (20 rows, batch 4) x 3 epochs: 40 steps end in the third head's first epoch.
    assert not engine.out_of_fold(Recorded(x, y), index, y, state=stopped, stop=StopAfter(40), **settings)
    assert stopped.heads_done == 2
    saved = engine.OutOfFold.from_checkpoint(stopped.to_checkpoint())
    again = Recorded(x, y)
    assert engine.out_of_fold(again, index, y, state=saved, **settings)
    assert len(again.calls) == 2 * 4  # the 4 heads not done, no more
    np.testing.assert_array_equal(saved.scores, straight.scores)
    np.testing.assert_array_equal(saved.folds, straight.folds)


def test_the_epoch_rules_by_hand():
    """1se: the first epoch within one standard error of the best mAP; map: the best (the first of ties); loss: the
    lowest loss."""
    history = [{"map": 0.80, "map_se": 0.0, "loss": 0.5}, {"map": 0.88, "map_se": 0.0, "loss": 0.4},
               {"map": 0.90, "map_se": 0.03, "loss": 0.45}, {"map": 0.90, "map_se": 0.01, "loss": 0.6}]
    assert engine.choose_epoch(history, "map") == 2
    assert engine.choose_epoch(history, "1se") == 1  # 0.88 >= 0.90 - 0.03; 0.80 is not
    assert engine.choose_epoch(history, "loss") == 1
    history[2]["map_se"] = 0.0
    assert engine.choose_epoch(history, "1se") == 2


def test_the_history_and_the_chosen_epoch_of_a_hand_made_cross_validation():
    y = torch.tensor([[1], [0], [1], [0]], dtype=torch.int8)
    # epoch 1 ranks the rows wrongly, epoch 2 rightly, epoch 3 ties epoch 2 (the first of ties is chosen).
    p = np.array([[[0.2], [0.8], [0.3], [0.7]], [[0.9], [0.1], [0.8], [0.2]], [[0.7], [0.3], [0.6], [0.4]]])
    logits = np.log(p / (1 - p))
    state = engine.OutOfFold(folds=np.zeros((4, 2), dtype=np.int64), done=np.ones(4, dtype=bool),
                             scores=np.stack([logits, logits]).astype(np.float32))
    cv = engine.finish_out_of_fold(state, np.arange(4), y, attributes=["A"], thresholds="0.5", rule="map",
                                   loss_fn=engine.make_loss_for(recipe(), y))
    # epoch 1: positives ranked 3rd and 4th, AP = (1/3 + 2/4) / 2 = 5/12
    assert cv.epochs == 2 and [h["map"] for h in cv.history] == pytest.approx([5 / 12, 1.0, 1.0])
    # One fold, so no spread to measure: the standard error is 0 and 1se picks the best too.
    assert [h["map_se"] for h in cv.history] == [0.0, 0.0, 0.0]
    # 4 rows, 2 positives ranked first: the permutation p-value is 1 / C(4, 2) = 1/6 (exact), not learnt at 0.05.
    assert cv.verdicts[0]["p_value"] == pytest.approx(1 / 6) and cv.learnt == [False]
    # Not learnt: the calibration is the constant, Platt's smoothed prevalence (2 + 1) / (2 + 2) ... of targets
    # 3/4 and 1/4: their mean 1/2; the threshold is 0.5 on that scale (the majority answer; a tie here).
    assert cv.calibration["slope"] == [0.0] and engine.sigmoid(cv.calibration["intercept"][0]) == pytest.approx(0.5)
    assert cv.thresholds == [0.5]


def test_oof_npz_is_read_back_and_a_changed_labels_file_or_image_is_recognised(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (images / name).write_bytes(b"x" * 10)
    labels = tmp_path / "labels.txt"
    labels.write_text("a.jpg 1 NA\nb.jpg 0 1\n")
    cv = engine.CrossValidation(index=np.arange(2), probabilities=np.array([[0.9, 0.2], [0.1, 0.7]], np.float32),
                                folds=np.array([[0], [1]]), epochs=4, history=[{"epoch": 1, "map": 0.5}])
    path = tmp_path / "oof.npz"
    engine.write_oof(str(path), cv, run_id="r1", names=["a.jpg", "b.jpg"],
                     paths=[str(images / "a.jpg"), str(images / "b.jpg")], attributes=["Attr1", "Attr2"],
                     targets=np.array([[1, -1], [0, 1]]), labels_path=str(labels), config={"repeats": 1, "folds": 2})
    oof = engine.read_oof(str(path))
    assert oof.names == ["a.jpg", "b.jpg"] and oof.attributes == ["Attr1", "Attr2"] and oof.epochs == 4
    assert oof.targets.tolist() == [[1, -1], [0, 1]] and oof.config == {"repeats": 1, "folds": 2}
    np.testing.assert_array_equal(oof.probabilities, cv.probabilities)
    assert engine.oof_mismatch(oof, labels_path=str(labels), images=str(images)) is None
    with np.load(path, allow_pickle=False) as z:  # plain arrays: no pickle anywhere
        assert set(z.files) >= {"names", "probabilities", "folds", "labels_sha256", "images_sha256", "run_id"}
    labels.write_text("a.jpg 1 NA\nb.jpg 0 0\n")
    assert "labels" in engine.oof_mismatch(oof, labels_path=str(labels), images=str(images))
    labels.write_text("a.jpg 1 NA\nb.jpg 0 1\n")
    stamp = time.time() + 5
    os.utime(images / "b.jpg", (stamp, stamp))  # the image was replaced since
    assert "images" in engine.oof_mismatch(oof, labels_path=str(labels), images=str(images))
    (images / "b.jpg").unlink()
    assert "images" in engine.oof_mismatch(oof, labels_path=str(labels), images=str(images))
    for damaged in (b"not a zip", b"", path.read_bytes()[:200]):  # junk, empty, truncated
        path.write_bytes(damaged)
        with pytest.raises(UserError, match="not a readable oof.npz"):
            engine.read_oof(str(path))


def test_the_head_optimizer_is_fused_adamw_with_the_runs_learning_rate():
    head = torch.nn.Linear(3, 2)
    optimizer = engine.make_optimizer(head, argparse.Namespace(lr=0.01, weight_decay=0.1, backbone_lr=0.0))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    assert optimizer.param_groups[0]["lr"] == 0.01 and optimizer.defaults["weight_decay"] == 0.1


# ---- imports flow one way ----

def project_imports():
    """module -> the project modules it imports anywhere in its file (top level or inside a function)."""
    modules = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    graph = {}
    for module in modules:
        tree = ast.parse(open(os.path.join(ROOT, module + ".py"), encoding="utf-8").read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[module] = sorted((found & modules) - {module})
    return graph


def test_no_two_files_import_each_other_directly_or_around_a_loop_and_nothing_imports_train():
    graph = project_imports()
    assert [m for m, deps in graph.items() if "train" in deps] == []
    assert "engine" in graph["train"] and "report" in graph["train"]
    assert not {"train", "report", "audit"} & set(graph["engine"])
    state = {}

    def visit(module, path):  # depth-first: a module met again while on the path closes a loop
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import loop: " + " -> ".join([*path, module])
        state[module] = "open"
        for dep in graph[module]:
            visit(dep, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_oof_npz_of_another_run_than_the_model_beside_it_is_not_taken_for_its(tmp_path):
    """A run stopped before its final head wrote oof.npz but not model.pth: the older model.pth beside it has
    another run id, and the pair is refused."""
    from conftest import write_checkpoint

    (tmp_path / "a.jpg").write_bytes(b"x")
    labels = tmp_path / "labels.txt"
    labels.write_text("a.jpg 1\n")
    cv = engine.CrossValidation(index=np.arange(1), probabilities=np.array([[0.9]], np.float32),
                                folds=np.array([[0]]), epochs=1, history=[])
    engine.write_oof(str(tmp_path / "oof.npz"), cv, run_id="new", names=["a.jpg"], paths=[str(tmp_path / "a.jpg")],
                     attributes=["Attr1"], targets=np.array([[1]]), labels_path=str(labels), config={})
    oof = engine.read_oof(str(tmp_path / "oof.npz"))
    model = write_checkpoint(tmp_path / "model.pth")  # an older run's, with no run id of this one
    assert "another run" in engine.oof_mismatch(oof, labels_path=str(labels), images=str(tmp_path), model=model)
    assert engine.oof_mismatch(oof, labels_path=str(labels), images=str(tmp_path)) is None

"""engine.py: the cross-validation's heads and their out-of-fold rows, an interrupted cross-validation resumed,
oof.npz read back and recognised when stale, and the imports of the whole project flowing one way."""
import argparse
import ast
import math
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


def cross_validate(x, y, args, *, state=None, **settings):
    """out_of_fold on x, y with args (new state unless given); returns (state, every epoch's logits (R, E, n, K))."""
    n = len(y)
    if state is None:
        state = engine.start_out_of_fold(y.numpy(), folds=args.folds, repeats=args.repeats, epochs=args.epochs,
                                         seed=args.seed)
    epochs, also = [], settings.pop("every_epoch", None)

    def every_epoch(epoch, logits):
        epochs.append(logits)
        if also is not None:
            also(epoch, logits)

    settings = dict(dict(feature_dim=x.shape[-1], device=torch.device("cpu")), **settings)
    done = engine.out_of_fold(settings.pop("batches", None) or Recorded(x, y), np.arange(n), y, args=args,
                              state=state, every_epoch=every_epoch, **settings)
    return (state if done else None), (np.stack(epochs, 1) if epochs else None)


def test_every_row_is_scored_once_per_repeat_by_a_head_that_never_trained_on_it():
    x, y = synthetic()
    batches = Recorded(x, y)
    state, scores = cross_validate(x, y, recipe(), batches=batches, workers=1)
    assert state.epoch == 3 and len(batches.calls) == 12  # each head's rows asked for once, in head order
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
    assert scores.shape == (2, 3, 30, 2) and np.isfinite(scores).all() and scores.mean(0).std() > 0
    # The chosen epoch's logits, made again from its weights, are the ones that epoch gave.
    np.testing.assert_allclose(state.chosen, scores[:, engine.choose_epoch(state.history)], rtol=0, atol=1e-6)


def test_repeat_r_is_the_same_heads_whatever_follows_and_its_own_map_is_kept():
    """The first repeat of a 2-repeat run is the 1-repeat run (each head depends on its seed alone), bit for bit;
    repeat_maps[r] is repeat r's own mAP at the chosen epoch."""
    from metrics import attribute_metrics

    x, y = synthetic()
    one, one_scores = cross_validate(x, y, recipe(repeats=1))
    two, two_scores = cross_validate(x, y, recipe())
    np.testing.assert_array_equal(two.folds[:, 0], one.folds[:, 0])
    np.testing.assert_array_equal(two_scores[0], one_scores[0])
    second = two_scores[1]
    assert np.isfinite(second).all() and not np.allclose(second, one_scores[0])
    cv = engine.finish_out_of_fold(two, np.arange(30), y, attributes=["a", "b"], thresholds="0.5")
    expected = [attribute_metrics(engine.sigmoid(r[cv.epochs - 1]), y.numpy(), None, ["a", "b"])["map"]
                for r in two_scores]
    assert cv.repeat_maps == pytest.approx(expected, abs=1e-6)


def test_heads_side_by_side_in_threads_give_the_scores_of_one_head_after_the_other():
    x, y = synthetic(n=60, dim=16)
    runs = [cross_validate(x, y, recipe(), workers=workers) for workers in (1, 2)]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    np.testing.assert_array_equal(runs[0][0].chosen, runs[1][0].chosen)
    assert runs[1][0].epoch == 3


class StopAfter:
    """Ctrl-C after a number of optimizer steps (train_one_epoch asks after each step; a head after its epoch)."""

    def __init__(self, steps):
        self.left = steps

    @property
    def requested(self):
        self.left -= 1
        return self.left < 0


def finished_alike(a, b, atol=1e-6):
    """Two CrossValidations agree: the epoch, the history, the probabilities, the verdicts and the calibration."""
    assert a.epochs == b.epochs and len(a.history) == len(b.history)
    for x, y in zip(a.history, b.history):
        assert x["epoch"] == y["epoch"]
        for key in ("loss", "map", "map_se", "macro_f1"):
            assert x[key] == pytest.approx(y[key], abs=atol, nan_ok=True), key
        assert x["ap"] == pytest.approx(y["ap"], abs=atol, nan_ok=True)
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=0, atol=atol)
    assert a.repeat_maps == pytest.approx(b.repeat_maps, abs=atol)
    assert a.thresholds == pytest.approx(b.thresholds, abs=atol)
    assert a.calibration["slope"] == pytest.approx(b.calibration["slope"], abs=atol)
    assert a.calibration["intercept"] == pytest.approx(b.calibration["intercept"], abs=atol)
    assert [v["learnt"] for v in a.verdicts] == [v["learnt"] for v in b.verdicts]
    assert [v["p_value"] for v in a.verdicts] == pytest.approx([v["p_value"] for v in b.verdicts], abs=atol)


def test_a_stopped_cross_validation_goes_on_from_its_last_finished_epoch_and_ends_as_if_never_stopped():
    x, y = synthetic()
    args, index = recipe(epochs=4), np.arange(30)
    straight, every = cross_validate(x, y, args, workers=1)
    stopped = engine.start_out_of_fold(y.numpy(), folds=3, repeats=2, epochs=4, seed=0)
    # 5 steps a head-epoch (20 rows, batch 4), a question after each and one before and one after the epoch: 7 x 6
    # heads = 42 an epoch; 90 stop in the third epoch, whose steps so far are lost: the state is that after epoch 2.
    assert cross_validate(x, y, args, state=stopped, stop=StopAfter(90), workers=1)[0] is None
    assert stopped.epoch == 2 and len(stopped.history) == 2 and stopped.chosen is None
    saved = engine.OutOfFold.from_checkpoint(torch.load(save(stopped.to_checkpoint()), weights_only=True))
    again = Recorded(x, y)
    resumed, rest = cross_validate(x, y, args, state=saved, batches=again, workers=1)
    np.testing.assert_array_equal(rest, every[:, 2:])  # epochs 3 and 4 exactly as without the stop
    np.testing.assert_array_equal(resumed.chosen, straight.chosen)
    assert resumed.history == straight.history
    finished = [engine.finish_out_of_fold(s, index, y, attributes=["a", "b"], thresholds="0.5")
                for s in (straight, resumed)]
    finished_alike(*finished, atol=0)


def save(checkpoint):
    import io

    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return buffer


def finish_before(scores, folds, index, targets, *, attributes, thresholds, loss_fn, rule):
    """finish_out_of_fold as it was before the cross-validation streamed (git 3cd3dd6), verbatim but for the names:
    every epoch's logits (repeats, epochs, n, K) held at once."""
    from metrics import attribute_metrics, macro_f1

    y = np.asarray(targets[index])
    history, target = [], torch.from_numpy(np.asarray(y))
    for epoch in range(scores.shape[1]):
        z = scores[:, epoch]
        with torch.no_grad():
            loss = float(np.mean([loss_fn(torch.from_numpy(zr), target).item() for zr in z]))
        mean = engine.sigmoid(z).mean(0)
        result = attribute_metrics(mean, y, None, attributes)
        heads = [attribute_metrics(engine.sigmoid(z[r][held]), y[held], None, attributes)["map"]
                 for r in range(len(z)) for held in (folds[:, r] == f for f in np.unique(folds[:, r]))]
        heads = [m for m in heads if not math.isnan(m)]
        history.append({"epoch": epoch + 1, "loss": loss, "map": result["map"],
                        "map_se": float(np.std(heads, ddof=1) / math.sqrt(len(heads))) if len(heads) > 1 else 0.0,
                        "macro_f1": macro_f1(mean, y, [0.5] * len(attributes)),
                        "ap": [r["ap"] for r in result["attributes"]]})
    best = engine.choose_epoch(history, rule)
    logits = scores[:, best]
    judged = engine.judge(logits, y, folds, attributes=attributes, thresholds=thresholds)
    alone = [float(attribute_metrics(engine.sigmoid(repeat), y, None, attributes)["map"]) for repeat in logits]
    return engine.CrossValidation(index=index, probabilities=judged.probabilities, folds=folds, epochs=best + 1,
                                  history=history, repeat_maps=alone, thresholds=judged.thresholds,
                                  notes=judged.notes, verdicts=judged.verdicts, calibration=judged.calibration)


@pytest.mark.parametrize("rule", engine.EPOCH_RULES)
def test_the_streaming_cross_validation_equals_the_one_that_kept_every_epoch(rule, monkeypatch):
    """The epoch, history, probabilities, verdicts and calibration of out_of_fold's epoch-at-a-time result equal
    (1e-6) those of the computation before it, from every epoch's logits held at once, for each rule (on this set
    they choose 3 different epochs: 1se the 4th of 8, map the 7th, loss the 8th). The records in blocks of 7 rows
    (14 cells), as 1M rows go in blocks of 18,396."""
    monkeypatch.setattr(engine, "RECORD_CELLS", 14)
    x, y = synthetic(n=45, dim=8, seed=3)
    args = recipe(epochs=8, epoch_rule=rule, scheduler="cosine")
    state, scores = cross_validate(x, y, args, workers=2)
    settings = dict(attributes=["a", "b"], thresholds="tuned", rule=rule)
    streamed = engine.finish_out_of_fold(state, np.arange(45), y, **settings)
    loss_fn = engine.make_loss_for(args, y)
    finished_alike(streamed, finish_before(scores, state.folds, np.arange(45), y, loss_fn=loss_fn, **settings))
    finished_alike(streamed, engine.finish_all_epochs(scores, state.folds, np.arange(45), y, loss_fn=loss_fn,
                                                      **settings))
    assert streamed.epochs == {"1se": 4, "map": 7, "loss": 8}[rule]
    assert set(state.kept) == engine.candidate_epochs(state.history, rule)


def test_the_epochs_the_rules_may_still_choose_by_hand_and_on_random_curves():
    """A rule's answer on the whole curve is among the candidates of every part of it: the weights of no other
    epoch are needed."""
    def curve(maps, ses=None, losses=None):
        return [{"map": m, "map_se": s, "loss": l}
                for m, s, l in zip(maps, ses or [0.0] * len(maps), losses or [0.0] * len(maps))]

    history = curve([0.5, 0.7, 0.6, 0.8, 0.8], losses=[0.9, 0.7, 0.8, 0.6, 0.65])
    assert engine.candidate_epochs(history, "1se") == {0, 1, 3}  # the records: new highs of the mAP
    assert engine.candidate_epochs(history, "map") == {3}  # the first of the ties
    assert engine.candidate_epochs(history, "loss") == {3}
    assert engine.candidate_epochs(curve([math.nan, math.nan]), "1se") == {0}  # no number: choose_epoch says 0
    assert engine.candidate_epochs(curve([math.nan, 0.4, 0.3]), "1se") == {1}
    g = np.random.default_rng(0)
    for trial in range(300):
        e = int(g.integers(1, 12))
        maps = np.round(g.uniform(0.3, 0.9, e), 2)  # rounded: ties happen
        maps[g.uniform(size=e) < 0.1] = math.nan
        history = curve(maps.tolist(), g.uniform(0, 0.2, e).tolist(), np.round(g.uniform(0, 1, e), 2).tolist())
        for rule in engine.EPOCH_RULES:
            answer = engine.choose_epoch(history, rule)
            for seen in range(answer + 1, e + 1):
                assert answer in engine.candidate_epochs(history[:seen], rule), (rule, history, seen)


def test_the_memory_of_the_cross_validation_from_its_arrays_shapes():
    """Whatever the epochs: an epoch's logits and the chosen epoch's are (repeats, n, K), dropped or handed on; of
    the rest, only the folds (n, repeats) grow with the rows; the heads' weights and Adam's moments after the last
    epoch, their dropout generators and their weights at the candidate epochs do not (and model_last.pth holds
    all that but the chosen logits)."""
    head = engine.build_head("mlp", 8, 2, hidden=512, dropout=0.2)
    weights = sum(p.numel() for p in head.parameters())  # 8 x 512 + 512 + 512 x 2 + 2 = 5,634
    tensors = len(list(head.parameters()))  # fused AdamW: a one-element step count a tensor
    generator = torch.Generator().get_state().numel()
    for epochs, repeats in ((2, 1), (6, 1), (6, 2)):
        for n in (30, 90):
            x, y = synthetic(n=n, dim=8)
            shapes = []
            state, _ = cross_validate(x, y, recipe(epochs=epochs, repeats=repeats),
                                      every_epoch=lambda epoch, logits: shapes.append(logits.shape))
            assert shapes == [(repeats, n, 2)] * epochs and state.chosen.shape == (repeats, n, 2)
            candidates = len(set(state.kept) - {epochs - 1})  # the last epoch's weights are the heads' own
            assert candidates <= epochs - 1
            heads = 3 * repeats
            held = sum(t.numel() for t in state.arrays())
            assert held == state.chosen.size + n * repeats + heads * (3 * weights + tensors + generator
                                                                       + candidates * weights)
            assert sum(t.numel() for t in engine.OutOfFold.arrays(
                engine.OutOfFold.from_checkpoint(state.to_checkpoint()))) == held - state.chosen.size


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
    cv = engine.finish_all_epochs(np.stack([logits, logits]).astype(np.float32), np.zeros((4, 2), dtype=np.int64),
                                  np.arange(4), y, attributes=["A"], thresholds="0.5", rule="map",
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

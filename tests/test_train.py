"""train.py end to end: outputs, every option, Ctrl-C and --resume, evaluate.py, and that the pipeline learns."""
import json
import math
import os
import re
import signal
import sys

import numpy as np
import pytest
import torch

import engine
import evaluate
import inference
import train
from conftest import FAST, ROOT, run_script
from dataset import parse_labels
from engine import oof_mismatch, read_oof
from metrics import attribute_metrics

PRESENT = re.compile(r"^Attributes present: \[('Attr\d'(, 'Attr\d')*)?\]$")


def path_line(out):
    """train.py's `path:` line (the second: the `labels:` line comes first)."""
    return next(line for line in out.splitlines() if line.startswith("path:"))


def train_args(tiny_set, out_dir, *extra, epochs=1):
    labels, images = tiny_set
    return FAST + ["--labels", labels, "--images", images, "--epochs", str(epochs),
                   "--out", str(out_dir / "model.pth"), "--curve", str(out_dir / "loss_curve.png"),
                   "--cache-dir", str(out_dir / "cache"), *extra]


def test_cli_end_to_end_writes_outputs_and_inference_prints_the_format(tiny_set, tmp_path, capsys):
    labels, images = tiny_set
    result = run_script("train.py", *train_args(tiny_set, tmp_path, epochs=2))
    assert result.returncode == 0, result.stderr
    for name in ("model.pth", "model_last.pth", "loss_curve.png", "metrics.json", "metrics.png", "val_labels.txt"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "loss_curve.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Self-describing and safe to load.
    ckpt = torch.load(tmp_path / "model.pth", weights_only=True)
    assert ckpt["attributes"] == ["Attr1", "Attr2", "Attr3", "Attr4"]
    assert ckpt["backbone"] == "mobilenet_v3_large" and ckpt["image_size"] == 64
    assert ckpt["mean"] == [0.485, 0.456, 0.406] and ckpt["std"] == [0.229, 0.224, 0.225]
    assert len(ckpt["thresholds"]) == 4
    # Label counts are of the training rows: 24 images less the validation rows (val_labels.txt has a header).
    n_val = len(open(tmp_path / "val_labels.txt").read().splitlines()) - 1
    counts = ckpt["label_counts"]
    assert n_val == 5 and counts["positive"][0] + counts["negative"][0] + counts["na"][0] == 24 - n_val
    capsys.readouterr()  # inference.py's own process: test_bad_input.py, test_onnx_model.py
    assert inference.main([os.path.join(images, "img_0001.jpg"), "--model", str(tmp_path / "model.pth")]) == 0
    out = capsys.readouterr().out
    assert PRESENT.match(out.rstrip("\n")), out
    assert out.count("\n") == 1


def test_loss_curve_has_one_point_per_step_and_the_required_labels(tiny_set, tmp_path, capsys):
    # 24 images, val 0.2 -> 5 validation, 19 training; batch 8 -> 3 steps per epoch; 3 epochs -> 9 points.
    assert train.main(train_args(tiny_set, tmp_path, "--patience", "0", epochs=3)) == 0
    assert "wrote " + str(tmp_path / "loss_curve.png") + " (9 steps)" in capsys.readouterr().out
    fig = train.loss_curve_figure([0.9, 0.7, 0.5])
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == \
        ("iteration_number", "training_loss", "Aimonk_multilabel_problem")
    assert list(ax.lines[0].get_xdata()) == [1, 2, 3] and list(ax.lines[0].get_ydata()) == [0.9, 0.7, 0.5]


def test_the_full_loop_gives_the_same_number_of_steps(tiny_set, tmp_path, capsys):
    assert train.main(train_args(tiny_set, tmp_path, "--augment", "strong", "--patience", "0", epochs=3)) == 0
    out = capsys.readouterr().out
    assert path_line(out).startswith("path: full loop (--augment strong)")
    assert "(9 steps)" in out


OPTIONS = [
    ["--backbone", "resnet50"],
    ["--backbone", "efficientnet_b0"],
    ["--backbone", "mobilenet_v3_large"],
    ["--backbone", "densenet121"],
    ["--backbone", "efficientnet_lite0"],
    ["--backbone", "mobilenet_v3_large", "--unfreeze", "last"],
    ["--backbone", "resnet50", "--unfreeze", "last"],
    ["--backbone", "mobilenet_v3_large", "--scheduler", "cosine", "--warmup-epochs", "0.5"],
    ["--backbone", "mobilenet_v3_large", "--scheduler", "onecycle"],
    ["--backbone", "mobilenet_v3_large", "--loss", "focal"],
    ["--backbone", "mobilenet_v3_large", "--loss", "asymmetric"],
    ["--backbone", "mobilenet_v3_large", "--augment", "strong"],
    ["--backbone", "mobilenet_v3_large", "--amp", "on"],
    ["--backbone", "mobilenet_v3_large", "--tta", "--thresholds", "tuned", "--head", "linear"],
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(x.strip("-") for x in o))
def test_every_option_trains_one_epoch_and_its_checkpoint_predicts(options, tiny_set, tmp_path, capsys):
    assert train.main(train_args(tiny_set, tmp_path, *options)) == 0
    out = capsys.readouterr().out
    expected_path = "cached features" if "last" not in options and "strong" not in options else "full loop"
    assert path_line(out).startswith(f"path: {expected_path}")
    ckpt = torch.load(tmp_path / "model.pth", weights_only=True)
    assert ckpt["backbone"] == options[1]
    image = os.path.join(tiny_set[1], "img_0003.jpg")
    assert inference.main([image, "--model", str(tmp_path / "model.pth")]) == 0
    assert PRESENT.match(capsys.readouterr().out.strip())


def test_unfreeze_last_trains_the_last_block_and_nothing_before_it(tiny_set, tmp_path):
    torch.manual_seed(0)
    assert train.main(train_args(tiny_set, tmp_path, "--backbone", "mobilenet_v3_large", "--unfreeze", "last",
                                 "--backbone-lr", "1e-2", "--seed", "0")) == 0
    after = torch.load(tmp_path / "model.pth", weights_only=True)["model"]
    torch.manual_seed(0)  # train.py builds its random backbone right after seeding with --seed
    import model as model_py

    before = model_py.build_model("mobilenet_v3_large", 4, "none", "last", 64, head=train.HEAD).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("backbone.features.16.") for k in changed)
    assert not any(k.startswith("backbone.features.1.") or k.startswith("backbone.features.14.") for k in changed)


@pytest.mark.parametrize("path, epochs", [("full", 4), ("cached", 6)])
def test_resume_after_ctrl_c_matches_an_uninterrupted_run(path, epochs, tiny_set, tmp_path, monkeypatch, capsys):
    # The full loop (strong augmentation) and the cached path (checkpoints kept in memory, written on Ctrl-C),
    # both with a cosine schedule: every piece of state that --resume restores matters (optimizer, scheduler,
    # RNG, epoch, loss history). The Ctrl-C is a real SIGINT to this process, sent as epoch 2's line is printed
    # (to a separate process, by a terminal: test_faults.py); train.main seeds every run, so nothing carries over.
    common = ["--backbone", "mobilenet_v3_large", "--scheduler", "cosine", "--patience", "0"]
    if path == "full":
        common += ["--augment", "strong"]
    straight = tmp_path / "straight"
    assert train.main(train_args(tiny_set, straight, *common, epochs=epochs)) == 0

    def log_then_ctrl_c(message=""):
        print(message, flush=True)
        if message.startswith(f"epoch   2/{epochs}"):
            os.kill(os.getpid(), signal.SIGINT)

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(train, "log", log_then_ctrl_c)
        assert train.main(train_args(tiny_set, stopped, *common, epochs=epochs)) == 130
    out, err = capsys.readouterr()
    assert "interrupted" in err and "continue with --resume" in out
    last = torch.load(stopped / "model_last.pth", weights_only=True)
    assert last["epoch"] == 2, "the run should have stopped after epoch 2"
    assert (stopped / "model.pth").exists() and (stopped / "loss_curve.png").exists()

    assert train.main(["--resume", str(stopped / "model_last.pth"), "--num-workers", "0"]) == 0
    resumed = torch.load(stopped / "model_last.pth", weights_only=True)
    reference = torch.load(straight / "model_last.pth", weights_only=True)
    assert resumed["epoch"] == reference["epoch"] == epochs
    for key in [k for k in reference["model"] if k.startswith("head.")]:
        torch.testing.assert_close(resumed["model"][key], reference["model"][key], rtol=1e-5, atol=1e-6)
    assert json.loads(resumed["state"])["losses"] == pytest.approx(json.loads(reference["state"])["losses"], rel=1e-5)


def cv_args(folder, lite0_cache):
    """A cross-validated run on the sample's pretrained features (160 px, cached once per session), where the
    out-of-fold mAP still rises after epoch 2, so the final head trains several epochs."""
    return ["--backbone", "efficientnet_lite0", "--image-size", "160", "--labels", os.path.join(ROOT, "labels.txt"),
            "--images", os.path.join(ROOT, "images"), "--cache-dir", lite0_cache, "--num-workers", "0",
            "--folds", "2", "--repeats", "2", "--epochs", "6", "--patience", "0", "--scheduler", "cosine",
            "--no-report", "--out", str(folder / "model.pth"), "--curve", str(folder / "loss_curve.png")]


@pytest.fixture(scope="module")
def straight_cv(tmp_path_factory, lite0_cache):
    folder = tmp_path_factory.mktemp("straight_cv")
    assert train.main(cv_args(folder, lite0_cache)) == 0
    assert read_oof(str(folder / "oof.npz")).epochs >= 3
    return folder


@pytest.mark.parametrize("moment", ["cross-validation", "first epoch of the final head", "final head"])
def test_resume_of_a_cross_validated_run_matches_an_uninterrupted_run(moment, straight_cv, lite0_cache, tmp_path,
                                                                      monkeypatch, capsys):
    """Ctrl-C (a real SIGINT) in the cross-validation's third epoch, in the final head's first epoch, or after its
    second epoch; then --resume: model.pth and model_last.pth equal the uninterrupted run's (1e-6), and the epochs
    the heads finished before the Ctrl-C are not trained again."""
    trigger = {"cross-validation": "cross-validation epoch   2/", "first epoch of the final head": "cross-validation (",
               "final head": "epoch   2/"}[moment]

    def log_then_ctrl_c(message=""):
        print(message, flush=True)
        if message.startswith(trigger):
            os.kill(os.getpid(), signal.SIGINT)

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(train, "log", log_then_ctrl_c)
        m.setattr(engine, "log", log_then_ctrl_c)
        assert train.main(cv_args(stopped, lite0_cache)) == 130
    out = capsys.readouterr().out
    assert f"continue with --resume {stopped / 'model_last.pth'}" in out
    if moment == "cross-validation":
        # The heads after epoch 2 (weights, optimizers, generators) and the weights of the epochs the rule may
        # choose, not (epochs x rows) scores: its one array of a row each is the folds.
        progress = engine.OutOfFold.from_checkpoint(
            torch.load(stopped / "model_last.pth", weights_only=True)["cv_progress"])
        rows = len(progress.folds)
        assert progress.epoch == 2 and len(progress.history) == 2 and progress.heads
        assert [tuple(t.shape) for t in progress.arrays() if rows in t.shape] == [(rows, 2)]
        # One stopped by the train.py before (every epoch's scores, the heads done) is refused in one line.
        old = torch.load(stopped / "model_last.pth", weights_only=True)
        old["cv_progress"] = {"folds": old["cv_progress"]["folds"], "scores": torch.zeros(2, 6, rows, 4),
                              "done": torch.zeros(4, dtype=torch.bool), "seconds": 1.0}
        torch.save(old, tmp_path / "old_last.pth")
        capsys.readouterr()
        assert train.main(["--resume", str(tmp_path / "old_last.pth"), "--num-workers", "0"]) == 2
        assert "saved by an older train.py" in capsys.readouterr().err
    assert train.main(["--resume", str(stopped / "model_last.pth"), "--num-workers", "0"]) == 0
    resumed_out = capsys.readouterr().out
    if moment == "cross-validation":
        assert "cross-validation after 2 epochs" in resumed_out
        assert "cross-validation epoch   2/" not in resumed_out and "cross-validation epoch   3/" in resumed_out
    else:
        assert "repeat " not in resumed_out  # the cross-validation's result came from the checkpoint
    for name in ("model.pth", "model_last.pth"):
        resumed = torch.load(stopped / name, weights_only=True)
        reference = torch.load(straight_cv / name, weights_only=True)
        assert resumed["epoch"] == reference["epoch"] and resumed["val_map"] == reference["val_map"]
        for key in [k for k in reference["model"] if k.startswith("head.")]:
            torch.testing.assert_close(resumed["model"][key], reference["model"][key], rtol=0, atol=1e-6)
    assert read_oof(str(stopped / "oof.npz")).probabilities == pytest.approx(
        read_oof(str(straight_cv / "oof.npz")).probabilities, abs=1e-6)


def test_a_best_checkpoint_cannot_be_resumed(tiny_set, tmp_path, capsys):
    assert train.main(train_args(tiny_set, tmp_path)) == 0
    assert train.main(["--resume", str(tmp_path / "model.pth")]) == 2
    assert "error:" in capsys.readouterr().err


def test_evaluate_reproduces_the_validation_table(tiny_set, tmp_path, capsys):
    assert train.main(train_args(tiny_set, tmp_path, "--backbone", "mobilenet_v3_large", epochs=3)) == 0
    capsys.readouterr()
    reported = json.load(open(tmp_path / "metrics.json"))["validation"]
    assert evaluate.main(["--labels", str(tmp_path / "val_labels.txt"), "--images", tiny_set[1],
                          "--model", str(tmp_path / "model.pth"), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    for mine, theirs in zip(measured["attributes"], reported["attributes"]):
        for key in ("positives", "negatives", "f1", "precision", "recall", "threshold"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-6), key
        assert (mine["ap"] is None and theirs["ap"] is None) or mine["ap"] == pytest.approx(theirs["ap"], abs=1e-4)


def test_the_pipeline_learns_with_pretrained_features(tmp_path, capsys, lite0_cache):
    """EfficientNet-Lite0 ImageNet features (from PyPI, offline) + the head, on the shipped sample.

    Measured on this machine (seed 0, 160 px, up to 30 epochs, 3 folds: out-of-fold, so no image is scored by a
    head that saw it): mAP 0.987, per-attribute AP 1.000 / 0.990 / 1.000 / 0.956 against prevalences 0.65 / 0.50 /
    0.40 / 0.08 (the AP of a random ranker; their mean 0.41 is the mAP of guessing). A broken pipeline (labels
    shuffled, NA read as 0, features misaligned, BatchNorm drifting) lands near that 0.41. The bar 0.85 leaves
    room for other seeds and library versions, and each attribute must beat its prevalence by at least 0.3."""
    result = train.main(["--backbone", "efficientnet_lite0", "--labels", os.path.join(ROOT, "labels.txt"),
                         "--images", os.path.join(ROOT, "images"), "--out", str(tmp_path / "model.pth"),
                         "--curve", str(tmp_path / "curve.png"), "--cache-dir", lite0_cache, "--image-size", "160",
                         "--epochs", "30", "--folds", "3", "--seed", "0", "--no-report"])
    assert result == 0
    metrics = json.load(open(tmp_path / "metrics.json"))
    validation = metrics["validation"]
    assert validation["map"] >= 0.85
    for row in validation["attributes"]:
        assert row["ap"] >= row["prevalence"] + 0.3, row
        assert row["f1"] > row["majority_f1"], row
    print(json.dumps({r["attribute"]: [round(r["ap"], 3), round(r["f1"], 3)] for r in validation["attributes"]}),
          validation["map"], validation["macro_f1"], metrics["cross_validation"]["epochs"], file=sys.stderr)
    table = capsys.readouterr().out
    assert "mAP" in table and "Attr4" in table


def test_val_fraction_zero_trains_on_everything_and_keeps_the_last_epoch(tiny_set, tmp_path, capsys):
    assert train.main(train_args(tiny_set, tmp_path, "--val-fraction", "0", epochs=2)) == 0
    out = capsys.readouterr().out
    assert "24 images used (24 train, 0 validation)" in out
    ckpt = torch.load(tmp_path / "model.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["thresholds"] == [0.5] * 4 and ckpt["val_map"] is None
    assert not (tmp_path / "metrics.png").exists() and not (tmp_path / "val_labels.txt").exists()
    assert json.load(open(tmp_path / "metrics.json"))["best_epoch"] == 2


def test_batched_inference_equals_one_image_at_a_time(tiny_set, tmp_path, capsys):
    # Batches go through the backbone with BatchNorm folded into its convs; one image through the model as saved.
    assert train.main(train_args(tiny_set, tmp_path, "--backbone", "resnet50")) == 0
    assert "(freed memory kept for reuse)" in path_line(capsys.readouterr().out)
    model_path = str(tmp_path / "model.pth")
    images = [os.path.join(tiny_set[1], f"img_000{i}.jpg") for i in (1, 2, 3)]
    assert inference.main([*images, "--model", model_path, "--json", "--num-workers", "0"]) == 0
    batched = [json.loads(line)["probabilities"] for line in capsys.readouterr().out.splitlines()]
    for image, together in zip(images, batched):
        assert inference.main([image, "--model", model_path, "--json", "--no-keep-freed-memory"]) == 0
        alone = json.loads(capsys.readouterr().out)["probabilities"]
        assert alone == pytest.approx(together, abs=1e-5)


def test_no_keep_freed_memory_is_said_in_the_first_line(tiny_set, tmp_path, capsys):
    assert train.main(train_args(tiny_set, tmp_path, "--no-keep-freed-memory", "--val-fraction", "0")) == 0
    first = path_line(capsys.readouterr().out)
    assert first.startswith("path: cached features") and "freed memory" not in first


# ---- the one loop ----

def test_lr_factor_hand_computed():
    # none: constant; linear warm-up over 4 steps: (step + 1) / 4
    assert [engine.lr_factor(s, schedule="none", total_steps=10, warmup_steps=4) for s in range(5)] == \
        [0.25, 0.5, 0.75, 1.0, 1.0]
    # cosine after a 2-step warm-up over the 8 steps left: step 6 is halfway, (1 + cos(pi / 2)) / 2 = 0.5
    assert engine.lr_factor(6, schedule="cosine", total_steps=10, warmup_steps=2) == pytest.approx(0.5)
    assert engine.lr_factor(10, schedule="cosine", total_steps=10, warmup_steps=2) == pytest.approx(0.0)
    # onecycle, 30% warm-up when none is given: 1/25 at step 0, 1 at step 3 of 10, 1/25e4 at the end
    assert engine.lr_factor(0, schedule="onecycle", total_steps=10, warmup_steps=0) == pytest.approx(1 / 25)
    assert engine.lr_factor(3, schedule="onecycle", total_steps=10, warmup_steps=0) == pytest.approx(1.0)
    assert engine.lr_factor(10, schedule="onecycle", total_steps=10, warmup_steps=0) == pytest.approx(1 / 25e4)


def test_the_loop_trains_the_same_head_from_features_and_from_images(tiny_set):
    # Features of the unflipped images through the head are the images through the model, so one epoch of the
    # one loop (same batches in the same order) gives the same head from either source of batches.
    import numpy as np

    import feature_cache
    from data_loader import FeatureBatches, ImageBatches
    from dataset import eval_transform, load_dataset
    from loss import MaskedBCE
    from model import build_model
    from utils import Report, StopFlag

    report = Report()
    _, paths, targets = load_dataset(*tiny_set, report)
    index = np.arange(len(paths))
    torch.manual_seed(0)
    model = build_model("resnet50", 4, "none", "none", 64).eval()
    extracted = feature_cache.extract(model, paths, image_size=64, mean=(0.485, 0.456, 0.406),
                                      std=(0.229, 0.224, 0.225), batch_size=8, num_workers=0,
                                      device=torch.device("cpu"), amp=False, views=(0,))
    features = np.concatenate([f for _, f, _ in extracted])
    features = np.repeat(features, 2, axis=1)  # both views unflipped: the image source below does not flip
    heads = []
    for source in ("features", "images"):
        m = build_model("resnet50", 4, "none", "none", 64)
        m.load_state_dict(model.state_dict())
        if source == "features":
            batches, forward = FeatureBatches(features, index, index, targets, batch_size=8, shuffle=False,
                                              seed=1), m.head
        else:
            batches = ImageBatches(paths, index, targets, eval_transform(64), batch_size=8, shuffle=False,
                                   num_workers=0, seed=1, device=torch.device("cpu"), report=report)
            forward = engine.image_forward(m, device=torch.device("cpu"), amp=False)
        batches.set_epoch(2)
        optimizer = engine.make_optimizer(m.head, train.parse_args([]))
        stop = StopFlag()
        losses, seen = engine.train_one_epoch(forward, batches, loss_fn=MaskedBCE(torch.ones(4)), optimizer=optimizer,
                                             lr_at=lambda step: 1.0, first_step=0, device=torch.device("cpu"),
                                             stop=stop, label="test")
        stop.restore()
        assert seen == len(paths) and len(losses) == 3
        heads.append(m.head.weight.detach().clone())
    # Adam moves each weight by about lr = 1e-3 a step, whatever the gradient's size: another order or other
    # targets differ by that much; the two forwards (BatchNorm folded or not) by float rounding only.
    torch.testing.assert_close(heads[0], heads[1], atol=1e-4, rtol=0)


def test_an_old_format_last_checkpoint_gets_a_clear_error_and_its_best_model_still_predicts(tiny_set, tmp_path,
                                                                                              capsys):
    assert train.main(train_args(tiny_set, tmp_path)) == 0
    for name in ("model_last.pth", "model.pth"):
        ckpt = torch.load(tmp_path / name, weights_only=True)
        ckpt["format"] = "aimonk-multilabel/1"  # the format before the step-function learning rate
        torch.save(ckpt, tmp_path / name)
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "model_last.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "older version" in err and err.count("\n") == 1
    image = os.path.join(tiny_set[1], "img_0001.jpg")
    assert inference.main([image, "--model", str(tmp_path / "model.pth")]) == 0
    assert PRESENT.match(capsys.readouterr().out.rstrip("\n"))


# ---- the default recipe: cross-validation, the offline backbone ----

def test_cross_validation_picks_epochs_and_thresholds_out_of_fold_then_trains_on_every_row(tiny_set, tmp_path,
                                                                                            capsys):
    args = train_args(tiny_set, tmp_path, "--backbone", "mobilenet_v3_large", "--repeats", "2", epochs=4)
    args[args.index("--folds") + 1] = "3"
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("labels: labels.txt read as table, 24 rows x 4 attributes")
    assert "path: cached features (3-fold cross-validation x 2)" in path_line(out)
    assert "24 images used (24 train, 0 validation)" in out
    assert re.findall(r"^repeat (\d)/2: 3 heads of 4 epochs, 8-8 rows held out each", out, re.M) == ["1", "2"]
    metrics = json.load(open(tmp_path / "metrics.json"))
    chosen = metrics["cross_validation"]["epochs"]
    history = metrics["cross_validation"]["history"]
    curve = [h["map"] for h in history]
    best = int(np.argmax(curve))
    # --epoch-rule 1se: the first epoch within one standard error of the best (the heads' own fold mAPs' spread)
    assert len(curve) == 4 and chosen - 1 == next(e for e, m in enumerate(curve) if m >= curve[best] -
                                                  history[best]["map_se"])
    assert history[best]["map_se"] > 0
    assert len(metrics["cross_validation"]["map_of_each_repeat"]) == 2
    assert f"the final head trains {chosen} epochs on all 24 rows" in out
    ckpt = torch.load(tmp_path / "model.pth", weights_only=True)
    assert ckpt["epoch"] == chosen and ckpt["tta"] is True
    # The default thresholds: where the head's sigmoid is 0.5, on the calibrated scale sigmoid(intercept); an
    # attribute not learnt (24 images on a random backbone: all of them here) 0.5 on its constant prevalence.
    learnt = [r["learnt"] for r in metrics["validation"]["attributes"]]
    assert ckpt["learnt"] == learnt and len(ckpt["p_values"]) == 4
    expected = [1 / (1 + math.exp(-b)) if ok else 0.5 for b, ok in zip(ckpt["calibration"]["intercept"], learnt)]
    assert ckpt["thresholds"] == pytest.approx(expected)
    assert [r["threshold"] for r in metrics["validation"]["attributes"]] == pytest.approx(expected)
    assert [s == 0 for s in ckpt["calibration"]["slope"]] == [not ok for ok in learnt]
    assert ckpt["val_map"] == pytest.approx(curve[chosen - 1])
    assert not (tmp_path / "val_labels.txt").exists()  # no held-out rows: every row trained the final head
    assert len(torch.load(tmp_path / "model_last.pth", weights_only=True)["state"]) > 0
    # oof.npz: every row once, two fold assignments of 8 + 8 + 8, and the very numbers metrics.json reports.
    oof = read_oof(str(tmp_path / "oof.npz"))
    given = parse_labels(tiny_set[0])
    assert oof.names == list(given.names) and (oof.targets == given.targets).all()
    assert oof.probabilities.shape == (24, 4) and oof.epochs == chosen and oof.config["repeats"] == 2
    assert [np.bincount(oof.folds[:, r]).tolist() for r in range(2)] == [[8, 8, 8], [8, 8, 8]]
    assert (oof.folds[:, 0] != oof.folds[:, 1]).any()
    recomputed = attribute_metrics(oof.probabilities, oof.targets, [0.5] * 4, oof.attributes)
    assert recomputed["map"] == pytest.approx(metrics["validation"]["map"], abs=1e-9)
    assert oof_mismatch(oof, labels_path=tiny_set[0], images=tiny_set[1]) is None


def test_offline_default_command_trains_the_packaged_backbone_and_says_why(tiny_set, tmp_path, capsys, torch_home,
                                                                           no_network):
    labels, images = tiny_set
    common = ["--labels", labels, "--images", images, "--out", str(tmp_path / "model.pth"), "--curve",
              str(tmp_path / "curve.png"), "--cache-dir", str(tmp_path / "cache"), "--image-size", "64",
              "--epochs", "1", "--folds", "2", "--num-workers", "0"]
    assert train.main(common) == 0  # neither --backbone nor --weights: falls back
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "resnet50-11ad3fa6.pth" in warnings[0] and "efficientnet_lite0" in warnings[0]
    first = next(line for line in captured.out.splitlines() if line.startswith("path:"))
    assert "backbone efficientnet_lite0" in first and "resnet50's ImageNet weights could not be had" in first
    ckpt = torch.load(tmp_path / "model.pth", weights_only=True)
    assert ckpt["backbone"] == "efficientnet_lite0" and "could not be had" in ckpt["backbone_reason"]
    assert ckpt["mean"] == pytest.approx([127 / 255] * 3) and ckpt["std"] == pytest.approx([128 / 255] * 3)
    assert json.load(open(tmp_path / "metrics.json"))["backbone"]["name"] == "efficientnet_lite0"
    # An explicit --backbone resnet50 keeps today's clean error.
    assert train.main(common + ["--backbone", "resnet50"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot get the ImageNet weights for resnet50") and "Traceback" not in err


def test_a_cross_validated_run_writes_its_report_from_the_features_it_trained_on(tiny_set, tmp_path, capsys):
    args = [a for a in train_args(tiny_set, tmp_path, "--backbone", "mobilenet_v3_large", epochs=2)
            if a != "--no-report"]
    args[args.index("--folds") + 1] = "2"
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("extracting ") == 1  # the report found train.py's features in the cache
    assert (tmp_path / "report.html").stat().st_size > 0
    # As resolved, not "auto": True on a CPU with AMX (or a bf16 GPU), else False.
    from utils import bf16_is_native

    assert torch.load(tmp_path / "model.pth", weights_only=True)["amp"] is bf16_is_native(torch.device("cpu"))

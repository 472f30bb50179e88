"""tracking.py through train.py: TensorBoard's event files and a local MLflow store read back with their own
readers, a resumed run continuing its own log, a tracker that cannot be reached, run folders, report.py --compare."""
import argparse
import json
import os
import signal

import pytest
import torch

import make_sample
import report
import tracking
import train

# MLflow's SQLite store, inside MLflow: not this project's to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

CV = ["--folds", "2", "--repeats", "1"]
SPLIT = ["--folds", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 generated images and one feature cache for every run of this module."""
    folder = tmp_path_factory.mktemp("data")
    make_sample.generate(24, str(folder / "images"), str(folder / "labels.txt"), seed=7, na_rate=0.09)
    return folder


def base(data, *extra, epochs=3):
    return ["--weights", "none", "--backbone", "mobilenet_v3_large", "--image-size", "32", "--num-workers", "0",
            "--batch-size", "8", "--no-report", "--patience", "0", "--epochs", str(epochs),
            "--labels", str(data / "labels.txt"), "--images", str(data / "images"), "--cache-dir", str(data / "cache"),
            *extra]


def outside(folder, *extra):
    return ["--out", str(folder / "model.pth"), "--curve", str(folder / "loss_curve.png"), *extra]


def metrics(folder):
    with open(folder / "metrics.json") as f:
        return json.load(f)


def last_state(folder):
    return json.loads(torch.load(folder / "model_last.pth", weights_only=True)["state"])


@pytest.fixture(scope="module")
def mlflow_home(tmp_path_factory):
    """MLflow's own local default (no MLFLOW_TRACKING_URI) in a folder of its own, the working folder there."""
    folder = tmp_path_factory.mktemp("mlflow_home")
    with pytest.MonkeyPatch.context() as m:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            m.delenv(name, raising=False)
        m.chdir(folder)
        yield folder


def mlflow_run(run_id):
    """The MLflow run tagged with train.py's run id (exactly one)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    runs = client.search_runs(["0"], filter_string=f"tags.run_id = '{run_id}'")
    assert len(runs) == 1, runs
    return client, runs[0]


def history(client, run, name):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def two_runs(data, tmp_path_factory, one_thread):
    """Two cross-validated runs with --run-dir and the same --name: the first logged to TensorBoard, the second
    with a linear head."""
    runs = tmp_path_factory.mktemp("two") / "runs"
    assert train.main(base(data, *CV, "--run-dir", str(runs), "--name", "exp", "--log", "tensorboard")) == 0
    assert train.main(base(data, *CV, "--run-dir", str(runs), "--name", "exp", "--head", "linear")) == 0
    return runs


def test_run_dir_twice_gives_two_folders_each_with_all_its_outputs(two_runs):
    assert sorted(os.listdir(two_runs)) == ["exp", "exp-2"]
    for name, head in (("exp", "mlp"), ("exp-2", "linear")):
        folder = two_runs / name
        for output in ("model.pth", "model_last.pth", "loss_curve.png", "metrics.json", "metrics.png", "oof.npz"):
            assert (folder / output).stat().st_size > 0, (name, output)
        ckpt = torch.load(folder / "model.pth", weights_only=True)
        assert ckpt["config"]["head"] == head and ckpt["config"]["out"] == str(folder / "model.pth")
        assert metrics(folder)["run"]["config"]["head"] == head
    assert any(f.startswith("events.out.tfevents.") for f in os.listdir(two_runs / "exp"))
    assert not any(f.startswith("events.out.tfevents.") for f in os.listdir(two_runs / "exp-2"))


def test_tensorboard_event_files_hold_the_scalars_of_metrics_json_hparams_and_pr_curves(two_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    folder = two_runs / "exp"
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    summary, state = metrics(folder), last_state(folder)
    cv = summary["cross_validation"]

    def scalars(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    # The cross-validation's out-of-fold numbers of each epoch, float32 in the event file.
    assert scalars("val/mAP") == [(h["epoch"], pytest.approx(h["map"], rel=1e-6)) for h in cv["history"]]
    assert scalars("val/AP/Attr2") == [(h["epoch"], pytest.approx(h["ap"][1], rel=1e-6)) for h in cv["history"]]
    assert scalars("cv/chosen_epoch") == [(cv["epochs"], cv["epochs"])]
    # The final head: the loss of every optimizer step (1-based, as loss_curve.png), then the final numbers.
    assert scalars("train/loss") == [(i + 1, pytest.approx(x, rel=1e-6)) for i, x in enumerate(state["losses"])]
    assert [v for _, v in scalars("train/epoch_loss")] == pytest.approx([h["train_loss"] for h in summary["history"]])
    assert scalars("final/mAP") == [(summary["best_epoch"], pytest.approx(summary["validation"]["map"], rel=1e-6))]
    assert scalars("final/macro_F1")[0][1] == pytest.approx(summary["validation"]["macro_f1"], rel=1e-6)
    # The HParams plugin: the run's settings and the final metrics it compares runs on.
    content = {tag: HParamsPluginData.FromString(data) for tag, data in events.PluginTagToContent("hparams").items()}
    hparams = content["_hparams_/session_start_info"].session_start_info.hparams
    assert hparams["head"].string_value == "mlp" and hparams["epochs"].number_value == 3
    assert hparams["tta"].number_value == 1 and "out" not in hparams  # add_hparams takes a bool for a number
    metric_names = {m.name.tag for m in content["_hparams_/experiment"].experiment.metric_infos}
    assert {"final/mAP", "final/macro_F1", "final/AP/Attr1"} <= metric_names
    # A precision-recall curve per attribute from the out-of-fold probabilities, at the chosen epoch.
    for attribute in ("Attr1", "Attr2", "Attr3", "Attr4"):
        (curve,) = events.Tensors(f"pr/{attribute}")
        assert curve.step == cv["epochs"]
    assert {"figures/loss_curve", "figures/metrics"} <= set(events.Tags()["images"])


def test_compare_prints_the_settings_that_differ_and_each_run_s_numbers(two_runs, capsys):
    assert report.main(["--compare", str(two_runs / "exp"), str(two_runs / "exp-2")]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["run", "head", "scored"]  # nothing else differs: not the backbone, not the paths
    assert "AP Attr4" in header and header.endswith("time")
    for row, name, head in zip(rows, ("exp", "exp-2"), ("mlp", "linear")):
        summary = metrics(two_runs / name)
        cells = row.split()
        assert cells[:5] == [str(two_runs / name), head, "out-of-fold", "1x2", str(summary["best_epoch"])]
        assert cells[5] == f"{summary['validation']['map']:.3f}"
        assert cells[7] == f"{summary['validation']['macro_f1']:.3f}"
    assert len(rows) == 2


def test_compare_of_no_run_is_one_error_line(tmp_path, capsys):
    assert report.main(["--compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("warning: ") and err[1].startswith("error: --compare")


@pytest.fixture(scope="module")
def logged_and_not(data, mlflow_home, tmp_path_factory, one_thread):
    """The same split run three times: logged to MLflow, not logged, and logged to a server that is not there."""
    top = tmp_path_factory.mktemp("same")
    assert train.main(base(data, *SPLIT, *outside(top / "mlflow", "--log", "mlflow"))) == 0
    assert train.main(base(data, *SPLIT, *outside(top / "none"))) == 0
    return top


def test_mlflow_store_holds_the_params_metrics_and_artifacts(logged_and_not):
    folder = logged_and_not / "mlflow"
    ckpt = torch.load(folder / "model_last.pth", weights_only=True)
    client, run = mlflow_run(ckpt["run_id"])
    assert run.info.run_id == ckpt["config"]["mlflow_run_id"] and run.info.status == "FINISHED"
    params = run.data.params
    assert params["head"] == "mlp" and params["epochs"] == "3" and params["folds"] == "0" and "out" not in params
    summary, state = metrics(folder), last_state(folder)
    assert history(client, run, "val/mAP") == [(h["epoch"], pytest.approx(h["map"])) for h in summary["history"]]
    assert history(client, run, "val/loss") == [(h["epoch"], pytest.approx(h["val_loss"]))
                                                for h in summary["history"]]
    assert history(client, run, "train/loss") == [(i + 1, pytest.approx(x)) for i, x in enumerate(state["losses"])]
    assert run.data.metrics["final/mAP"] == pytest.approx(summary["validation"]["map"])
    assert run.data.metrics["final/AP/Attr1"] == pytest.approx(summary["validation"]["attributes"][0]["ap"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pth", "metrics.json", "loss_curve.png", "metrics.png"} <= artifacts
    # The store is MLflow's own local default, in the working folder (MLflow 3: mlflow.db, the artifacts in mlruns/).
    assert os.getcwd() in client.tracking_uri and os.path.isdir("mlruns")


def same_outputs(a, b):
    one, two = metrics(a), metrics(b)
    one.pop("run"), two.pop("run")
    assert one == two
    first, second = (torch.load(f / "model.pth", weights_only=True) for f in (a, b))
    for key in first["model"]:
        assert torch.equal(first["model"][key], second["model"][key]), key


def test_logging_does_not_change_the_outputs(logged_and_not):
    same_outputs(logged_and_not / "mlflow", logged_and_not / "none")


def test_an_unreachable_tracking_server_is_one_warning_and_the_same_outputs(logged_and_not, data, monkeypatch,
                                                                            capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    folder = logged_and_not / "unreachable"
    capsys.readouterr()
    assert train.main(base(data, *SPLIT, *outside(folder, "--log", "mlflow"))) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "http://127.0.0.1:1 cannot be reached" in warnings[0], err
    assert "Traceback" not in err
    same_outputs(folder, logged_and_not / "none")
    assert "mlflow_run_id" not in torch.load(folder / "model.pth", weights_only=True)["config"]


@pytest.mark.parametrize("log", ["mlflow", "tensorboard"])
def test_a_resumed_run_continues_its_own_log(log, data, mlflow_home, tmp_path, monkeypatch, capsys, one_thread):
    """Ctrl-C (a real SIGINT) after epoch 2 of 4, then --resume: one MLflow run (one TensorBoard folder) holds
    every optimizer step and every epoch once, in order."""
    def log_then_ctrl_c(message=""):
        print(message, flush=True)
        if message.startswith("epoch   2/4"):
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as m:
        m.setattr(train, "log", log_then_ctrl_c)
        assert train.main(base(data, *SPLIT, *outside(tmp_path, "--log", log), epochs=4)) == 130
    config = torch.load(tmp_path / "model_last.pth", weights_only=True)["config"]
    if log == "mlflow":
        client, run = mlflow_run(torch.load(tmp_path / "model_last.pth", weights_only=True)["run_id"])
        assert run.info.status == "KILLED" and [s for s, _ in history(client, run, "val/mAP")] == [1, 2]
    assert train.main(["--resume", str(tmp_path / "model_last.pth"), "--num-workers", "0"]) == 0
    assert "warning" not in capsys.readouterr().err
    summary, state = metrics(tmp_path), last_state(tmp_path)
    assert len(summary["history"]) == 4 and len(state["losses"]) == 4 * 3  # 19 training rows, batches of 8
    if log == "mlflow":
        client, run = mlflow_run(torch.load(tmp_path / "model_last.pth", weights_only=True)["run_id"])
        assert run.info.run_id == config["mlflow_run_id"] and run.info.status == "FINISHED"
        steps, epochs = history(client, run, "train/loss"), history(client, run, "val/mAP")
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        folder = config["tensorboard_dir"]
        assert os.path.dirname(folder) == str(tmp_path / "runs")  # runs/<date-time> beside --out, no run folder
        assert len([f for f in os.listdir(folder) if f.startswith("events.")]) == 2  # one per process
        events = EventAccumulator(folder, size_guidance={"scalars": 0})
        events.Reload()
        steps, epochs = ([(e.step, e.value) for e in events.Scalars(tag)] for tag in ("train/loss", "val/mAP"))
    assert steps == [(i + 1, pytest.approx(x, rel=1e-6)) for i, x in enumerate(state["losses"])]
    assert epochs == [(h["epoch"], pytest.approx(h["map"], rel=1e-6)) for h in summary["history"]]


# ---- tracking.py alone ----

def namespace(tmp_path, **kw):
    return argparse.Namespace(**{"log": "tensorboard", "resume": None, "run_dir": None, "name": None,
                                 "no_report": True, "out": str(tmp_path / "model.pth"), **kw})


def test_a_tracker_that_cannot_be_imported_is_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    log = tracking.start(namespace(tmp_path), attributes=["a"], outputs={}, run_id="x")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --log tensorboard: ") and "pip install tensorboard" in err[0]
    assert log.tracker.name == "none"
    assert log.end(0) == 0 and not os.listdir(tmp_path)


class Failing(tracking.Tracker):
    name = "mlflow"
    calls = 0

    def log_scalars(self, step, scalars):
        Failing.calls += 1
        raise OSError("the server went away\nsecond line")


def test_a_tracker_failing_mid_run_is_one_warning_then_nothing(tmp_path, capsys):
    log = tracking.RunLog(Failing(), attributes=["a"], outputs={}, params={}, report=False)
    for epoch in (1, 2, 3):
        log.epoch({"epoch": epoch, "train_loss": 0.5, "map": 0.7, "ap": [0.7]}, [0.5, 0.4], first_step=2 * epoch)
        log.flush()
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: --log mlflow stopped: OSError: the server went away; the run goes on without it"]
    assert Failing.calls == 1 and log.tracker.name == "none" and log.end(0) == 0


def test_final_metrics_are_metrics_json_s_numbers_without_the_missing_ones():
    attributes = [{"attribute": "x y(1)", "ap": 0.75}, {"attribute": "rare", "ap": None}]
    summary = {"best_epoch": 4, "validation_at_0.5": {"macro_f1": 0.2},
               "validation": {"map": 0.5, "macro_f1": 0.25, "attributes": attributes}}
    assert tracking.final_metrics(summary) == {"final/mAP": 0.5, "final/macro_F1": 0.25, "final/macro_F1_at_0.5": 0.2,
                                               "final/epoch": 4.0, "final/AP/x y(1)": 0.75}
    assert tracking.metric_name("final/AP/x y(1)") == "final/AP/x y_1_"


def test_run_folders_get_a_suffix_and_names_stay_plain(tmp_path):
    assert tracking.run_folder(str(tmp_path), "a") == str(tmp_path / "a")
    assert tracking.run_folder(str(tmp_path), "a") == str(tmp_path / "a-2")
    assert tracking.run_folder(str(tmp_path), "a") == str(tmp_path / "a-3")
    with pytest.raises(tracking.UserError, match="plain folder name"):
        tracking.run_folder(str(tmp_path), "../a")


def test_the_default_writes_where_it_always_did(data, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    assert train.main(base(data, *SPLIT, epochs=1)) == 0
    assert {"model.pth", "model_last.pth", "loss_curve.png", "metrics.json"} <= set(os.listdir(tmp_path))
    assert not (tmp_path / "runs").exists()



def test_a_rank_other_than_0_makes_no_folder_and_logs_nothing(tmp_path, monkeypatch, capsys):
    """Under torchrun (2 real ranks: checked by hand, 22 s on this machine) rank 0's folder reaches every rank
    through distributed.broadcast; here the other rank's side alone."""
    monkeypatch.setattr(tracking.distributed, "is_main", lambda: False)
    monkeypatch.setattr(tracking.distributed, "broadcast", lambda obj: str(tmp_path / "rank0s"))
    assert tracking.run_folder(str(tmp_path / "runs"), "x") == str(tmp_path / "rank0s")
    log = tracking.start(namespace(tmp_path), attributes=["a"], outputs={}, run_id="x")
    assert log.tracker.name == "none" and not os.listdir(tmp_path) and capsys.readouterr().err == ""

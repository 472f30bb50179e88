"""train.py, inference.py and evaluate.py on 2 processes (gloo, CPU, 1 thread each) against 1 process.

The ranks are started here with the environment torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT: init_process_group's env:// rendezvous), so that each rank's output can be read apart and a
hang fails at the timeout; test_torchrun runs one job through torchrun itself."""
import contextlib
import glob
import json
import signal
import os
import runpy
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import evaluate
import inference
import make_sample
import train
from conftest import FAST, ROOT

TIMEOUT = 120  # seconds for a whole 2-process job on a busy 2-core machine


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script, *args, world=2, timeout=TIMEOUT):
    """[(returncode, stdout, stderr) of each rank], all started at once as torchrun would."""
    port, procs = free_port(), []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", TRAIN_DIST_TIMEOUT="60")
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline, results = time.time() + timeout, []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.time(), 1))
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def in_process(main, *args):
    """main(argv) here, on one thread as each rank runs (OMP_NUM_THREADS=1; the features are then bitwise those
    of a rank): the one-process side of a comparison without starting another interpreter (~3 s each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def patched_argv(*args):
    saved = sys.argv
    sys.argv = [str(a) for a in args]
    try:
        yield
    finally:
        sys.argv = saved


def ok(results):
    for code, out, err in results:
        assert code == 0, err
    return results[0]


def cache_rows(cache_dir):
    """{image key: (2, D) features} of the one feature store under cache_dir."""
    (folder,) = glob.glob(os.path.join(cache_dir, "*", ""))
    with np.load(os.path.join(folder, "index.npz")) as z:
        meta, keys = json.loads(z["meta"].tobytes()), z["keys"].tobytes().decode().split("\0")
    data = np.fromfile(os.path.join(folder, meta["data"]), dtype=np.float32).reshape(-1, 2, meta["dim"])
    return dict(zip(keys, data[:len(keys)]))


def head(path):
    return {k: v for k, v in torch.load(path, weights_only=True)["model"].items() if k.startswith("head.")}


def numbers(obj):
    """Every number of a metrics.json, in order, rounded to 3 decimals (NaN as a string); not the warnings, nor the
    run's settings and seconds (`run`: its output paths and its time differ by construction)."""
    if isinstance(obj, dict):
        return [x for k in sorted(obj) if k not in ("warnings", "run") for x in numbers(obj[k])]
    if isinstance(obj, list):
        return [x for v in obj for x in numbers(v)]
    if isinstance(obj, float):
        return ["nan" if obj != obj else round(obj, 3)]
    return [obj] if isinstance(obj, int) else []


def train_args(tiny_set, out, *extra):
    """FAST flags (a later --folds wins), outputs and feature cache in out."""
    labels, images = tiny_set
    return ["--labels", labels, "--images", images, *FAST, "--out", out / "model.pth", "--curve", out / "curve.png",
            "--cache-dir", out / "cache", *extra]


def test_cached_path_equals_one_process(tiny_set, tmp_path, capsys):
    """2-fold cross-validation and the final head on features extracted half by each rank: the same features
    (bitwise: a rank's batch holds the same 8 images as the one-process batch), head and metrics.json."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert in_process(train.main, *train_args(tiny_set, one, "--folds", "2", "--epochs", "3")) == 0
    rank0, rank1 = run_ranks("train.py", *train_args(tiny_set, two, "--folds", "2", "--epochs", "3"))
    assert rank0[0] == rank1[0] == 0, rank0[2] + rank1[2]
    assert rank1[1] == "" and "cross-validation" in rank0[1]  # only rank 0 speaks
    a, b = cache_rows(one / "cache"), cache_rows(two / "cache")
    assert sorted(a) == sorted(b) and len(a) == 24
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for k, v in head(one / "model.pth").items():
        assert torch.allclose(v, head(two / "model.pth")[k], atol=1e-5), k
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert numbers(m1) == numbers(m2) and len(numbers(m1)) > 20
    # A later run of any world size uses the store the 2 ranks left: nothing left to extract.
    capsys.readouterr()
    assert in_process(train.main, *train_args(tiny_set, tmp_path / "again", "--folds", "2", "--epochs", "1",
                                              "--cache-dir", two / "cache")) == 0
    again = capsys.readouterr().out
    assert "24 of 24 images found" in again and "extracting" not in again


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny set and one one-process epoch of the full loop (--augment strong) on it: the model the inference
    test reads and the model_last.pth the resume test continues on 2 ranks (either order gives what both need)."""
    folder = tmp_path_factory.mktemp("trained")
    labels, images = str(folder / "labels.txt"), str(folder / "images")
    make_sample.generate(24, images, labels, seed=7, na_rate=0.09)
    assert in_process(train.main, *train_args((labels, images), folder, "--augment", "strong", "--epochs", "1")) == 0
    return labels, images, folder


def test_inference_through_torchrun_and_evaluate_equal_one_process(trained, capsys):
    """Inference through torchrun itself (--standalone: c10d rendezvous on this machine): each rank predicts every
    other batch of 8 (24 images, 3 batches: rank 0 two, rank 1 one) and rank 0 prints every line in input order,
    the one-process lines with the probabilities equal to float rounding. evaluate.py on 2 ranks prints the
    one-process table."""
    labels, images, folder = trained
    model = folder / "model.pth"
    flags = [images, "--model", model, "--json", "--batch-size", "8", "--num-workers", "0"]
    capsys.readouterr()
    assert in_process(inference.main, *flags) == 0
    single = capsys.readouterr().out
    env = dict(os.environ, OMP_NUM_THREADS="1", TRAIN_DIST_TIMEOUT="60")
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               os.path.join(ROOT, "inference.py"), *map(str, flags)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
    assert launched.returncode == 0, launched.stderr
    lines1, lines2 = ([json.loads(x) for x in out.splitlines()] for out in (single, launched.stdout))
    assert [x["image"] for x in lines1] == [x["image"] for x in lines2] and len(lines1) == 24
    assert [x["present"] for x in lines1] == [x["present"] for x in lines2]
    for a, b in zip(lines1, lines2):
        assert np.allclose(list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-5)
    flags = ["--labels", labels, "--images", images, "--model", model, "--batch-size", "8", "--num-workers", "0"]
    assert in_process(evaluate.main, *flags) == 0
    single = capsys.readouterr().out
    rank0, rank1 = run_ranks("evaluate.py", *flags)
    assert rank0[0] == rank1[0] == 0 and rank1[1] == ""
    assert rank0[1] == single and rank0[1].splitlines()[1].startswith("24 images")  # after the labels: line


def test_a_bad_labels_file_ends_every_rank_with_one_error_line(tiny_set, tmp_path):
    labels, images = tiny_set
    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg 1 0\nb.jpg 1\n")
    started = time.time()
    results = run_ranks("train.py", *train_args((str(bad), images), tmp_path), timeout=60)
    assert time.time() - started < 60
    assert all(code != 0 for code, _, _ in results)
    stderr = "".join(err for _, _, err in results)
    assert len([line for line in stderr.splitlines() if line.startswith("error:")]) == 1, stderr
    assert "Traceback" not in stderr and str(bad) in stderr


# One epoch of engine.train_one_epoch on the full loop's pieces, with or without torchrun: DDP over a model whose
# last block trains with its BatchNorm frozen (eval), the loader's global batches split by GlobalBatchShard, and
# the loss normalized by the global count of known cells (naive: each rank's own mean, which DDP then averages).
STEP_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import numpy as np, torch
import distributed, engine, train
from data_loader import ImageBatches
from dataset import eval_transform, load_dataset
from loss import make_loss, pos_weights
from model import build_model
from utils import Report

def run(argv):
    labels, images, out = argv
    torch.set_num_threads(1)
    _, paths, targets = load_dataset(labels, images, Report())
    for naive in (False, True) if distributed.active() else (False,):
        one_epoch(paths, targets, naive, out.format("naive" if naive else "plain"))
    return 0

def one_epoch(paths, targets, naive, out):
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_large", targets.shape[1], "none", "last", 64).train()
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.Dropout)):  # frozen statistics, no random masks
            module.eval()
    forward, loss_fn = model, make_loss("bce", pos_weights(targets)[0])
    if distributed.active():
        forward = torch.nn.parallel.DistributedDataParallel(model)
        loss_fn = loss_fn if naive else distributed.global_mean_loss(loss_fn)
    optimizer = torch.optim.SGD([{{"params": [p for p in model.parameters() if p.requires_grad], "base_lr": 0.5}}])
    batches = ImageBatches(paths, np.arange(len(paths)), targets, eval_transform(64, (0.5,) * 3, (0.25,) * 3),
                           batch_size=8, shuffle=True, num_workers=0, seed=3, device=torch.device("cpu"),
                           report=Report(), shard=distributed.active())
    batches.set_epoch(1)
    losses, seen = engine.train_one_epoch(engine.image_forward(forward, device=torch.device("cpu"), amp=False),
                                         batches, loss_fn=loss_fn, optimizer=optimizer, lr_at=lambda step: 1.0,
                                         first_step=0, device=torch.device("cpu"))
    if distributed.is_main():
        torch.save({{"model": model.state_dict(), "losses": losses}}, out)

sys.exit(distributed.launch(run, sys.argv[1:]))
"""


def test_full_loop_step_equals_one_process_with_na_cells(tiny_set, tmp_path):
    """2 ranks x 4 images per step give the update of 1 x 8, on labels with NA cells (~9%: the halves of a batch
    hold different numbers of known cells); each rank's own mean, averaged by DDP, does not."""
    labels, images = tiny_set
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT.format(root=ROOT))
    assert (np.loadtxt(labels, dtype=str)[:, 1:] == "NA").any()
    with pytest.raises(SystemExit) as done, patched_argv(script, labels, images, tmp_path / "one_{}.pth"):
        in_process(lambda _: runpy.run_path(str(script), run_name="__main__"))  # the script ends in sys.exit
    assert done.value.code == 0
    ok(run_ranks(script, labels, images, tmp_path / "two_{}.pth"))  # the global mean, then each rank's own
    one, two, naive = (torch.load(tmp_path / name, weights_only=True)
                       for name in ("one_plain.pth", "two_plain.pth", "two_naive.pth"))
    assert not any(k.startswith("module.") for k in two["model"])
    assert len(one["losses"]) == 3  # 24 images, global batches of 8
    assert np.allclose(one["losses"], two["losses"], atol=1e-5)  # the logged loss is the global batch's mean
    assert max((one["model"][k] - two["model"][k]).abs().max().item() for k in one["model"]) < 1e-5
    assert max((one["model"][k] - naive["model"][k]).abs().max().item() for k in one["model"]) > 1e-3


def test_full_loop_resumes_across_world_sizes(trained, capsys):
    """--augment strong (the full loop): the trained fixture's one-process epoch resumed for a second on 2 ranks,
    then for a third on 1 process; the checkpoints are the one-process format (no `module.` prefix) and the 2
    ranks' validation scores every known cell of the 5 held-out images once."""
    labels, images, folder = trained
    rank0 = ok(run_ranks("train.py", "--resume", folder / "model_last.pth", "--epochs", "2"))
    assert "after epoch 1" in rank0[1] and "epoch   2/2" in rank0[1]
    ckpt = torch.load(folder / "model_last.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"]) and ckpt["epoch"] == 2
    assert len(json.loads(ckpt["state"])["losses"]) == 6  # 3 global batches x 2 epochs
    rows = [line.split()[1:] for line in (folder / "val_labels.txt").read_text().splitlines()[1:]]
    known = [sum(row[k] != "NA" for row in rows) for k in range(len(rows[0]))]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert len(rows) == 5 and [a["positives"] + a["negatives"] for a in metrics["validation"]["attributes"]] == known
    assert len(metrics["history"]) == 2

    capsys.readouterr()
    assert in_process(train.main, "--resume", folder / "model_last.pth", "--epochs", "3") == 0
    resumed = capsys.readouterr().out
    assert "after epoch 2" in resumed and "epoch   3/3" in resumed
    ckpt = torch.load(folder / "model_last.pth", weights_only=True)
    assert ckpt["epoch"] == 3 and len(json.loads(ckpt["state"])["losses"]) == 9
    assert len(json.loads((folder / "metrics.json").read_text())["history"]) == 3


def test_ctrl_c_to_torchrun_stops_every_rank_after_the_same_step_and_saves(tiny_set, tmp_path):
    """torchrun passes Ctrl-C (SIGINT) on to each worker, each at its own step; the ranks agree on the step
    (distributed.SharedStop), rank 0 writes model_last.pth, and all exit 130 as one process would."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TRAIN_DIST_TIMEOUT="60")
    args = train_args(tiny_set, tmp_path, "--augment", "strong", "--epochs", "500", "--patience", "0")
    launched = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 "2", os.path.join(ROOT, "train.py"), *map(str, args)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in launched.stdout:
            if line.startswith("epoch   2/500"):
                break
        launched.send_signal(signal.SIGINT)
        out, err = launched.communicate(timeout=TIMEOUT)
    finally:
        launched.kill()
    assert launched.returncode != 0 and "continue with --resume" in out, err[-2000:]
    ckpt = torch.load(tmp_path / "model_last.pth", weights_only=True)
    assert ckpt["epoch"] >= 2 and not any(k.startswith("module.") for k in ckpt["model"])

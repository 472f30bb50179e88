"""utils.py: errors and warnings, atomic writes, the learning-rate-free run-time helpers, device and seeding."""
import argparse
import io
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
import inference
import train
import utils
from conftest import ROOT
from utils import UserError


# ---- errors, warnings, atomic writes ----

def test_run_cli_turns_a_user_error_into_one_line_and_exit_2(capsys):
    def run(args):
        raise UserError("labels.txt:3: bad line; fix it")

    assert utils.run_cli(run, argparse.Namespace(debug=False)) == 2
    assert capsys.readouterr().err == "error: labels.txt:3: bad line; fix it\n"
    with pytest.raises(UserError):
        utils.run_cli(run, argparse.Namespace(debug=True))


def test_report_counts_by_reason_and_strict_stops_only_on_fatal_ones():
    report = utils.Report(stream=io.StringIO())
    report.warn("image not found", "a")
    report.warn("image not found", "b")
    report.warn("bad value", "c")
    assert report.total == 3 and report.summary() == "2 image not found, 1 bad value"
    strict = utils.Report(strict=True, stream=io.StringIO())
    strict.warn("feature cache", "damaged", fatal=False)  # our own problem: never stops a strict run
    with pytest.raises(UserError, match="--strict"):
        strict.warn("bad value", "c")


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        utils.atomic_write(str(path), broken)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


# ---- device and autocast ----

def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert utils.pick_device("cpu") == torch.device("cpu")
    assert utils.pick_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="cuda"):
        utils.pick_device("cuda")
    with pytest.raises(UserError, match="mps"):
        utils.pick_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert utils.pick_device("auto") == torch.device("cuda")


def test_amp_context_on_cpu():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with utils.amp_context(torch.device("cpu"), True):
        assert (a @ b).dtype == torch.bfloat16
    with utils.amp_context(torch.device("cpu"), False):
        assert (a @ b).dtype == torch.float32


KEEP_FREED = """
import os, sys, torch, utils
applied = utils.keep_freed_memory(torch.device(sys.argv[1]))
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
x = torch.ones(64 * 2**20 // 4)  # 64 MiB
held = rss()
del x
print(applied, (held - rss()) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("device,applied", [("cpu", True), ("meta", False)])
def test_keep_freed_memory_keeps_a_freed_block_for_reuse_on_cpu_only(device, applied):
    done = subprocess.run([sys.executable, "-c", KEEP_FREED, device], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    was_applied, returned_mib = done.stdout.split()
    assert was_applied == str(applied)
    if applied:
        assert float(returned_mib) < 8  # kept by the process, ready for the next batch
    else:
        assert float(returned_mib) > 56  # glibc's default: a block this big is unmapped when freed


def test_importing_utils_does_not_import_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, utils; print('torch' in sys.modules)"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_small_matmuls_sets_one_thread_and_flushes_denormals_then_restores():
    threads = torch.get_num_threads()
    tiny = torch.tensor([1e-40])  # a float32 denormal
    with utils.small_matmuls():
        assert torch.get_num_threads() == 1
        assert (tiny * 1.0).item() == 0.0  # flushed
    assert torch.get_num_threads() == threads and (tiny * 1.0).item() > 0


# ---- --num-workers auto, and the flags every script shares ----

@pytest.mark.parametrize("cores,device,expected", [(1, "cpu", 0), (2, "cpu", 0), (4, "cpu", 2), (16, "cpu", 2),
                                                   (2, "cuda", 2), (2, "mps", 2)])
def test_auto_workers_leave_a_two_core_cpu_to_the_forward(monkeypatch, cores, device, expected):
    monkeypatch.setattr(utils.os, "cpu_count", lambda: cores)
    assert utils.resolve_workers("auto", torch.device(device)) == expected
    assert utils.resolve_workers(3, torch.device(device)) == 3  # a number given is used as it is


def test_shared_flags_are_the_same_in_every_script():
    parsers = {"train": train.parse_args([]), "inference": inference.parse_args(["a.jpg"]),
               "evaluate": evaluate.parse_args(["--labels", "l", "--images", "i"])}
    for name, args in parsers.items():
        assert (args.batch_size, args.num_workers, args.device, args.keep_freed_memory, args.debug) == \
            (32, "auto", "auto", True, False), name
    assert train.parse_args(["--num-workers", "1"]).num_workers == 1
    for bad in ("many", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="neither auto nor a number"):
            utils.workers_arg(bad)


# ---- seeding ----

def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    utils.seed_everything(5)
    first = draw()
    utils.seed_everything(5)
    assert draw() == first
    utils.seed_everything(6)
    other = draw()
    assert all(a != b for a, b in zip(first, other))


def test_rng_state_round_trip_restores_every_generator():
    utils.seed_everything(3)
    state = utils.rng_state()
    first = random.random(), np.random.rand(), torch.rand(1).item()
    utils.seed_everything(4)
    utils.restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first

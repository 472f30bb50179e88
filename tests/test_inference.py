"""inference.py helpers; the end-to-end runs are in test_train.py and test_bad_input.py."""
import argparse

import pytest
import torch

import inference


@pytest.mark.parametrize("cores,device,expected", [(1, "cpu", 0), (2, "cpu", 0), (4, "cpu", 2), (16, "cpu", 2),
                                                   (2, "cuda", 2), (2, "mps", 2)])
def test_auto_workers_leave_a_two_core_cpu_to_the_forward(monkeypatch, cores, device, expected):
    monkeypatch.setattr(inference.os, "cpu_count", lambda: cores)
    assert inference.resolve_workers("auto", torch.device(device)) == expected
    assert inference.resolve_workers(3, torch.device(device)) == 3  # a number given is used as it is


def test_num_workers_is_auto_or_a_number():
    assert inference.parse_args(["a.jpg"]).num_workers == "auto"
    assert inference.parse_args(["a.jpg", "--num-workers", "1"]).num_workers == 1
    with pytest.raises(argparse.ArgumentTypeError, match="neither auto nor a number"):
        inference.workers_arg("many")

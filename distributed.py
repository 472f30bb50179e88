"""Running a script on many processes: torch.distributed, started by torchrun (c10d rendezvous).

    torchrun --standalone --nproc-per-node 8 train.py ...

launch(run, args) takes the place of utils.run_cli: with torchrun's WORLD_SIZE > 1 it joins the process group
(gloo for CPU tensors, NCCL for CUDA ones), silences every rank but 0 (only rank 0 prints and writes files), and
makes a failure on any rank end every rank within seconds; a plain `python train.py` has no process group and
runs run_cli as before. The helpers below are no-ops (one process) outside a process group, or inside alone().

TRAIN_DIST_TIMEOUT (seconds, default 1800) bounds every collective: a rank that hangs ends the others after it.
"""
import contextlib
import datetime
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import utils
from utils import UserError

_alone = [False]  # inside alone(): this process acts as the only one


def active():
    return dist.is_available() and dist.is_initialized() and not _alone[0]


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def is_main():
    return rank() == 0


@contextlib.contextmanager
def alone():
    """Rank 0 doing work the others do not share (the HTML report after training): no collective inside."""
    _alone[0] = True
    try:
        yield
    finally:
        _alone[0] = False


def local_device(device):
    """cuda -> cuda:LOCAL_RANK under torchrun: one GPU per process."""
    if active() and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def all_sum(values):
    """Sum over ranks of a float64 array (numbers: counts, flags)."""
    values = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if active():
        dist.all_reduce(values)
    return values.numpy()


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...]: small picklable things (arrays of a shard, messages)."""
    if not active():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj):
    """Rank 0's obj on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_batches(logits, indices, targets, *, device):
    """The (logits, indices, targets) batch lists of every rank's share as one batch each, ordered by index (each
    image is in exactly one rank's share, so none is counted twice or dropped)."""
    mine = ([x.cpu() for x in logits], list(indices), list(targets))
    parts = [part for part in all_gather(mine) if part[0]]
    if not parts:
        return [], [], []
    index = np.concatenate([i for part in parts for i in part[1]])
    order = np.argsort(index, kind="stable")
    logits = torch.cat([x for part in parts for x in part[0]])[torch.from_numpy(order)].to(device)
    targets = torch.cat([y for part in parts for y in part[2]])[torch.from_numpy(order)]
    return [logits], [index[order]], [targets]


def shard_batches(n, batch_size):
    """This rank's share of n items in batches: every world_size-th batch of the one-process run, from its rank-th;
    returns (index arrays of its batches, rounds): the ranks step through `rounds` rounds of one batch each (the
    last rounds of the higher ranks are empty), so what one round yields stays in the one-process order."""
    starts = range(0, n, batch_size)
    mine = [np.arange(s, min(s + batch_size, n)) for s in starts[rank()::world_size()]]
    return mine, len(starts[::world_size()])


def global_mean_loss(loss_fn):
    """loss_fn (a mean over the known cells of the batch) made a mean over the known cells of the global batch:
    the value is the global mean on every rank; the gradient is this rank's sum / the global count, times the world
    size, which DistributedDataParallel's gradient averaging divides back out. Two half-batches with different
    numbers of NA cells then give exactly the update of the whole batch."""
    def loss(logits, targets):
        local = loss_fn(logits, targets)
        known = (targets >= 0).sum()
        totals = torch.stack([local.detach().float() * known, known.float()]).double().cpu()
        dist.all_reduce(totals)
        total, count = totals.tolist()
        scaled = local * known / max(count, 1.0) * world_size()
        return scaled + (total / max(count, 1.0) - scaled).detach()  # value: the global mean; gradient: scaled's

    return loss if active() else loss_fn


class SharedStop:
    """utils.StopFlag as every rank reads it: requested once any rank's is (Ctrl-C reaches torchrun, which sends
    each worker a SIGINT, each at its own step). Every read is an all-reduce, so every rank must read it at the
    same points, as the full loop does (after every step and epoch)."""

    def __init__(self, flag):
        self.flag, self.seen = flag, False

    @property
    def requested(self):
        if not self.seen:
            self.seen = bool(all_sum([self.flag.requested])[0])
        return self.seen

    def restore(self):
        self.flag.restore()


def _init():
    timeout = datetime.timedelta(seconds=float(os.environ.get("TRAIN_DIST_TIMEOUT", 1800)))
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():  # object collectives over NCCL use the current device: this rank's own
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timeout)
    if dist.get_rank() != 0:  # one voice: the other ranks' logs, bars and warnings go nowhere
        sys.stdout = sys.stderr = open(os.devnull, "w")
        utils.WRITE_FILES = False


def _say_error(message):
    """One `error:` line for an error every rank hit (a bad labels file): rank 0 says it; another rank says its own
    only when rank 0 did not report the same one within a few seconds (an error of that rank alone)."""
    store, me = dist.distributed_c10d._get_default_store(), dist.get_rank()
    try:
        store.set(f"train_error/{me}", message)
        if me == 0:
            print(f"error: {message}", file=sys.__stderr__, flush=True)
            with contextlib.suppress(Exception):  # let the others read this before the store may go
                store.wait([f"train_error_read/{r}" for r in range(1, dist.get_world_size())],
                           datetime.timedelta(seconds=3))
            return
        with contextlib.suppress(Exception):
            store.wait(["train_error/0"], datetime.timedelta(seconds=3))
        same = store.check(["train_error/0"]) and store.get("train_error/0").decode() == message
        store.set(f"train_error_read/{me}", "1")
    except Exception:  # noqa: BLE001 -- the store went with rank 0: say it here rather than not at all
        same = False
    if not same:
        print(f"error: rank {me}: {message}", file=sys.__stderr__, flush=True)


def _peer_gone(error):
    """A collective failed because another rank ended (its own message says why) or hung past the timeout."""
    text = str(error)
    return isinstance(error, dist.DistError) or "Connection closed by peer" in text or "Timed out" in text \
        or "timed out" in text


def launch(run, args):
    """utils.run_cli, on every rank of a torchrun job; returns the exit code (plain run_cli without torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return utils.run_cli(run, args)
    _init()
    started = time.time()
    try:
        code = run(args)
    except UserError as e:
        if getattr(args, "debug", False):
            raise
        _say_error(str(e))
        code = 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as run_cli does
        code = 1
    except RuntimeError as e:
        if not _peer_gone(e):
            raise
        print(f"rank {dist.get_rank()}: stopped after {time.time() - started:.0f}s: another rank failed",
              file=sys.__stderr__, flush=True)
        code = 1
    if code:  # the others may be waiting in a collective that will never complete: no clean shutdown
        sys.__stdout__.flush()
        os._exit(code)
    dist.barrier()
    dist.destroy_process_group()
    return code

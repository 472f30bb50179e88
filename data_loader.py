"""Train/validation split (multi-label iterative stratification, NA-aware) and DataLoaders."""
import argparse
import os
import random

import numpy as np
import torch

from dataset import UserError, collate


def split_indices(targets, val_fraction, seed):
    """Seeded (train, val) index arrays, val of exactly round(val_fraction * n) rows, that keep every
    attribute's known-positive and known-negative rates in both parts. NA cells are neither, so they
    spread at random rather than skewing a rate."""
    n = len(targets)
    if val_fraction == 0:
        return np.arange(n), np.arange(0)
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if n < 2:
        raise UserError(f"{n} usable image(s) cannot be split for validation; add images or use --val-fraction 0")
    t = np.asarray(targets)
    # One label per (attribute, known value): stratifying on both keeps the positive rate among known cells.
    labels = np.concatenate([t == 1, t == 0], axis=1)
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    part = iterative_stratification(labels, n_val, np.random.default_rng(seed))
    return np.flatnonzero(part == 0), np.flatnonzero(part == 1)


def iterative_stratification(labels, n_val, rng):
    """Part (0 train, 1 val) of each row: Sechidis et al. (2011) iterative stratification, with each part
    closed once full so that val gets exactly n_val rows.

    The rarest label is placed first, row by row, into the part that still wants most of it; ties go to the
    part with more room, then at random. Rows with no known cell fill the remaining room at random.
    """
    n = len(labels)
    room = np.array([n - n_val, n_val], dtype=np.float64)
    wanted = np.outer(room / n, labels.sum(0))  # (2, L): rows of each label each part still wants
    left = labels.sum(0).astype(np.int64)  # unplaced rows of each label
    part = np.full(n, -1)
    order = rng.permutation(n)

    def choose(scores):
        scores = np.where(room > 0, scores, -np.inf)
        best = np.flatnonzero(scores == scores.max())
        if len(best) > 1:
            best = best[room[best] == room[best].max()]
        return best[rng.integers(len(best))] if len(best) > 1 else best[0]

    while (left > 0).any():
        active = np.flatnonzero(left > 0)
        label = active[np.argmin(left[active])]
        for row in order[(part[order] < 0) & labels[order, label]]:
            j = choose(wanted[:, label])
            part[row] = j
            room[j] -= 1
            wanted[j] -= labels[row]
            left -= labels[row]
    for row in order[part[order] < 0]:
        j = choose(room)
        part[row] = j
        room[j] -= 1
    return refine(labels, part, rng)


def refine(labels, part, rng, rounds=200, sample=128):
    """Swap (train, val) row pairs while that brings every label's val count closer to its share.

    The greedy pass places the commonest labels last, into parts that are nearly full, and can leave them
    a few rows off; each swap keeps both sizes and strictly lowers sum_l (val_l - share * total_l)^2 / total_l.
    """
    x = labels.astype(np.float64)
    total = x.sum(0)
    weight = 1.0 / np.maximum(total, 1)
    target = total * part.mean()
    count = x[part == 1].sum(0)
    stale = 0
    for _ in range(rounds):
        train, val = np.flatnonzero(part == 0), np.flatnonzero(part == 1)
        t = rng.choice(train, min(sample, len(train)), replace=False)
        v = rng.choice(val, min(sample, len(val)), replace=False)
        moved = count + x[t][:, None, :] - x[v][None, :, :]  # val counts after swapping t in, v out
        cost = ((moved - target) ** 2 * weight).sum(-1)
        i, j = np.unravel_index(np.argmin(cost), cost.shape)
        if cost[i, j] < ((count - target) ** 2 * weight).sum() - 1e-12:
            part[t[i]], part[v[j]] = 1, 0
            count = moved[i, j]
            stale = 0
        else:
            stale += 1
            if stale >= 10:
                break
    return part


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id):
    # Each worker gets a different seed derived from the loader's generator, so runs repeat exactly.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def workers_arg(value):
    """argparse type of --num-workers: auto or a number."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is neither auto nor a number of 0 or more")
    return number


def resolve_workers(num_workers, device):
    """auto: 2 DataLoader workers, or none on a CPU with 2 cores or fewer. There the workers take cores from the
    forward itself, and decoding in the main process is faster (measured: benchmarks/bench_train.py --sweep)."""
    if num_workers != "auto":
        return num_workers
    return 0 if device.type == "cpu" and (os.cpu_count() or 1) <= 2 else 2


def make_loader(dataset, batch_size, shuffle, num_workers, seed=0, device=None):
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, collate_fn=collate,
        worker_init_fn=_seed_worker, generator=generator, persistent_workers=False,
        pin_memory=device is not None and device.type == "cuda",
    )

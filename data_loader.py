"""Train/validation split (multi-label iterative stratification, NA-aware) and DataLoaders."""
import random

import numpy as np
import torch

from dataset import UserError, collate


def split_indices(targets, val_fraction, seed):
    """Seeded (train, val) index arrays that keep every attribute's known-positive and known-negative
    rates in both parts. NA cells are neither, so they spread at random rather than skewing a rate."""
    n = len(targets)
    if val_fraction <= 0:
        return np.arange(n), np.arange(0)
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if n < 2:
        raise UserError(f"{n} usable image(s) cannot be split for validation; add images or use --val-fraction 0")
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    t = np.asarray(targets)
    # One column per (attribute, known value): stratifying on both keeps the positive rate among known cells.
    y = np.concatenate([t == 1, t == 0], axis=1).astype(int)
    test_size = min(max(1, round(val_fraction * n)), n - 1)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    train, val = next(splitter.split(np.zeros(n), y))
    return np.sort(train), np.sort(val)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id):
    # Each worker gets a different seed derived from the loader's generator, so runs repeat exactly.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset, batch_size, shuffle, num_workers, seed=0, device=None):
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, collate_fn=collate,
        worker_init_fn=_seed_worker, generator=generator, persistent_workers=False,
        pin_memory=device is not None and device.type == "cuda",
    )

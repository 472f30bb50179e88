"""Train/validation split (multi-label iterative stratification, NA-aware), DataLoaders, and the two sources of
batches the training loop reads: images through a DataLoader, or cached backbone features. Both yield
(indices, x, y) and have set_epoch(), so train.py's loop cannot tell them apart."""
import math

import numpy as np
import torch

import distributed
from dataset import ImageDataset, collate
from utils import UserError, seed_worker


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


def fold_indices(targets, folds, seed):
    """Fold (0 .. folds-1) of each row, folds of equal size (within one row) that each keep every attribute's
    known-positive and known-negative rates: the split above applied folds - 1 times to what is left."""
    n = len(targets)
    if not 2 <= folds <= n:
        raise UserError(f"{n} usable image(s) cannot be cross-validated in {folds} folds; use fewer folds "
                        "or --folds 0")
    t = np.asarray(targets)
    labels = np.concatenate([t == 1, t == 0], axis=1)
    rng = np.random.default_rng(seed)
    fold, rest = np.full(n, folds - 1), np.arange(n)
    for f in range(folds - 1):
        part = iterative_stratification(labels[rest], round(len(rest) / (folds - f)), rng)
        fold[rest[part == 1]] = f
        rest = rest[part == 0]
    return fold


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


def make_loader(dataset, *, batch_size, shuffle, num_workers, seed=0, device=None, shard=None):
    """shard (rank, world size): the batches of the one-process loader (same sampler, same generator, so the same
    order each epoch), each cut to this rank's share: the global batch stays batch_size (GlobalBatchShard)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    batching = {"batch_size": batch_size, "shuffle": shuffle}
    if shard is not None:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator) if shuffle else \
            torch.utils.data.SequentialSampler(dataset)
        batching = {"batch_sampler": GlobalBatchShard(torch.utils.data.BatchSampler(sampler, batch_size, False), *shard)}
    return torch.utils.data.DataLoader(
        dataset, **batching, num_workers=num_workers, collate_fn=collate,
        worker_init_fn=seed_worker, generator=generator, persistent_workers=False,
        pin_memory=device is not None and device.type == "cuda",
    )


class GlobalBatchShard(torch.utils.data.Sampler):
    """Every world-th image of each batch of batch_sampler, from the rank-th: the ranks split one global batch.
    Not DistributedSampler, which splits the epoch (another order) and pads it by repeating images."""

    def __init__(self, batch_sampler, rank, world):
        self.batch_sampler, self.rank, self.world = batch_sampler, rank, world

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            yield batch[self.rank::self.world]


def epoch_seed(seed, epoch):
    return seed * 100_003 + epoch


class Subset(ImageDataset):
    """ImageDataset over some rows of the full set; `index` maps back to the full set's rows."""

    def __init__(self, paths, index, transform):
        super().__init__([paths[i] for i in index], None, transform)
        self.index = torch.as_tensor(index, dtype=torch.long)


class ImageBatches:
    """(indices into the full set, images, targets) from a DataLoader over the rows `index` of `paths`.

    An image that fails to decode (a truncated file) is warned about once through `report`, kept in `failed`
    (path -> message) and left out of its batch."""

    def __init__(self, paths, index, targets, transform, *, batch_size, shuffle, num_workers, seed, device, report,
                 shard=False):
        """shard (under torchrun): this rank's share of each batch; train.evaluate gathers the shares."""
        self.sharded = shard
        self.loader = make_loader(Subset(paths, index, transform), batch_size=batch_size, shuffle=shuffle,
                                  num_workers=num_workers, seed=seed, device=device,
                                  shard=(distributed.rank(), distributed.world_size()) if shard else None)
        self.targets, self.seed, self.report = targets, seed, report
        self.failed = {}
        self.num_images = len(index)
        self.empty = None  # a batch of no images, of the shape of the last one

    def set_epoch(self, epoch):
        self.loader.generator.manual_seed(epoch_seed(self.seed, epoch))

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        dataset = self.loader.dataset
        for indices, images, errors in self.loader:
            for i, message in errors:
                if dataset.paths[i] not in self.failed:
                    self.failed[dataset.paths[i]] = message
                    self.report.warn("unreadable image", f"{message}; skipped")
            if images is not None:
                index = dataset.index[indices]
                self.empty = images[:0]
                yield index.numpy(), images, self.targets[index]
            elif self.sharded and self.empty is not None:
                # Every rank takes every step (DDP's gradient sum waits for all): a share of nothing is a step too.
                yield np.zeros(0, dtype=np.int64), self.empty, self.targets[:0]


class FeatureBatches:
    """(indices into the full set, features, targets) from cached backbone features (rows, 2, D): view 0 is the
    image as is, view 1 mirrored. Shuffled batches take one view per image at random every epoch, which is
    exactly RandomHorizontalFlip(0.5); in order (validation) they take view 0, or both views (b, 2, D) for flip
    test-time augmentation (model.flip_tta)."""

    def __init__(self, features, rows, index, targets, *, batch_size, shuffle, seed, both_views=False):
        self.features, self.rows, self.index, self.targets = features, rows, np.asarray(index), targets
        self.batch_size, self.shuffle, self.seed, self.both_views = batch_size, shuffle, seed, both_views
        self.epoch = 0
        self.num_images = len(self.index)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return math.ceil(len(self.index) / self.batch_size)

    def __iter__(self):
        order, views = self.index, np.zeros(len(self.index), dtype=np.int64)
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = self.index[torch.randperm(len(self.index), generator=g).numpy()]
            views = torch.randint(0, 2, (len(order),), generator=g).numpy()
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            if self.both_views:
                x = np.asarray(self.features[self.rows[batch]])
            else:
                x = np.asarray(self.features[self.rows[batch], views[start:start + len(batch)]])
            yield batch, torch.from_numpy(x), self.targets[batch]

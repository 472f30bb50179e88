"""Train/validation split (multi-label iterative stratification, NA-aware), DataLoaders, and the two sources of
batches the training loop reads: images through a DataLoader, or cached backbone features. Both yield
(indices, x, y) and have set_epoch(), so the training loop (engine.train_one_epoch) cannot tell them apart."""
import math

import numpy as np
import torch

import distributed
from dataset import ImageDataset, collate
from utils import UserError, seed_worker


def split_indices(targets, val_fraction, seed):
    """Seeded (train, val) index arrays, val of exactly round(val_fraction * n) rows, that keep every
    attribute's known-positive and known-negative rates in both parts. NA cells are neither, so they
    spread at random rather than skewing a rate. Memory: the (N, K) int8 targets and one permuted copy."""
    n = len(targets)
    if val_fraction == 0:
        return np.arange(n), np.arange(0)
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if n < 2:
        raise UserError(f"{n} usable image(s) cannot be split for validation; add images or use --val-fraction 0")
    t = np.asarray(targets)
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    part = iterative_stratification(t, n_val, np.random.default_rng(seed))
    return np.flatnonzero(part == 0), np.flatnonzero(part == 1)


def fold_indices(targets, folds, seed):
    """Fold (0 .. folds-1) of each row, folds of equal size (within one row) that each keep every attribute's
    known-positive and known-negative rates: the split above applied folds - 1 times to what is left."""
    n = len(targets)
    if not 2 <= folds <= n:
        raise UserError(f"{n} usable image(s) cannot be cross-validated in {folds} folds; use fewer folds "
                        "or --folds 0")
    t = np.asarray(targets)
    rng = np.random.default_rng(seed)
    fold, rest = np.full(n, folds - 1), np.arange(n)
    for f in range(folds - 1):
        part = iterative_stratification(t[rest], round(len(rest) / (folds - f)), rng)
        fold[rest[part == 1]] = f
        rest = rest[part == 0]
    return fold


def label_counts_of(t):
    """Counts of the 2K labels of rows t (N, K): label k is `attribute k is 1`, label K + k `attribute k is 0`.
    Stratifying on both keeps the positive rate among known cells."""
    return np.concatenate([(t == 1).sum(0), (t == 0).sum(0)])


def iterative_stratification(t, n_val, rng):
    """Part (0 train, 1 val) of each row of targets t: Sechidis et al. (2011) iterative stratification over the
    2K labels of label_counts_of, with each part closed once full so that val gets exactly n_val rows.

    The rarest label is placed first, row by row, into the part that still wants most of it; ties go to the
    part with more room, then at random. Rows with no known cell fill the remaining room at random.
    Within one label only that label's wants and the rooms change, so its rows are placed with scalars and the
    other labels' wants are updated once per label: time O(N K), not a vector update per row."""
    n, k = t.shape
    room = [float(n - n_val), float(n_val)]
    total = label_counts_of(t)
    wanted = np.outer(np.array(room) / n, total)  # (2, 2K): rows of each label each part still wants
    left = total.astype(np.int64)  # unplaced rows of each label
    part = np.full(n, -1, dtype=np.int8)
    order = rng.permutation(n)
    columns = np.empty((k, n), dtype=np.int8)  # targets in `order`, one attribute per contiguous row
    for start in range(0, n, 65536):
        columns[:, start:start + 65536] = t[order[start:start + 65536]].T
    placed = np.zeros(n, dtype=bool)  # by position in `order`
    while (left > 0).any():
        active = np.flatnonzero(left > 0)
        label = int(active[np.argmin(left[active])])
        positions = np.flatnonzero((columns[label % k] == (1 if label < k else 0)) & ~placed)
        rows = order[positions]
        parts, wanted[:, label], room = _place(rows, wanted[:, label].tolist(), room, rng)
        placed[positions] = True
        part[rows] = parts
        for j in (0, 1):
            counts = label_counts_of(t[rows[parts == j]])
            keep = wanted[j, label]
            wanted[j] -= counts
            wanted[j, label] = keep  # already counted row by row in _place
            left -= counts
    rest = order[~placed]
    part[rest], _, room = _place(rest, room, room, rng)
    return refine(t, part, rng)


def _place(rows, scores, room, rng):
    """Parts of rows placed one by one, each into the part of the higher score (ties: more room, then random),
    that part's score and room dropping by one; returns (parts, final scores, final room). scores is room itself
    for the rows with no known cell."""
    s0, s1 = scores
    r0, r1 = room
    same = scores is room
    parts = np.empty(len(rows), dtype=np.int8)
    for i in range(len(rows)):
        if r0 <= 0 or r1 <= 0:  # one part is full: the rest go to the other
            j, taken = (1 if r0 <= 0 else 0), len(rows) - i
            parts[i:] = j
            if j == 0:
                r0, s0 = r0 - taken, s0 - taken
            else:
                r1, s1 = r1 - taken, s1 - taken
            break
        if s0 != s1:
            j = 0 if s0 > s1 else 1
        elif r0 != r1:
            j = 0 if r0 > r1 else 1
        else:
            j = int(rng.integers(2))
        parts[i] = j
        if j == 0:
            r0, s0 = r0 - 1, s0 - 1
        else:
            r1, s1 = r1 - 1, s1 - 1
        if same:
            s0, s1 = r0, r1
    return parts, [s0, s1], [r0, r1]


def refine(t, part, rng, rounds=200, sample=128, stale_rounds=10):
    """Swap (train, val) row pairs while that brings every label's val count closer to its share.

    The greedy pass places the commonest labels last, into parts that are nearly full, and can leave them a few
    rows off (hundreds at 1M rows); each swap keeps both sizes and strictly lowers
    cost = sum_l (val_l - share * total_l)^2 / total_l. Each round samples `sample` rows of each part. The first
    `rounds` rounds make the one best swap among the pairs (as this function always did, so small sets, which
    stop improving well before, split as they did); a set still improving after them gets as many more rounds
    that make every improving swap among the sampled pairs, best first."""
    total = label_counts_of(t).astype(np.float64)
    weight = 1.0 / np.maximum(total, 1)
    target = total * part.mean()
    count = label_counts_of(t[part == 1]).astype(np.float64)
    stale = 0
    for r in range(2 * rounds):
        train, val = np.flatnonzero(part == 0), np.flatnonzero(part == 1)
        a = rng.choice(train, min(sample, len(train)), replace=False)
        b = rng.choice(val, min(sample, len(val)), replace=False)
        xa, xb = _labels(t[a]), _labels(t[b])
        swaps = _best_swap(xa, xb, count, target, weight) if r < rounds else _swaps(xa, xb, count, target, weight)
        for i, j in swaps:
            part[a[i]], part[b[j]] = 1, 0
            count += xa[i] - xb[j]
        stale = 0 if swaps else stale + 1
        if stale >= stale_rounds:
            break
    return part


def _labels(rows):
    return np.concatenate([rows == 1, rows == 0], axis=1).astype(np.float64)


def _gains(xa, xb, error, weight):
    """Cost change of swapping train row xa[i] in and val row xb[j] out, all pairs: with d = xa_i - xb_j,
    sum_l w_l ((e_l + d_l)^2 - e_l^2) = A_i + B_j - 2 C_ij for 0/1 rows, one matrix product, no (S, S, L) array."""
    a = xa @ (weight * (2 * error + 1))
    b = xb @ (weight * (1 - 2 * error))
    return a[:, None] + b[None, :] - 2 * ((xa * weight) @ xb.T)


def _best_swap(xa, xb, count, target, weight):
    """[(i, j)] of the swap with the lowest cost if it lowers the cost, else []. The pairs within rounding of the
    best are costed directly as the cost is defined, so the choice among equal pairs (the first) never depends
    on how the matrix product rounds."""
    base = ((count - target) ** 2 * weight).sum()
    gains = _gains(xa, xb, count - target, weight).ravel()
    i, j = np.divmod(np.flatnonzero(gains <= gains.min() + 1e-9 * (1 + abs(base))), len(xb))
    cost = ((count + xa[i] - xb[j] - target) ** 2 * weight).sum(-1)
    best = int(np.argmin(cost))
    return [(i[best], j[best])] if cost[best] < base - 1e-12 else []


def _swaps(xa, xb, count, target, weight):
    """Improving swaps (i, j) among the sampled rows, best first, each row at most once."""
    error = count - target
    gains = _gains(xa, xb, error, weight)
    swaps = []
    for _ in range(min(len(xa), len(xb))):
        i, j = np.unravel_index(np.argmin(gains), gains.shape)
        if gains[i, j] >= -1e-9:
            break
        swaps.append((i, j))
        d = weight * (xa[i] - xb[j])
        error += xa[i] - xb[j]
        gains += 2 * (xa @ d)[:, None] - 2 * (xb @ d)[None, :]  # A and B follow the error; C does not change
        gains[i, :], gains[:, j] = np.inf, np.inf
    return swaps


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
        """shard (under torchrun): this rank's share of each batch; engine.evaluate gathers the shares."""
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

"""data_loader.py: NA-aware stratified split, seeding, and loaders that drop unreadable images."""

import numpy as np
import pytest
import torch
from PIL import Image

import data_loader
from data_loader import GlobalBatchShard, make_loader, refine, split_indices
from dataset import ImageDataset, collate, eval_transform, train_transform
from utils import UserError


def random_targets(n=400, seed=0):
    """(n, 4) targets: rates 0.5, 0.3, 0.6 and a rare 0.08, each with ~15% NA."""
    rng = np.random.default_rng(seed)
    t = (rng.random((n, 4)) < np.array([0.5, 0.3, 0.6, 0.08])).astype(np.int64)
    t[rng.random((n, 4)) < 0.15] = -1
    return torch.from_numpy(t)


def positive_rate(t):
    """Positive rate per attribute among known cells."""
    t = np.asarray(t)
    return (t == 1).sum(0) / (t >= 0).sum(0)


# ---- split_indices ----

@pytest.mark.parametrize("fraction, n_val", [(0.2, 80), (0.25, 100), (0.1, 40), (0.33, 132)])
def test_split_is_a_partition_of_the_requested_size(fraction, n_val):
    train, val = split_indices(random_targets(), fraction, seed=0)
    assert len(val) == n_val  # round(fraction * 400)
    assert len(train) == 400 - n_val
    assert set(train).isdisjoint(val)
    assert sorted(set(train) | set(val)) == list(range(400))


def test_split_small_set_size():
    train, val = split_indices(random_targets(n=10), 0.3, seed=0)
    assert (len(train), len(val)) == (7, 3)  # round(0.3 * 10) = 3


@pytest.mark.parametrize("seed", [9, 15])
def test_split_small_set_never_leaves_a_part_empty(seed):
    # 3 images with NAs: round(0.2 * 3) = 1, so 2 train / 1 val; an empty part breaks training or validation.
    targets = torch.tensor([[0, 1, -1], [-1, 0, 0], [0, 0, 1]])
    train, val = split_indices(targets, 0.2, seed)
    assert (len(train), len(val)) == (2, 1)


def test_split_repeats_with_the_seed_and_changes_with_it():
    targets = random_targets()
    a_train, a_val = split_indices(targets, 0.2, seed=1)
    b_train, b_val = split_indices(targets, 0.2, seed=1)
    c_train, c_val = split_indices(targets, 0.2, seed=2)
    assert np.array_equal(a_train, b_train) and np.array_equal(a_val, b_val)
    assert not np.array_equal(a_val, c_val)


def test_split_fraction_zero_is_all_train():
    train, val = split_indices(random_targets(n=12), 0.0, seed=0)
    assert train.tolist() == list(range(12))
    assert len(val) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_keeps_positive_rates_among_known_cells(seed):
    targets = random_targets(seed=seed)
    rare = np.asarray(targets[:, 3])
    assert 0.05 < positive_rate(targets)[3] < 0.11  # the rare attribute really is ~8%
    train, val = split_indices(targets, 0.2, seed=seed)
    t = np.asarray(targets)
    # Tolerance 0.03 on the rate among known cells; a random split of 80 rows wanders ~0.05 on a 0.5 rate.
    assert np.abs(positive_rate(t[train]) - positive_rate(t[val])).max() <= 0.03
    assert (rare[train] == 1).sum() > 0 and (rare[val] == 1).sum() > 0


def test_split_one_image_with_validation_is_a_user_error():
    with pytest.raises(UserError, match="1 usable image"):
        split_indices(torch.tensor([[1, 0]]), 0.2, seed=0)
    train, val = split_indices(torch.tensor([[1, 0]]), 0.0, seed=0)  # no validation: fine
    assert (train.tolist(), val.tolist()) == ([0], [])


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.2])
def test_split_fraction_outside_0_1_is_a_user_error(fraction):
    # The message promises [0, 1); a negative fraction must not silently mean "no validation".
    with pytest.raises(UserError, match="val-fraction"):
        split_indices(random_targets(n=20), fraction, seed=0)


# ---- make_loader ----

@pytest.fixture
def image_folder(tmp_path):
    """good_0.png, bad.png (text), good_1.png ... good_5.png; each good image one flat colour."""
    paths = []
    for i in range(6):
        p = tmp_path / f"good_{i}.png"
        Image.new("RGB", (6 + i, 5), (40 * i, 10, 200 - 30 * i)).save(p)
        paths.append(str(p))
    bad = tmp_path / "bad.png"
    bad.write_text("this is not an image\n")
    paths.insert(1, str(bad))
    return paths


def batches(loader):
    return [(indices.tolist(), images, errors) for indices, images, errors in loader]


def test_loader_drops_unreadable_images_and_reports_them(image_folder):
    paths = image_folder[:3]  # good_0, bad, good_1
    dataset = ImageDataset(paths, None, eval_transform(8))
    out = batches(make_loader(dataset, batch_size=2, shuffle=False, num_workers=0))
    assert [b[0] for b in out] == [[0], [2]]
    assert out[0][1].shape == (1, 3, 8, 8)
    assert out[1][1].shape == (1, 3, 8, 8)
    (index, message), = out[0][2]
    assert index == 1
    assert "bad.png" in message and "cannot read image" in message
    assert out[1][2] == []


def test_loader_batch_of_only_bad_images():
    indices, images, errors = collate([(3, None, "x: broken"), (4, None, "y: broken")])
    assert indices.tolist() == [] and images is None
    assert errors == [(3, "x: broken"), (4, "y: broken")]


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_workers_give_the_same_batches(image_folder, shuffle):
    dataset = ImageDataset(image_folder, None, eval_transform(8))
    single = batches(make_loader(dataset, batch_size=3, shuffle=shuffle, num_workers=0, seed=3))
    multi = batches(make_loader(dataset, batch_size=3, shuffle=shuffle, num_workers=2, seed=3))
    assert [b[0] for b in single] == [b[0] for b in multi]
    assert [b[2] for b in single] == [b[2] for b in multi]
    for a, b in zip(single, multi):
        assert torch.equal(a[1], b[1])
    assert sorted(i for b in single for i in b[0]) == [0, 2, 3, 4, 5, 6]  # 1 is the bad file


def test_shuffle_repeats_with_the_seed(image_folder):
    dataset = ImageDataset(image_folder, None, eval_transform(8))

    def order(seed):
        return [i for b in batches(make_loader(dataset, batch_size=2, shuffle=True, num_workers=0, seed=seed)) for i in b[0]]

    assert order(11) == order(11)
    assert sorted(order(11)) == [0, 2, 3, 4, 5, 6]  # every good image once; 1 is the bad file
    assert order(11) != order(12)
    assert order(11) != [0, 2, 3, 4, 5, 6]  # it did shuffle


def test_random_augmentation_in_workers_repeats_with_the_seed(image_folder):
    # The flip is drawn inside the workers: the same seed must give the same flips.
    dataset = ImageDataset(image_folder, None, train_transform(8))

    def run():
        return torch.cat([b[1] for b in batches(make_loader(dataset, batch_size=2, shuffle=False, num_workers=2, seed=4))])

    assert torch.equal(run(), run())


# ---- k folds ----

def test_fold_indices_are_equal_stratified_and_repeat_with_the_seed():
    targets = random_targets(103, seed=4).numpy()
    fold = data_loader.fold_indices(targets, 5, seed=1)
    sizes = np.bincount(fold, minlength=5)
    assert sorted(sizes.tolist()) == [20, 20, 21, 21, 21]  # 103 rows: sizes within one row of 103 / 5
    for f in range(5):
        part = targets[fold == f]
        for k in range(targets.shape[1]):
            known = targets[:, k] >= 0
            rate = (targets[known, k] == 1).mean()
            part_known = part[:, k] >= 0
            # within two rows of the whole set's rate among the fold's known cells
            assert abs((part[part_known, k] == 1).sum() - rate * part_known.sum()) <= 2.0
    np.testing.assert_array_equal(fold, data_loader.fold_indices(targets, 5, seed=1))
    assert not np.array_equal(fold, data_loader.fold_indices(targets, 5, seed=2))


def test_fold_indices_need_at_least_two_folds_and_a_row_each():
    targets = random_targets(3, seed=0).numpy()
    with pytest.raises(UserError, match="cannot be cross-validated in 4 folds"):
        data_loader.fold_indices(targets, 4, seed=0)
    assert sorted(data_loader.fold_indices(targets, 3, seed=0).tolist()) == [0, 1, 2]


def test_feature_batches_take_a_random_view_in_training_and_both_for_tta():
    features = np.arange(6 * 2 * 1, dtype=np.float32).reshape(6, 2, 1)  # row r: view 0 = 2r, view 1 = 2r + 1
    rows, index, targets = np.arange(6), np.arange(6), torch.zeros(6, 1, dtype=torch.long)
    train = data_loader.FeatureBatches(features, rows, index, targets, batch_size=4, shuffle=True, seed=0)
    seen = np.concatenate([x.numpy()[:, 0] for _, x, _ in train])
    assert sorted(seen // 2) == list(range(6))  # every image once, one of its two views
    both = data_loader.FeatureBatches(features, rows, index, targets, batch_size=4, shuffle=False, seed=0,
                                      both_views=True)
    first = next(iter(both))[1]
    assert first.shape == (4, 2, 1) and first[1].tolist() == [[2.0], [3.0]]


def test_global_batch_shards_together_are_the_one_process_batches():
    """2 ranks' shares of each batch (every other image) are the one-process batch, in its order, every epoch."""
    dataset = list(range(21))

    def batches(shard, epoch):
        generator = torch.Generator().manual_seed(epoch)
        sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(dataset, generator=generator), 8, False)
        return list(GlobalBatchShard(sampler, *shard) if shard else sampler)

    for epoch in (0, 1):
        one, rank0, rank1 = batches(None, epoch), batches((0, 2), epoch), batches((1, 2), epoch)
        assert [len(b) for b in one] == [8, 8, 5] and [len(b) for b in rank0] == [4, 4, 3]
        for whole, a, b in zip(one, rank0, rank1):
            assert whole[0::2] == a and whole[1::2] == b
    assert batches(None, 0) != batches(None, 1)


def test_a_sharded_loader_splits_the_batches_of_the_one_process_loader():
    """make_loader(shard=...) draws the same order from the same generator as the usual shuffled loader."""
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 19

        def __getitem__(self, i):
            return i, torch.zeros(1), None

    def order(shard):
        loader = make_loader(Items(), batch_size=8, shuffle=True, num_workers=0, seed=5, shard=shard)
        loader.generator.manual_seed(11)
        return [indices.tolist() for indices, _, _ in loader]

    one, rank0, rank1 = order(None), order((0, 2)), order((1, 2))
    assert [len(b) for b in one] == [8, 8, 3]
    assert [a + b for a, b in zip(rank0, rank1)] == [whole[0::2] + whole[1::2] for whole in one]


# ---- split_indices: compact targets and quality ----

def test_split_takes_int8_targets_and_gives_what_int64_gives():
    targets = random_targets(seed=3)
    wide = split_indices(targets, 0.2, seed=5)
    for compact in (targets.to(torch.int8), targets.numpy().astype(np.int8)):
        train, val = split_indices(compact, 0.2, seed=5)
        assert np.array_equal(train, wide[0]) and np.array_equal(val, wide[1])


def test_greedy_pass_by_hand():
    # One attribute, 5 positives then 5 negatives in the shuffled order, 2 of 10 rows to val. Labels tie at 5 rows:
    # the positives go first. Wants: train 4, val 1: train, train, train (wants 1 and 1: train has more room),
    # then val (wants 1 > 0). The negatives, rooms now 4 and 1, go the same way: one of each in val.
    targets = np.array([[1]] * 5 + [[0]] * 5, dtype=np.int8)
    train, val = split_indices(targets, 0.2, seed=0)
    assert len(val) == 2 and sorted(targets[val, 0].tolist()) == [0, 1]


def test_split_of_a_medium_set_puts_every_label_at_its_share_rounded():
    # 5000 rows, 16 attributes from 50% down to 5.4% positive, 10% NA: every label (attribute known positive,
    # known negative) gets round(0.2 * its total) rows in val, the best an integer count can do.
    rng = np.random.default_rng(0)
    t = (rng.random((5000, 16)) < 0.5 / np.arange(1, 17) ** 0.8).astype(np.int8)
    t[rng.random((5000, 16)) < 0.1] = -1
    train, val = split_indices(t, 0.2, seed=0)
    assert len(val) == 1000
    for value in (1, 0):
        total, in_val = (t == value).sum(0), (t[val] == value).sum(0)
        assert np.array_equal(in_val, np.round(0.2 * total))


def test_refine_makes_many_swaps_a_round_once_the_single_swap_rounds_are_spent():
    # 500 positives and 500 negatives; val (200 rows) starts with 200 positives, where 100 is its share. One swap
    # per round would need 100 rounds; after 3 such rounds, rounds of many swaps reach 100 / 100 exactly.
    t = np.array([[1]] * 500 + [[0]] * 500, dtype=np.int8)
    part = np.zeros(1000, dtype=np.int8)
    part[:200] = 1
    part = refine(t, part, np.random.default_rng(0), rounds=3)
    assert (part == 1).sum() == 200
    assert (t[part == 1, 0] == 1).sum() == 100 and (t[part == 1, 0] == 0).sum() == 100

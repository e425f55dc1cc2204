from __future__ import annotations

import pytest
import torch

from tests.unit.data.helpers import indices_of, make_dataset
from training.data import BatchLoader, SPC2Sampler


def epoch_order(loader: BatchLoader) -> list[int]:
    return torch.cat([indices_of(x) for x, _ in loader]).tolist()


@pytest.fixture
def ds():
    return make_dataset([i % 5 for i in range(103)], size=6, crop_padding=2, hflip=True)


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_index_once_per_epoch(ds, shuffle):
    loader = BatchLoader(ds, 10, shuffle=shuffle)
    batches = list(loader)
    assert len(batches) == len(loader) == 11
    assert [x.shape[0] for x, _ in batches] == [10] * 10 + [3]
    order = epoch_order(loader)
    assert sorted(order) == list(range(103))
    assert (order == list(range(103))) != shuffle
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 6, 6)
        assert y.dtype == torch.int64
        assert torch.equal(y, indices_of(x) % 5)


def test_drop_last(ds):
    loader = BatchLoader(ds, 10, drop_last=True)
    assert len(loader) == 10
    assert all(x.shape[0] == 10 for x, _ in loader)
    assert len(set(epoch_order(loader))) == 100


def test_deterministic_per_seed_and_epoch(ds):
    a, b, c = BatchLoader(ds, 16, seed=1), BatchLoader(ds, 16, seed=1), BatchLoader(ds, 16, seed=2)
    first = epoch_order(a)
    assert first == epoch_order(b) == epoch_order(a)
    assert first != epoch_order(c)
    a.set_epoch(1)
    assert epoch_order(a) != first
    b.set_epoch(1)
    assert epoch_order(a) == epoch_order(b)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_shards_are_disjoint_and_equal(ds, world_size):
    loaders = [BatchLoader(ds, 8, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for loader in loaders:
        loader.set_epoch(3)
    orders = [epoch_order(loader) for loader in loaders]
    sizes = {len(o) for o in orders}
    assert sizes == {103 // world_size}
    assert len({len(loader) for loader in loaders}) == 1
    union = [i for o in orders for i in o]
    assert len(set(union)) == len(union) == (103 // world_size) * world_size
    full = BatchLoader(ds, 8, seed=5)
    full.set_epoch(3)
    assert set(union) <= set(epoch_order(full))


def test_indices_restrict_the_epoch(ds):
    subset = torch.arange(0, 103, 7)
    loader = BatchLoader(ds, 4, indices=subset)
    assert sorted(epoch_order(loader)) == subset.tolist()
    assert len(loader) == 4


def test_augment_changes_pixels_reproducibly():
    ds = make_dataset([0, 1] * 20, size=8, crop_padding=2, hflip=False)
    plain = [x for x, _ in BatchLoader(ds, 8, shuffle=False)]
    loader = BatchLoader(ds, 8, shuffle=False, augment=True, seed=3)
    aug1 = [x for x, _ in loader]
    aug2 = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(aug1, aug2))
    assert any(not torch.equal(a, p) for a, p in zip(aug1, plain))
    zeros = sum(int((a == 0).sum()) for a in aug1)
    assert zeros > 0
    for a in aug1:
        assert a.shape == (8, 1, 8, 8) and float(a.min()) >= 0 and float(a.max()) <= 1


def test_batch_sampler_yields_spc2_batches():
    ds = make_dataset([i % 4 for i in range(48)])
    sampler = SPC2Sampler(ds.labels, 8, seed=0)
    loader = BatchLoader(ds, batch_sampler=sampler)
    assert len(loader) == len(sampler) == 6
    batches = list(loader)
    assert len(batches) == 6
    for x, y in batches:
        idx = indices_of(x)
        assert torch.equal(y[0::2], y[1::2])
        assert bool((idx[0::2] != idx[1::2]).all())
        assert torch.equal(y, ds.labels[idx])
    loader.set_epoch(1)
    assert sampler.epoch == 1


def test_argument_validation(ds):
    with pytest.raises(ValueError):
        BatchLoader(ds, 0)
    with pytest.raises(ValueError):
        BatchLoader(ds, 4, rank=2, world_size=2)
    with pytest.raises(ValueError):
        BatchLoader(ds, batch_sampler=SPC2Sampler(ds.labels, 4), world_size=2)
    with pytest.raises(ValueError):
        BatchLoader(ds, 8, batch_sampler=SPC2Sampler(ds.labels, 4))
    with pytest.raises(IndexError):
        BatchLoader(ds, 4, indices=[0, 103])

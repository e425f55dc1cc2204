from __future__ import annotations

from collections import Counter

import pytest
import torch

from tests.unit.data.helpers import make_dataset
from training.data import SPC2Sampler, sample_class_images


def check_pairs(batch: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
    assert batch.dtype == torch.int64 and batch.shape == (batch_size,)
    a, b = batch[0::2], batch[1::2]
    assert torch.equal(labels[a], labels[b])
    assert bool((a != b).all())


def test_pairs_share_a_class_and_classes_are_distinct():
    labels = torch.arange(200) % 10
    sampler = SPC2Sampler(labels, 8, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 25
    for batch in batches:
        check_pairs(batch, labels, 8)
        classes = labels[batch[0::2]]
        assert classes.unique().numel() == 4


def test_classes_repeat_only_when_batch_needs_more_than_exist():
    labels = torch.arange(60) % 3
    sampler = SPC2Sampler(labels, 10, seed=2)
    for batch in sampler:
        check_pairs(batch, labels, 10)
        counts = Counter(labels[batch[0::2]].tolist())
        assert set(counts) == {0, 1, 2}
        assert min(counts.values()) >= 1 and max(counts.values()) <= 2


def test_two_image_class_always_yields_both_images():
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3])
    sampler = SPC2Sampler(labels, 4, seed=0)
    seen = set()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        for batch in sampler:
            check_pairs(batch, labels, 4)
            assert 7 not in batch.tolist()
            for a, b in zip(batch[0::2].tolist(), batch[1::2].tolist()):
                if labels[a] == 0:
                    assert {a, b} == {0, 1}
                seen.update((a, b))
    assert seen == set(range(16)) - {7}


def test_epochs_and_seeds_change_the_draw():
    labels = torch.arange(120) % 6
    a, b, c = SPC2Sampler(labels, 6, seed=0), SPC2Sampler(labels, 6, seed=0), SPC2Sampler(labels, 6, seed=1)
    assert torch.equal(a.epoch_batches(), b.epoch_batches())
    assert not torch.equal(a.epoch_batches(), c.epoch_batches())
    first = a.epoch_batches()
    a.set_epoch(1)
    assert not torch.equal(a.epoch_batches(), first)


def test_ranks_split_one_epoch():
    labels = torch.arange(128) % 8
    full = SPC2Sampler(labels, 8, seed=4).epoch_batches()
    assert full.shape == (16, 8)
    shards = [SPC2Sampler(labels, 8, seed=4, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shards] == [8, 8]
    assert torch.equal(shards[0].epoch_batches(), full[0::2])
    assert torch.equal(shards[1].epoch_batches(), full[1::2])


@pytest.mark.parametrize(
    ("labels", "batch_size"),
    [(torch.arange(20) % 2, 5), (torch.arange(20) % 2, 0), (torch.arange(10), 4), (torch.zeros(3), 4)],
)
def test_invalid_configurations(labels, batch_size):
    with pytest.raises(ValueError):
        SPC2Sampler(labels, batch_size)


def test_sample_class_images_returns_requested_classes():
    ds = make_dataset([i % 7 for i in range(70)])
    classes = torch.tensor([[0, 6, 3], [3, 3, 1]])
    idx = sample_class_images(ds, classes, torch.Generator().manual_seed(0))
    assert idx.shape == classes.shape and idx.dtype == torch.int64
    assert torch.equal(ds.labels[idx], classes)


def test_sample_class_images_is_uniform_and_cached():
    ds = make_dataset([0] * 4 + [1] * 6)
    g = torch.Generator().manual_seed(1)
    idx = sample_class_images(ds, torch.zeros(4000, dtype=torch.long), g)
    counts = torch.bincount(idx, minlength=4)
    assert counts.sum() == 4000 and all(800 <= c <= 1200 for c in counts.tolist())
    table = ds.class_index()
    sample_class_images(ds, torch.ones(3, dtype=torch.long), g)
    assert ds.class_index() is table


def test_sample_class_images_reproducible():
    ds = make_dataset([i % 3 for i in range(30)])
    classes = torch.tensor([0, 1, 2, 0, 1, 2])
    a = sample_class_images(ds, classes, torch.Generator().manual_seed(5))
    b = sample_class_images(ds, classes, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_sample_class_images_rejects_empty_or_unknown_class():
    ds = make_dataset([0, 0, 2, 2], num_classes=4)
    with pytest.raises(ValueError, match="no images"):
        sample_class_images(ds, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class ids"):
        sample_class_images(ds, torch.tensor([4]))

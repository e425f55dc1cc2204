from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.data.helpers import make_dataset
from training.data import ImageDataset


def test_properties_and_get():
    ds = make_dataset([0, 1, 2, 1], size=5, channels=3)
    assert len(ds) == 4 and ds.num_classes == 3 and ds.channels == 3 and ds.input_size == (5, 5)
    x, y = ds.get(torch.tensor([3, 0]))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 5, 5)
    assert torch.allclose(x[0], torch.full((3, 5, 5), 3 / 255))
    assert y.tolist() == [1, 0]
    x2, _ = ds.get(np.array([3, 0]))
    assert torch.equal(x, x2)


def test_repr_is_short():
    ds = make_dataset(list(range(3)) * 100, size=16)
    text = repr(ds)
    assert "n=300" in text and "(1, 16, 16)" in text and len(text) < 200


def test_get_does_not_alias_images():
    ds = make_dataset([0, 1])
    x, _ = ds.get([1])
    x.fill_(0.5)
    assert int(ds.images[1, 0, 0, 0]) == 1


def test_subset_copies_in_order():
    ds = make_dataset([0, 1, 2, 0, 1], hflip=True, crop_padding=3)
    ds.class_index()
    sub = ds.subset(torch.tensor([4, 0]))
    assert sub.labels.tolist() == [1, 0]
    assert sub.images[:, 0, 0, 0].tolist() == [4, 0]
    assert (sub.hflip, sub.crop_padding, sub.class_names) == (True, 3, ds.class_names)
    assert sub.class_counts().tolist() == [1, 1, 0]
    sub.images.zero_()
    assert int(ds.images[4, 0, 0, 0]) == 4


def test_class_counts():
    ds = make_dataset([2, 2, 0, 2], num_classes=4)
    assert ds.class_counts().tolist() == [1, 0, 3, 0]


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), "uint8"),
        (torch.zeros(2, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), "uint8"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32), "int64"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), "3 labels"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), "2 class names"),
    ],
)
def test_validation(images, labels, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ImageDataset(images=images, labels=labels, class_names=("a", "b"), name="bad")


def test_rejects_float_indices():
    with pytest.raises(TypeError):
        make_dataset([0, 1]).get(torch.tensor([0.0]))

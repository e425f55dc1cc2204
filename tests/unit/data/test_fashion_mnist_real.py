"""The real Fashion-MNIST from the Debian package ``dataset-fashion-mnist``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.data import dataset_info, load_dataset
from training.data.fashion_mnist import DEFAULT_ROOT

pytestmark = pytest.mark.skipif(
    not Path(DEFAULT_ROOT).is_dir(),
    reason=f"{DEFAULT_ROOT} absent: `apt-get install dataset-fashion-mnist` (or `make setup`) provides it",
)


@pytest.fixture(scope="module")
def train():
    return load_dataset("fashion-mnist", "train")


def test_train_split(train):
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.num_classes == 10 and train.channels == 1 and train.input_size == (28, 28)
    assert train.class_counts().tolist() == [6000] * 10
    assert train.class_names[3] == "Dress" and train.class_names[8] == "Bag"


def test_test_split():
    test = load_dataset("fashion-mnist", "test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert test.class_counts().tolist() == [1000] * 10


def test_hard_coded_normalisation_matches_data(train):
    info = dataset_info("fashion-mnist")
    hist = torch.bincount(train.images.reshape(-1), minlength=256).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = float((hist * values).sum() / hist.sum())
    std = float(((hist * (values - mean) ** 2).sum() / hist.sum()).sqrt())
    assert mean == pytest.approx(info.mean[0], abs=5e-4)
    assert std == pytest.approx(info.std[0], abs=5e-4)

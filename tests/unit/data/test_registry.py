from __future__ import annotations

import pytest
import torch

from tests.unit.data import writers
from tests.unit.data.helpers import DATASET_FIXTURES
from training.data import (
    DatasetNotFoundError,
    ImageDataset,
    dataset_info,
    list_datasets,
    load_dataset,
    register_dataset,
)


def test_expected_datasets_registered():
    assert set(list_datasets()) >= {"fashion-mnist", "cifar10", "svhn", "image-folder"}
    assert list_datasets() == sorted(list_datasets())


def test_every_registered_dataset_has_a_fixture():
    assert set(list_datasets()) <= set(DATASET_FIXTURES), "add a fixture writer for each new dataset"


@pytest.mark.parametrize("name", list_datasets())
@pytest.mark.parametrize("split", ["train", "test"])
def test_dataset_contract(tmp_path, name, split):
    root, options = DATASET_FIXTURES[name](tmp_path)
    info = dataset_info(name, **options)
    ds = load_dataset(name, split, root=str(root), **options)

    assert isinstance(ds, ImageDataset) and ds.name == name
    assert len(ds) > 0
    assert ds.channels == info.channels and ds.input_size == info.input_size
    assert len(info.mean) == len(info.std) == info.channels
    assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)
    if info.num_classes is not None:
        assert ds.num_classes == info.num_classes
        assert ds.class_names == info.class_names
    assert (ds.hflip, ds.crop_padding) == (info.hflip, info.crop_padding)

    idx = torch.arange(min(len(ds), 5)).flip(0)
    x, y = ds.get(idx)
    assert x.dtype == torch.float32 and x.shape == (idx.numel(), info.channels, *info.input_size)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.dtype == torch.int64 and y.shape == (idx.numel(),)
    assert torch.equal(y, ds.labels[idx])
    assert bool(((y >= 0) & (y < ds.num_classes)).all())
    assert torch.equal((x * 255).round().to(torch.uint8), ds.images[idx])


@pytest.mark.parametrize("name", list_datasets())
def test_dataset_overrides_augmentation_defaults(tmp_path, name):
    root, options = DATASET_FIXTURES[name](tmp_path)
    ds = load_dataset(name, "test", root=root, hflip=False, crop_padding=3, **options)
    assert (ds.hflip, ds.crop_padding) == (False, 3)


@pytest.mark.parametrize("name", list_datasets())
def test_dataset_rejects_unknown_option(tmp_path, name):
    root, options = DATASET_FIXTURES[name](tmp_path)
    with pytest.raises(TypeError):
        load_dataset(name, "test", root=root, colour_space="lab", **options)


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("mnist-ish", "train")
    with pytest.raises(ValueError, match="split"):
        load_dataset("fashion-mnist", "validation")
    with pytest.raises(ValueError, match="registered"):
        dataset_info("nope")


def test_dataset_info_values():
    fm = dataset_info("fashion-mnist")
    assert (fm.channels, fm.input_size, fm.num_classes) == (1, (28, 28), 10)
    assert fm.mean == pytest.approx((0.2860,), abs=1e-4) and fm.std == pytest.approx((0.3530,), abs=1e-4)
    c10 = dataset_info("cifar10")
    assert c10.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    assert (c10.channels, c10.input_size) == (3, (32, 32))
    folder = dataset_info("image-folder", size=96, channels=1)
    assert (folder.channels, folder.input_size, folder.mean) == (1, (96, 96), (0.5,))
    with pytest.raises(TypeError):
        dataset_info("svhn", size=3)


def test_register_dataset_rejects_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("cifar10", info=dataset_info("cifar10"))(lambda split, root=None: None)


@pytest.mark.parametrize(
    ("name", "hints"),
    [
        ("fashion-mnist", ["apt-get install dataset-fashion-mnist", "make setup", "train-images-idx3-ubyte"]),
        ("cifar10", ["cifar-10-batches-py", "batches.meta", "data_batch_1"]),
        ("svhn", ["train_32x32.mat"]),
        ("image-folder", ["<root>/train/<class_name>"]),
    ],
)
def test_missing_dataset_error_names_path_and_remedy(tmp_path, name, hints):
    missing = tmp_path / "nothing-here"
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset(name, "train", root=str(missing))
    assert isinstance(exc.value, FileNotFoundError)
    message = str(exc.value)
    assert str(missing) in message
    for hint in hints:
        assert hint in message


@pytest.mark.parametrize(("name", "env"), [("cifar10", "CIFAR10_DIR"), ("svhn", "SVHN_DIR")])
def test_datasets_without_default_root_say_how_to_point_at_one(name, env):
    with pytest.raises(DatasetNotFoundError, match=env):
        load_dataset(name, "test")


def test_cifar10_partial_download(tmp_path):
    batch_dir = writers.write_cifar10(tmp_path, per_batch=2)
    (batch_dir / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", "train", root=tmp_path)

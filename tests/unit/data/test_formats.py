from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from tests.unit.data import writers
from training.data import DatasetFormatError, DatasetNotFoundError, load_dataset, read_idx


# ---- IDX / Fashion-MNIST -------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = writers.write_idx(tmp_path / "a.idx", arr, gz=gz)
    out = read_idx(path, expect_ndim=3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable


def test_read_idx_big_endian_int32(tmp_path):
    arr = np.array([1, 256, 70000], dtype=">i4")
    (tmp_path / "a").write_bytes(writers.idx_bytes(arr, type_code=0x0C))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), [1, 256, 70000])


def test_read_idx_rejects_bad_magic(tmp_path):
    data = bytearray(writers.idx_bytes(np.zeros((2, 2), np.uint8)))
    data[0] = 7
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(DatasetFormatError, match="magic"):
        read_idx(tmp_path / "bad")


def test_read_idx_rejects_truncated_data(tmp_path):
    data = writers.idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-5]
    (tmp_path / "short.gz").write_bytes(gzip.compress(data))
    with pytest.raises(DatasetFormatError, match="bytes follow"):
        read_idx(tmp_path / "short.gz")


def test_read_idx_rejects_wrong_ndim(tmp_path):
    writers.write_idx(tmp_path / "labels", np.zeros(5, np.uint8))
    with pytest.raises(DatasetFormatError, match="expected 3"):
        read_idx(tmp_path / "labels", expect_ndim=3)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_fixture(tmp_path, gz):
    root = writers.write_fashion_mnist(tmp_path, n_train=20, n_test=10, gz=gz, seed=3)
    train = load_dataset("fashion-mnist", "train", root=str(root))
    test = load_dataset("fashion-mnist", "test", root=str(root))
    assert train.images.shape == (20, 1, 28, 28) and test.images.shape == (10, 1, 28, 28)
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == [i % 10 for i in range(20)]
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"
    assert (train.hflip, train.crop_padding) == (False, 2)
    stem = "train-images-idx3-ubyte" + (".gz" if gz else "")
    raw = read_idx(root / stem)
    assert torch.equal(train.images[:, 0], torch.from_numpy(raw))


def test_fashion_mnist_env_var(tmp_path, monkeypatch):
    root = writers.write_fashion_mnist(tmp_path / "env", n_train=10, n_test=10)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(root))
    assert len(load_dataset("fashion-mnist", "train")) == 10


def test_fashion_mnist_count_mismatch(tmp_path):
    root = writers.write_fashion_mnist(tmp_path, n_train=10, n_test=10)
    writers.write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(9, np.uint8))
    with pytest.raises(DatasetFormatError, match="10 images but .* 9 labels"):
        load_dataset("fashion-mnist", "train", root=root)


def test_fashion_mnist_wrong_image_size(tmp_path):
    root = writers.write_fashion_mnist(tmp_path, n_train=4, n_test=4)
    writers.write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((4, 32, 32), np.uint8))
    with pytest.raises(DatasetFormatError, match=r"\(28, 28\)"):
        load_dataset("fashion-mnist", "train", root=root)


# ---- CIFAR-10 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bytes_keys", [True, False])
@pytest.mark.parametrize("use_batch_dir", [True, False])
def test_cifar10_fixture(tmp_path, bytes_keys, use_batch_dir):
    batch_dir = writers.write_cifar10(tmp_path, per_batch=4, bytes_keys=bytes_keys)
    root = batch_dir if use_batch_dir else tmp_path
    train = load_dataset("cifar10", "train", root=str(root))
    test = load_dataset("cifar10", "test", root=str(root))
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.class_names == tuple(writers.CIFAR_NAMES)
    assert (train.hflip, train.crop_padding) == (True, 4)
    with (batch_dir / "data_batch_2").open("rb") as f:
        batch2 = pickle.load(f, encoding="bytes")
    key = b"labels" if bytes_keys else "labels"
    assert train.labels[4:8].tolist() == batch2[key]
    red, _ = train.get(torch.tensor([0, 4]))
    assert torch.all(red[:, 0] == 1.0) and torch.all(red[:, 1:] == 0.0)


def test_cifar10_rejects_foreign_pickle(tmp_path):
    batch_dir = writers.write_cifar10(tmp_path, per_batch=2)
    with (batch_dir / "test_batch").open("wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": pytest.raises}, f)
    with pytest.raises(DatasetFormatError, match="not allowed"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_cifar10_rejects_wrong_row_length(tmp_path):
    batch_dir = writers.write_cifar10(tmp_path, per_batch=2)
    with (batch_dir / "test_batch").open("wb") as f:
        pickle.dump({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DatasetFormatError, match="3072"):
        load_dataset("cifar10", "test", root=tmp_path)


# ---- SVHN ----------------------------------------------------------------------------------------

def test_svhn_fixture(tmp_path):
    root = writers.write_svhn(tmp_path, n_train=12, n_test=6)
    train = load_dataset("svhn", "train", root=str(root))
    test = load_dataset("svhn", "test", root=root)
    assert train.images.shape == (12, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    assert train.labels.tolist() == [(i % 10 + 1) % 10 for i in range(12)]
    assert 0 in train.labels.tolist() and int(train.labels.max()) <= 9
    assert train.class_names == tuple("0123456789")
    assert (train.hflip, train.crop_padding) == (False, 4)
    img0 = train.images[0]
    assert int(img0[0, 0, 1]) == 200
    assert int(img0.sum()) == 200


def test_svhn_rejects_wrong_layout(tmp_path):
    import scipy.io

    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((4, 3, 32, 32), np.uint8), "y": np.ones((4, 1))})
    with pytest.raises(DatasetFormatError, match=r"\[32, 32, 3, N\]"):
        load_dataset("svhn", "test", root=tmp_path)


# ---- image-folder --------------------------------------------------------------------------------

def test_image_folder_rgb(tmp_path):
    root = writers.write_image_folder(tmp_path, per_class=3)
    ds = load_dataset("image-folder", "train", root=root, size=8)
    assert ds.images.shape == (9, 3, 8, 8)
    assert ds.class_names == ("cat", "dog", "eel")
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert (ds.hflip, ds.crop_padding) == (True, 0)
    x, y = ds.get(torch.arange(len(ds)))
    means = x.mean(dim=(2, 3))
    expected = torch.tensor(list(writers.FOLDER_COLOURS.values()), dtype=torch.float32) / 255
    assert torch.allclose(means, expected[y], atol=0.03)


def test_image_folder_grayscale_and_default_size(tmp_path):
    root = writers.write_image_folder(tmp_path, per_class=2)
    ds = load_dataset("image-folder", "test", root=root, channels=1)
    assert ds.images.shape == (6, 1, 64, 64)
    red_luma = int(ds.images[0].float().mean().round())
    assert abs(red_luma - 76) <= 2


def test_image_folder_labels_follow_train_classes(tmp_path):
    root = writers.write_image_folder(tmp_path, per_class=2)
    for f in (root / "test" / "cat").iterdir():
        f.unlink()
    (root / "test" / "cat").rmdir()
    test = load_dataset("image-folder", "test", root=root, size=4)
    assert test.class_names == ("cat", "dog", "eel")
    assert sorted(set(test.labels.tolist())) == [1, 2]


def test_image_folder_unknown_test_class(tmp_path):
    root = writers.write_image_folder(tmp_path, per_class=1)
    (root / "test" / "zebra").mkdir()
    with pytest.raises(DatasetFormatError, match="zebra"):
        load_dataset("image-folder", "test", root=root, size=4)


def test_image_folder_without_split_dir(tmp_path):
    root = writers.write_image_folder(tmp_path / "flat", per_class=1, splits=("train",))
    with pytest.raises(DatasetNotFoundError, match="test"):
        load_dataset("image-folder", "test", root=root, size=4)


def test_image_folder_corrupt_image(tmp_path):
    root = writers.write_image_folder(tmp_path, per_class=1)
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetFormatError, match="broken.png"):
        load_dataset("image-folder", "train", root=root, size=4)


@pytest.mark.parametrize("options", [{"channels": 2}, {"size": 0}])
def test_image_folder_bad_options(tmp_path, options):
    root = writers.write_image_folder(tmp_path, per_class=1)
    with pytest.raises(ValueError):
        load_dataset("image-folder", "train", root=root, **options)

from __future__ import annotations

import os
from pathlib import Path

import torch

from training.data.dataset import DatasetFormatError, DatasetNotFoundError, ImageDataset
from training.data.idx import read_idx
from training.data.registry import DatasetInfo, register_dataset

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ROOT_ENV = "FASHION_MNIST_DIR"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_PREFIX = {"train": "train", "test": "t10k"}

# Mean/std of all 60,000 training images' pixels in [0, 1], measured once from the Debian files.
INFO = DatasetInfo(
    name="fashion-mnist",
    channels=1,
    input_size=(28, 28),
    num_classes=10,
    mean=(0.2860,),
    std=(0.3530,),
    class_names=CLASS_NAMES,
    hflip=False,
    crop_padding=2,
)


def resolve_root(root: str | os.PathLike | None) -> Path:
    """``root`` if given, else ``$FASHION_MNIST_DIR``, else the Debian package's directory."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install the real data with "
        f"`apt-get install dataset-fashion-mnist` (or `make setup`), which puts it in {DEFAULT_ROOT}, "
        f"or point root= or ${ROOT_ENV} at a directory holding the four IDX files."
    )


@register_dataset("fashion-mnist", info=INFO)
def load_fashion_mnist(split: str, root: str | os.PathLike | None = None) -> ImageDataset:
    """Fashion-MNIST from its original IDX files: 60,000 train / 10,000 test, uint8 [N, 1, 28, 28]."""
    base = resolve_root(root)
    prefix = _PREFIX[split]
    images_path = _find(base, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(base, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, expect_ndim=3)
    labels = read_idx(labels_path, expect_ndim=1)
    if images.dtype != "uint8" or labels.dtype != "uint8":
        raise DatasetFormatError(f"{base}: Fashion-MNIST IDX files must hold unsigned bytes")
    if images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    if images.shape[1:] != (28, 28):
        raise DatasetFormatError(f"{images_path}: images are {images.shape[1:]}, expected (28, 28)")
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise DatasetFormatError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    return ImageDataset(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels.astype("int64")),
        class_names=CLASS_NAMES,
        name="fashion-mnist",
        hflip=INFO.hflip,
        crop_padding=INFO.crop_padding,
    )

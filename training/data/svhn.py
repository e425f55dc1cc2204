from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from training.data.dataset import DatasetFormatError, DatasetNotFoundError, ImageDataset
from training.data.registry import DatasetInfo, register_dataset

ROOT_ENV = "SVHN_DIR"
FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
CLASS_NAMES = tuple(str(d) for d in range(10))

# Per-channel statistics of the 73,257 training images as commonly published.
INFO = DatasetInfo(
    name="svhn",
    channels=3,
    input_size=(32, 32),
    num_classes=10,
    mean=(0.4377, 0.4438, 0.4728),
    std=(0.1980, 0.2010, 0.1970),
    class_names=CLASS_NAMES,
    hflip=False,
    crop_padding=4,
)

_LAYOUT = (
    "Download the cropped-digits files (Format 2) train_32x32.mat and test_32x32.mat elsewhere and pass "
    f"root= (or set ${ROOT_ENV}) to the directory holding them."
)


def _path(split: str, root: str | os.PathLike | None) -> Path:
    given = root if root is not None else os.environ.get(ROOT_ENV)
    if not given:
        raise DatasetNotFoundError(f"SVHN has no default location: no root given and ${ROOT_ENV} unset. {_LAYOUT}")
    path = Path(given) / FILES[split]
    if not path.is_file():
        raise DatasetNotFoundError(f"SVHN {split} file not found: {path}. {_LAYOUT}")
    return path


@register_dataset("svhn", info=INFO)
def load_svhn(split: str, root: str | os.PathLike | None = None) -> ImageDataset:
    """SVHN cropped digits from the ``*_32x32.mat`` files: uint8 [N, 3, 32, 32]; label 10 (digit 0) maps to 0."""
    import scipy.io

    path = _path(split, root)
    try:
        mat = scipy.io.loadmat(str(path), variable_names=("X", "y"))
    except (ValueError, NotImplementedError, OSError) as e:
        raise DatasetFormatError(f"{path}: not a MATLAB v5 SVHN file ({e})") from e
    if "X" not in mat or "y" not in mat:
        raise DatasetFormatError(f"{path}: expected variables 'X' and 'y'")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DatasetFormatError(f"{path}: 'X' must be uint8 [32, 32, 3, N], got {x.dtype} {x.shape}")
    if x.shape[3] != y.shape[0]:
        raise DatasetFormatError(f"{path}: {x.shape[3]} images but {y.shape[0]} labels")
    labels = y.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 10):
        raise DatasetFormatError(f"{path}: labels span {labels.min()}..{labels.max()}, expected 1..10")
    labels[labels == 10] = 0
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return ImageDataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        class_names=CLASS_NAMES,
        name="svhn",
        hflip=INFO.hflip,
        crop_padding=INFO.crop_padding,
    )

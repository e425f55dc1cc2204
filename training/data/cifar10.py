from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data.dataset import DatasetFormatError, DatasetNotFoundError, ImageDataset
from training.data.registry import DatasetInfo, register_dataset

ROOT_ENV = "CIFAR10_DIR"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The widely published per-channel statistics of the 50,000 training images (std over all pixels,
# not the 0.2023/0.1994/0.2010 figures that average per-image stds).
INFO = DatasetInfo(
    name="cifar10",
    channels=3,
    input_size=(32, 32),
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    class_names=CLASS_NAMES,
    hflip=True,
    crop_padding=4,
)

_LAYOUT = (
    f"Download the 'CIFAR-10 python version' (cifar-10-python.tar.gz) elsewhere, extract it, and pass "
    f"root= (or set ${ROOT_ENV}) to the directory holding {BATCH_DIR}/ or to {BATCH_DIR}/ itself; it must contain "
    f"{', '.join(TRAIN_FILES)}, {TEST_FILES[0]} and {META_FILE}."
)

# Only what numpy arrays, lists, dicts and strings need: the batches are user-supplied pickles.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch file")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DatasetFormatError(f"{path}: not a CIFAR-10 python batch ({e})") from e
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def resolve_dir(root: str | os.PathLike | None) -> Path:
    """The directory holding the batch files: ``root`` or ``root/cifar-10-batches-py``."""
    given = root if root is not None else os.environ.get(ROOT_ENV)
    if not given:
        raise DatasetNotFoundError(f"CIFAR-10 has no default location: no root given and ${ROOT_ENV} unset. {_LAYOUT}")
    base = Path(given)
    for candidate in (base, base / BATCH_DIR):
        if (candidate / META_FILE).is_file():
            return candidate
    raise DatasetNotFoundError(f"CIFAR-10 not found: no {META_FILE} in {base} or {base / BATCH_DIR}. {_LAYOUT}")


def _class_names(directory: Path) -> tuple[str, ...]:
    meta = _unpickle(directory / META_FILE)
    names = meta.get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != 10:
        raise DatasetFormatError(f"{directory / META_FILE}: 'label_names' must list 10 class names")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if "data" not in batch or "labels" not in batch:
        raise DatasetFormatError(f"{path}: batch lacks 'data' or 'labels' (has {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if data.shape[0] != labels.shape[0]:
        raise DatasetFormatError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetFormatError(f"{path}: labels outside 0..9")
    return data, labels


@register_dataset("cifar10", info=INFO)
def load_cifar10(split: str, root: str | os.PathLike | None = None) -> ImageDataset:
    """CIFAR-10 from the python pickle batches: 50,000 train / 10,000 test, uint8 [N, 3, 32, 32]."""
    directory = resolve_dir(root)
    files = TRAIN_FILES if split == "train" else TEST_FILES
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise DatasetNotFoundError(f"CIFAR-10 {split} files missing in {directory}: {', '.join(missing)}. {_LAYOUT}")
    class_names = _class_names(directory)
    parts = [_read_batch(directory / f) for f in files]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32))
    return ImageDataset(
        images=images,
        labels=torch.from_numpy(labels),
        class_names=class_names,
        name="cifar10",
        hflip=INFO.hflip,
        crop_padding=INFO.crop_padding,
    )

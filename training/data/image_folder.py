from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from training.data.dataset import DatasetFormatError, DatasetNotFoundError, ImageDataset
from training.data.registry import DatasetInfo, register_dataset

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_SIZE = 64

_LAYOUT = (
    "Expected layout: <root>/train/<class_name>/*.png|jpg|jpeg and <root>/test/<class_name>/*.png|jpg|jpeg; "
    "class ids follow the sorted folder names of <root>/train."
)


def image_folder_info(size: int = DEFAULT_SIZE, channels: int = 3) -> DatasetInfo:
    """Shapes for the given options. Normalisation is 0.5/0.5 per channel (maps [0, 1] to [-1, 1]):
    a neutral choice, as the folder's content is unknown until loaded."""
    _check_options(size, channels)
    return DatasetInfo(
        name="image-folder",
        channels=channels,
        input_size=(size, size),
        num_classes=None,
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
        class_names=None,
        hflip=True,
        crop_padding=0,
    )


def _check_options(size: int, channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"image-folder: channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if int(size) < 1:
        raise ValueError(f"image-folder: size must be a positive number of pixels, got {size}")


def _class_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in EXTENSIONS
    )


def _read_image(path: Path, size: int, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetFormatError(f"cannot read image {path}: {e}") from e
    return arr[:, :, None] if arr.ndim == 2 else arr


@register_dataset("image-folder", info=image_folder_info)
def load_image_folder(
    split: str, root: str | os.PathLike | None = None, size: int = DEFAULT_SIZE, channels: int = 3
) -> ImageDataset:
    """Images under ``root/<split>/<class_name>/``, resized to uint8 [N, channels, size, size].

    Class ids come from the sorted folder names of ``root/train`` (or of ``root/<split>`` when there
    is no train folder) so both splits share one labelling.
    """
    _check_options(size, channels)
    size = int(size)
    if root is None:
        raise DatasetNotFoundError(f"image-folder needs root= pointing at a directory. {_LAYOUT}")
    base = Path(root)
    split_dir = base / split
    if not split_dir.is_dir():
        raise DatasetNotFoundError(f"image-folder: split directory {split_dir} does not exist. {_LAYOUT}")
    reference = base / "train" if (base / "train").is_dir() else split_dir
    class_names = _class_dirs(reference)
    if not class_names:
        raise DatasetNotFoundError(f"image-folder: no class folders in {reference}. {_LAYOUT}")
    present = _class_dirs(split_dir)
    unknown = sorted(set(present) - set(class_names))
    if unknown:
        raise DatasetFormatError(f"image-folder: {split_dir} has classes {unknown} absent from {reference}")

    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        found = _image_files(class_dir) if class_dir.is_dir() else []
        if not found:
            log.warning("image-folder: no %s images of class %r in %s", split, name, class_dir)
        files.extend(found)
        labels.extend([label] * len(found))
    if not files:
        raise DatasetNotFoundError(f"image-folder: no {'/'.join(EXTENSIONS)} files under {split_dir}. {_LAYOUT}")

    mode = "RGB" if channels == 3 else "L"
    images = np.empty((len(files), size, size, channels), dtype=np.uint8)
    for i, path in enumerate(files):
        images[i] = _read_image(path, size, mode)
    return ImageDataset(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        labels=torch.tensor(labels, dtype=torch.long),
        class_names=tuple(class_names),
        name="image-folder",
        hflip=True,
        crop_padding=0,
    )

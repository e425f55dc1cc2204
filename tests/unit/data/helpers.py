"""Synthetic datasets and the per-dataset fixture table shared by the data tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from tests.unit.data import writers
from training.data import ImageDataset

# One tiny on-disk fixture per registered dataset: name -> (tmp dir -> (root, load options)).
DATASET_FIXTURES: dict[str, Callable[[Path], tuple[Path, dict[str, Any]]]] = {
    "fashion-mnist": lambda d: (writers.write_fashion_mnist(d / "fmnist"), {}),
    "cifar10": lambda d: (writers.write_cifar10(d / "cifar").parent, {}),
    "svhn": lambda d: (writers.write_svhn(d / "svhn"), {}),
    "image-folder": lambda d: (writers.write_image_folder(d / "folder"), {"size": 8}),
}


def make_dataset(labels: list[int] | torch.Tensor, num_classes: int | None = None, size: int = 4,
                 channels: int = 1, **kwargs: Any) -> ImageDataset:
    """Image i is filled with the value i % 256, so a batch reveals which indices it holds."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = labels.numel()
    values = (torch.arange(n) % 256).to(torch.uint8)
    images = values[:, None, None, None].expand(n, channels, size, size).contiguous()
    k = num_classes if num_classes is not None else int(labels.max()) + 1
    return ImageDataset(images=images, labels=labels, class_names=tuple(f"c{i}" for i in range(k)),
                        name="synthetic", **kwargs)


def indices_of(x: torch.Tensor) -> torch.Tensor:
    """Inverse of make_dataset's encoding, for datasets of at most 256 images."""
    return (x[:, 0, 0, 0] * 255).round().long()

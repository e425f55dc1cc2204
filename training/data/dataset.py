from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

IndexLike = torch.Tensor | Sequence[int] | np.ndarray


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where the loader looked; the message says how to provide them."""


class DatasetFormatError(ValueError):
    """A dataset's files exist but are not in the expected on-disk format."""


def as_index_tensor(indices: IndexLike) -> torch.Tensor:
    """Any integer index collection as a 1-D int64 CPU tensor."""
    idx = torch.as_tensor(indices)
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
    return idx.reshape(-1).to(device="cpu", dtype=torch.long)


@dataclass(frozen=True)
class ClassIndex:
    """Per-class lookup table over a label vector.

    ``order`` [N] int64 holds dataset indices sorted by class; the images of class ``c`` are
    ``order[starts[c] : starts[c] + counts[c]]``. ``starts`` and ``counts`` are [num_classes] int64.
    """

    order: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def from_labels(cls, labels: torch.Tensor, num_classes: int | None = None) -> ClassIndex:
        labels = labels.reshape(-1).to(device="cpu", dtype=torch.long)
        if num_classes is None:
            num_classes = int(labels.max()) + 1 if labels.numel() else 0
        counts = torch.bincount(labels, minlength=num_classes)
        starts = torch.cumsum(counts, 0) - counts
        order = torch.argsort(labels, stable=True)
        return cls(order=order, starts=starts, counts=counts)

    def draw(self, classes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A uniformly random index of an image of each class in ``classes`` (any shape, int64).

        Every class asked for must have at least one image.
        """
        c = classes.to(device="cpu", dtype=torch.long)
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.counts.numel()):
            raise ValueError(f"class ids must lie in [0, {self.counts.numel()}), got {c.min()}..{c.max()}")
        n = self.counts[c]
        if c.numel() and int(n.min()) == 0:
            empty = sorted(set(c[n == 0].tolist()))
            raise ValueError(f"no images of class(es) {empty} in this dataset")
        u = torch.rand(c.shape, generator=generator, device=_generator_device(generator))
        pick = (u.cpu() * n).long().clamp_max(n - 1)
        return self.order[self.starts[c] + pick]


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


@dataclass(eq=False)
class ImageDataset:
    """An in-memory labelled image set.

    ``images`` uint8 [N, C, H, W] in 0..255; ``labels`` int64 [N] in [0, len(class_names)).
    ``hflip`` says whether a horizontal flip preserves the class (False for digits and for
    Fashion-MNIST, where left/right shoes are not balanced); ``crop_padding`` is the zero padding of
    the random-crop augmentation in pixels (0 disables it).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    name: str
    hflip: bool = False
    crop_padding: int = 0
    _class_index: ClassIndex | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.class_names = tuple(str(c) for c in self.class_names)
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            got = getattr(self.images, "dtype", type(self.images).__name__)
            shape = tuple(getattr(self.images, "shape", ()))
            raise TypeError(f"{self.name}: images must be a uint8 tensor [N, C, H, W], got {got} {shape}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.long or self.labels.dim() != 1:
            got = getattr(self.labels, "dtype", type(self.labels).__name__)
            raise TypeError(f"{self.name}: labels must be an int64 tensor [N], got {got}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"{self.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )
        if not self.class_names:
            raise ValueError(f"{self.name}: class_names is empty")
        if self.labels.numel():
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= len(self.class_names):
                raise ValueError(
                    f"{self.name}: labels span {lo}..{hi} but there are {len(self.class_names)} class names"
                )
        if self.crop_padding < 0:
            raise ValueError(f"{self.name}: crop_padding must be >= 0, got {self.crop_padding}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])}, "
            f"classes={self.num_classes}, hflip={self.hflip}, crop_padding={self.crop_padding})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def get(self, indices: IndexLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels at ``indices`` [B]: x float32 [B, C, H, W] in [0, 1], y int64 [B]."""
        idx = as_index_tensor(indices)
        x = self.images[idx].to(torch.float32).div_(255.0)
        return x, self.labels[idx]

    def subset(self, indices: IndexLike) -> ImageDataset:
        """A new dataset holding copies of the images at ``indices`` [K], in that order."""
        idx = as_index_tensor(indices)
        return ImageDataset(
            images=self.images[idx].contiguous(),
            labels=self.labels[idx].contiguous(),
            class_names=self.class_names,
            name=self.name,
            hflip=self.hflip,
            crop_padding=self.crop_padding,
        )

    def class_index(self) -> ClassIndex:
        """The per-class index table, built on first use and cached on this object."""
        if self._class_index is None:
            self._class_index = ClassIndex.from_labels(self.labels, self.num_classes)
        return self._class_index

    def class_counts(self) -> torch.Tensor:
        """Images per class, int64 [num_classes]."""
        return self.class_index().counts.clone()

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal

from training.data.dataset import ImageDataset

log = logging.getLogger(__name__)

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset before loading it.

    ``mean``/``std`` are per-channel normalisation constants for [0, 1] pixels, measured on the
    training split. ``num_classes`` and ``class_names`` are None where they depend on the files
    (image-folder).
    """

    name: str
    channels: int
    input_size: tuple[int, int]
    num_classes: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None
    hflip: bool
    crop_padding: int

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"{self.name}: mean/std need one value per channel ({self.channels})")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"{self.name}: std must be positive, got {self.std}")


Loader = Callable[..., ImageDataset]
InfoSource = DatasetInfo | Callable[..., DatasetInfo]


@dataclass(frozen=True)
class _Entry:
    loader: Loader
    info: InfoSource


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(name: str, *, info: InfoSource) -> Callable[[Loader], Loader]:
    """Register ``loader(split, root=None, **options) -> ImageDataset`` under ``name``.

    ``info`` is a :class:`DatasetInfo`, or a function of the loader's options returning one when
    shapes depend on them.
    """

    def decorate(loader: Loader) -> Loader:
        if name in _REGISTRY and _REGISTRY[name].loader is not loader:
            raise ValueError(f"dataset {name!r} is already registered")
        _REGISTRY[name] = _Entry(loader=loader, info=info)
        return loader

    return decorate


def list_datasets() -> list[str]:
    """Names of the registered datasets, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(list_datasets())}") from None


def dataset_info(name: str, **options: Any) -> DatasetInfo:
    """Static facts about dataset ``name``; ``options`` matter only where shapes depend on them
    (image-folder's ``size`` and ``channels``)."""
    info = _entry(name).info
    if isinstance(info, DatasetInfo):
        if options:
            raise TypeError(f"dataset {name!r} takes no options for its info, got {sorted(options)}")
        return info
    return info(**options)


def load_dataset(name: str, split: Split, root: str | None = None, **options: Any) -> ImageDataset:
    """Load split ``train`` or ``test`` of dataset ``name`` into memory.

    Every dataset accepts ``hflip`` and ``crop_padding`` to override its augmentation defaults;
    other options go to the dataset's loader, which rejects those it does not know.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    entry = _entry(name)
    hflip = options.pop("hflip", None)
    crop_padding = options.pop("crop_padding", None)
    ds = entry.loader(split, root, **options)
    if hflip is not None:
        ds.hflip = bool(hflip)
    if crop_padding is not None:
        if int(crop_padding) < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        ds.crop_padding = int(crop_padding)
    log.info(
        "loaded %s/%s: %d images %s, %d classes",
        name, split, len(ds), (ds.channels, *ds.input_size), ds.num_classes,
    )
    return ds

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

import torch

from training.data.augment import augment_batch
from training.data.dataset import ImageDataset, IndexLike, as_index_tensor
from training.data.samplers import check_shard, epoch_generator


class BatchSampler(Protocol):
    def __iter__(self) -> Iterator[torch.Tensor]: ...

    def __len__(self) -> int: ...


class BatchLoader:
    """Mini-batches sliced straight from an in-memory :class:`ImageDataset`.

    Yields ``(x, y)``: x float32 [B, C, H, W] in [0, 1] (augmented with the dataset's
    ``crop_padding``/``hflip`` when ``augment``), y int64 [B]. The order of an epoch depends only
    on ``seed`` and the epoch set with :meth:`set_epoch` (call it before each epoch; it stays put
    otherwise). With ``world_size > 1`` every rank shuffles identically, the index list is cut to a
    multiple of ``world_size`` and rank ``r`` keeps positions ``r, r + world_size, ...``, so shares
    are disjoint and equal in size. ``batch_sampler`` replaces the built-in order with any iterable
    of int64 index batches (e.g. :class:`SPC2Sampler`, which shards itself).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: bool = False,
        seed: int = 0,
        indices: IndexLike | None = None,
        rank: int = 0,
        world_size: int = 1,
        batch_sampler: BatchSampler | Iterable[torch.Tensor] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        check_shard(rank, world_size)
        if batch_sampler is None:
            if batch_size is None or batch_size < 1:
                raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        else:
            if indices is not None or world_size != 1 or rank != 0:
                raise ValueError("with batch_sampler, pass indices/rank/world_size to the sampler instead")
            sampler_bs = getattr(batch_sampler, "batch_size", None)
            if batch_size is not None and sampler_bs is not None and batch_size != sampler_bs:
                raise ValueError(f"batch_size {batch_size} disagrees with the sampler's {sampler_bs}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.batch_sampler = batch_sampler
        self.device = torch.device(device) if device is not None else None
        self.epoch = 0
        if indices is None:
            self.indices = torch.arange(len(dataset))
        else:
            self.indices = as_index_tensor(indices)
            if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= len(dataset)):
                raise IndexError(f"indices must lie in [0, {len(dataset)})")
        if batch_sampler is None and self.shard_size == 0:
            raise ValueError(f"{self.indices.numel()} indices leave nothing for each of {world_size} rank(s)")

    @property
    def shard_size(self) -> int:
        """Samples this rank sees per epoch (built-in order only)."""
        return self.indices.numel() // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.batch_sampler is not None and hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        if self.batch_sampler is not None:
            return len(self.batch_sampler)  # type: ignore[arg-type]
        n, bs = self.shard_size, self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def epoch_indices(self) -> torch.Tensor:
        """This rank's dataset indices for the current epoch, in order: int64 [shard_size]."""
        order = self.indices
        if self.shuffle:
            order = order[torch.randperm(order.numel(), generator=epoch_generator(self.seed, self.epoch))]
        order = order[: self.shard_size * self.world_size]
        return order[self.rank :: self.world_size]

    def index_batches(self) -> Iterator[torch.Tensor]:
        """The int64 index batches of the current epoch, in order."""
        if self.batch_sampler is not None:
            yield from self.batch_sampler
            return
        order = self.epoch_indices()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start : start + self.batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = epoch_generator(self.seed, self.epoch, stream=2 + self.rank) if self.augment else None
        ds = self.dataset
        for idx in self.index_batches():
            x, y = ds.get(idx)
            if self.device is not None:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
            if self.augment:
                x = augment_batch(x, ds.crop_padding, ds.hflip, gen)
            yield x, y

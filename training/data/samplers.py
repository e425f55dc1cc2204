from __future__ import annotations

import logging
from typing import Iterator

import torch

from training.data.dataset import ClassIndex, ImageDataset

log = logging.getLogger(__name__)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, epoch, stream)."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch) * 7_919 + int(stream) * 104_729) % (2**63))
    return g


def sample_class_images(
    dataset: ImageDataset, classes: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each class id in ``classes`` (int64, any shape), the index of a uniformly drawn image of
    that class. Returns int64 of ``classes``' shape on its device. The per-class table is built once
    and cached on ``dataset``."""
    classes = torch.as_tensor(classes)
    return dataset.class_index().draw(classes, generator).to(classes.device)


class SPC2Sampler:
    """Batches of ``batch_size / 2`` same-class pairs (SPC-2), as index tensors.

    Each batch is int64 [batch_size] where positions 2k and 2k+1 hold two distinct images of one
    class. The classes in a batch are distinct while ``batch_size / 2`` does not exceed the number of
    classes with at least two images; beyond that each batch cycles through fresh permutations of
    them. Images are drawn with replacement across batches, so an epoch of ``N // batch_size``
    batches need not visit every image. With ``world_size > 1`` all ranks draw the same epoch and
    rank ``r`` keeps batches ``r, r + world_size, ...``, an equal disjoint share.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        labels = torch.as_tensor(labels).reshape(-1).to(device="cpu", dtype=torch.long)
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"SPC-2 batch_size must be even and >= 2, got {batch_size}")
        check_shard(rank, world_size)
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError("labels must be non-negative class ids")
        self.index = ClassIndex.from_labels(labels)
        self.classes = torch.nonzero(self.index.counts >= 2).reshape(-1)
        if self.classes.numel() == 0:
            raise ValueError("SPC-2 needs at least one class with two or more images")
        skipped = int((self.index.counts == 1).sum())
        if skipped:
            log.warning("SPC-2: %d class(es) with a single image are never sampled", skipped)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.num_batches = (labels.numel() // self.batch_size) // self.world_size
        if self.num_batches == 0:
            raise ValueError(
                f"{labels.numel()} images make no SPC-2 batch of {batch_size} for each of {world_size} rank(s)"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def epoch_batches(self) -> torch.Tensor:
        """All of this rank's batches for the current epoch: int64 [len(self), batch_size]."""
        g = epoch_generator(self.seed, self.epoch, stream=1)
        total = self.num_batches * self.world_size
        pairs = self.batch_size // 2
        n_cls = self.classes.numel()
        rounds = -(-pairs // n_cls)
        perms = torch.rand((total, rounds, n_cls), generator=g).argsort(dim=2)
        slots = self.classes[perms.reshape(total, rounds * n_cls)[:, :pairs]]
        counts = self.index.counts[slots]
        first = (torch.rand(slots.shape, generator=g) * counts).long().clamp_max(counts - 1)
        second = (torch.rand(slots.shape, generator=g) * (counts - 1)).long().clamp_max(counts - 2)
        second = second + (second >= first).long()
        starts = self.index.starts[slots]
        a = self.index.order[starts + first]
        b = self.index.order[starts + second]
        batches = torch.stack((a, b), dim=2).reshape(total, self.batch_size)
        return batches[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield from self.epoch_batches()


def check_shard(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")

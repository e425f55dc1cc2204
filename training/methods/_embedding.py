"""What the embedder training methods share: SPC-2 batches, frozen BatchNorm, the threat model, mining."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from serving.runtime.spec import Frozen
from serving.runtime.attacks.base import eval_mode
from serving.runtime.attacks.threat import LpBall
from training.metric import MARGIN
from training.methods.base import TrainingMethod

SamplerName = Literal["random", "semihard", "softhard", "distance", "hardest"]


class EmbeddingOptions(Frozen):
    sampler: SamplerName = "random"  # robrank's default for its triplet baselines (spc2-random)
    margin: float = Field(MARGIN, gt=0)
    freeze_bn: bool = True  # BatchNorm in eval mode throughout; only its affine parameters train


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers to eval mode (running statistics fixed); their affine parameters still train."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class EmbeddingMethod(TrainingMethod):
    """Base of the triplet-family methods. ``net(x)`` gives L2-normalised embeddings [B, D]."""

    task = "embedding"
    Options = EmbeddingOptions

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        if self.spec.task != self.task:
            raise ValueError(f"method {self.name!r} trains embedders; {self.spec.arch!r} is a {self.spec.task} model")
        self.ball = LpBall.from_threat(cfg.attack)
        self.steps = cfg.attack_steps
        # Mining draws from a CPU generator of its own so it never shifts the attacks' random stream.
        self.mining_generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,),
                                                                                generator=self.generator)))

    def make_loader(self, train_set, cfg, rank: int, world: int):
        """SPC-2 batches: ``batch_size / 2`` same-class pairs; the sampler shards across ranks itself."""
        from training.data import BatchLoader, SPC2Sampler

        sampler = SPC2Sampler(train_set.labels, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world)
        return BatchLoader(train_set, batch_sampler=sampler, augment=cfg.data.augment, seed=cfg.seed + 7919 * rank)

    def prepare(self, model: nn.Module) -> None:
        if self.options.freeze_bn:
            freeze_batchnorm(model)

    @torch.no_grad()
    def benign_embeddings(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of the benign batch in eval mode, without gradients: [B, D]."""
        with eval_mode(model):
            return model(x)

"""Building blocks shared by the models."""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Fashion-MNIST training-set pixel statistics in [0, 1] units.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
# CIFAR-10 training-set statistics.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``: every model's first layer.

    Living inside the model keeps attacks and serving in pixel space: an epsilon of 8/255 means 8/255
    of the [0, 1] range, and the exported artifact needs no separate preprocessing. mean/std are
    buffers, so they travel with the state dict and are never trained.

    x: [B, C, H, W] in [0, 1] -> [B, C, H, W], roughly zero-mean unit-variance.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"mean and std need the same non-zero length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())}"


def global_avg_pool(fmap: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, C]."""
    return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)


def init_conv_kaiming(module: nn.Module) -> None:
    """He init for convs feeding ReLUs, unit/zero BatchNorm; linears keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

"""WideResNet (Zagoruyko and Komodakis 2016) with pre-activation blocks: the AGKD-BML CIFAR-10 model."""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CIFAR10_MEAN, CIFAR10_STD, Normalize, global_avg_pool, init_conv_kaiming
from .registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus a shortcut.

    When the shape changes, the 1x1 projection takes the pre-activated input (as in the reference
    WRN code), so the un-normalised block input is never added across a width change.
    [B, in_planes, H, W] -> [B, planes, H/stride, W/stride].
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.project = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = nn.Identity()
        if self.project:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        if self.project:
            return out + self.shortcut(pre)
        return out + x


class WideResNet(nn.Module):
    """WRN-depth-k: a 3x3 conv to 16 channels, three groups of (depth - 4) / 6 pre-activation blocks of
    widths 16k, 32k, 64k (strides 1, 2, 2), a final BN+ReLU, global average pool and a linear head.

    Input [B, channels, H, W] in [0, 1]; logits [B, num_classes].
    """

    def __init__(
        self,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive integer, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(channels, 16, 3, stride=1, padding=1, bias=False)
        self.block1 = self._group(16, widths[0], n, 1, dropout)
        self.block2 = self._group(widths[0], widths[1], n, 2, dropout)
        self.block3 = self._group(widths[1], widths[2], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[2])
        self.fc = nn.Linear(widths[2], num_classes)
        init_conv_kaiming(self)
        nn.init.zeros_(self.fc.bias)

    @staticmethod
    def _group(in_planes: int, planes: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        blocks = [PreActBlock(in_planes, planes, stride, dropout)]
        blocks += [PreActBlock(planes, planes, 1, dropout) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] in [0, 1] -> logits [B, K]."""
        return self.features(x)[2]

    @torch.jit.export
    def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, C, H, W] in [0, 1] -> (fmap [B, 64k, H/4, W/4], pooled [B, 64k], logits [B, K]).

        fmap is taken after the final BN+ReLU, the map AGKD-BML's attention is computed on.
        """
        x = self.conv1(self.normalize(x))
        x = self.block3(self.block2(self.block1(x)))
        fmap = F.relu(self.bn(x))
        pooled = global_avg_pool(fmap)
        return fmap, pooled, self.fc(pooled)


@register_model("wrn-28-10")
def wrn_28_10(
    *,
    channels: int = 3,
    input_size: Tuple[int, int] = (32, 32),
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    num_classes: int = 10,
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
) -> WideResNet:
    """WideResNet-28-10 by default (36.5 M parameters); depth/widen_factor build smaller members."""
    if min(input_size) < 4:
        raise ValueError(f"wrn-28-10 needs inputs of at least 4x4, got {tuple(input_size)}")
    return WideResNet(
        channels, mean, std, num_classes, depth=int(depth), widen_factor=int(widen_factor), dropout=float(dropout)
    )

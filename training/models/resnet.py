"""ResNet-18 (BasicBlocks 64-128-256-512): a CIFAR classifier and a metric-learning embedder."""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    global_avg_pool,
    init_conv_kaiming,
)
from .registry import register_model

STEMS = ("cifar", "imagenet")


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, plus the (projected) input, then ReLU.

    [B, in_planes, H, W] -> [B, planes, H/stride, W/stride], non-negative.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18Trunk(nn.Module):
    """Stem and four stages of two BasicBlocks, without normalisation, pooling or head.

    stem 'cifar': 3x3 conv, stride 1, no max-pool (32x32 -> 4x4 fmap).
    stem 'imagenet': 7x7 conv stride 2 and a 3x3 stride-2 max-pool (224x224 -> 7x7 fmap).
    [B, channels, H, W] (normalised) -> fmap [B, 512, h, w], non-negative.
    """

    def __init__(self, channels: int, stem: str) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of {STEMS}")
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        self.layer1 = self._stage(64, 64, stride=1)
        self.layer2 = self._stage(64, 128, stride=2)
        self.layer3 = self._stage(128, 256, stride=2)
        self.layer4 = self._stage(256, 512, stride=2)

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


class ResNet18Classifier(nn.Module):
    """Input [B, channels, H, W] in [0, 1]; logits [B, num_classes]."""

    def __init__(
        self,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        stem: str = "cifar",
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.trunk = ResNet18Trunk(channels, stem)
        self.fc = nn.Linear(512, num_classes)
        init_conv_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] in [0, 1] -> logits [B, K]."""
        return self.features(x)[2]

    @torch.jit.export
    def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, C, H, W] in [0, 1] -> (fmap [B, 512, H/8, W/8], pooled [B, 512], logits [B, K]).

        fmap is the output of the last block (after its final ReLU).
        """
        fmap = self.trunk(self.normalize(x))
        pooled = global_avg_pool(fmap)
        return fmap, pooled, self.fc(pooled)


class ResNet18Embedder(nn.Module):
    """ResNet-18 trunk, global average pool, linear 512 -> D, L2-normalise (the HM paper's embedder).

    Input [B, channels, H, W] in [0, 1]; embedding [B, D] with unit L2 norm.
    """

    def __init__(
        self,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        embedding_dim: int,
        stem: str = "imagenet",
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.trunk = ResNet18Trunk(channels, stem)
        self.fc = nn.Linear(512, embedding_dim)
        init_conv_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] in [0, 1] -> embedding [B, D], unit L2 norm."""
        return self.features(x)[2]

    @torch.jit.export
    def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, C, H, W] in [0, 1] -> (fmap [B, 512, h, w], pooled [B, 512], embedding [B, D])."""
        fmap = self.trunk(self.normalize(x))
        pooled = global_avg_pool(fmap)
        return fmap, pooled, F.normalize(self.fc(pooled), p=2.0, dim=1)


def _check_size(input_size: Tuple[int, int], minimum: int, name: str) -> None:
    # Below this the last stage sees an empty feature map and the error would surface deep in a conv.
    if min(input_size) < minimum:
        raise ValueError(f"{name} needs inputs of at least {minimum}x{minimum}, got {tuple(input_size)}")


@register_model("resnet18-cifar")
def resnet18_cifar(
    *,
    channels: int = 3,
    input_size: Tuple[int, int] = (32, 32),
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    num_classes: int = 10,
) -> ResNet18Classifier:
    """The standard CIFAR ResNet-18 (3x3 stem, no max-pool); defaults to CIFAR-10."""
    _check_size(input_size, 8, "resnet18-cifar")
    return ResNet18Classifier(channels, mean, std, num_classes, stem="cifar")


@register_model("resnet18-embedder")
def resnet18_embedder(
    *,
    channels: int = 3,
    input_size: Tuple[int, int] = (224, 224),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    embedding_dim: int = 512,
    stem: str = "imagenet",
) -> ResNet18Embedder:
    """ResNet-18 embedder, randomly initialised (no pretrained weights can be fetched here).

    stem 'imagenet' for 224x224 images (CUB, Cars, SOP), 'cifar' for small ones.
    """
    if stem == "imagenet" and min(input_size) < 32:
        # The ImageNet stem downsamples 32x: a smaller image would end in a 1x1 (or empty) feature map.
        raise ValueError(
            f"resnet18-embedder with the imagenet stem needs inputs of at least 32x32, got {tuple(input_size)};"
            " use stem='cifar' for small images"
        )
    _check_size(input_size, 8, "resnet18-embedder")
    return ResNet18Embedder(channels, mean, std, embedding_dim, stem=stem)

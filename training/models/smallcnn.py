"""SmallCNN: the 4-conv, 3-fc classifier TRADES uses on MNIST-sized images (~0.31 M parameters at 1x28x28)."""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FASHION_MNIST_MEAN, FASHION_MNIST_STD, Normalize, init_conv_kaiming
from .registry import register_model


class SmallCNN(nn.Module):
    """conv3x3(32) conv3x3(32) maxpool conv3x3(64) conv3x3(64) maxpool fc200 fc200 fcK, ReLU between,
    unpadded convs, dropout after the first fc as in TRADES. ``width`` multiplies the conv channels
    (1: TRADES' model; the fc layers keep 200 units).

    Input [B, channels, H, W] in [0, 1]; logits [B, num_classes].
    """

    def __init__(
        self,
        channels: int,
        input_size: Tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        dropout: float = 0.5,
        width: int = 1,
    ) -> None:
        super().__init__()
        # Each unpadded 3x3 conv trims 2 pixels and each pool halves: 28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4.
        h, w = (((s - 4) // 2 - 4) // 2 for s in input_size)
        if h < 1 or w < 1:
            raise ValueError(f"smallcnn needs inputs of at least 16x16, got {tuple(input_size)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        c1, c2 = 32 * width, 64 * width
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(channels, c1, 3)
        self.conv2 = nn.Conv2d(c1, c1, 3)
        self.conv3 = nn.Conv2d(c1, c2, 3)
        self.conv4 = nn.Conv2d(c2, c2, 3)
        self.fc1 = nn.Linear(c2 * h * w, 200)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(200, 200)
        self.fc3 = nn.Linear(200, num_classes)
        # TRADES zeroes fc3; we keep the default init so every layer receives gradient from step one.
        init_conv_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] in [0, 1] -> logits [B, K]."""
        return self.features(x)[2]

    @torch.jit.export
    def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, C, H, W] in [0, 1] -> (fmap [B, 64 * width, h, w], rep [B, 200], logits [B, K]).

        fmap is the ReLU output of the last conv before its max-pool (8x8 at 28x28 input); rep is what the output
        layer (fc3) consumes, so ``logits = fc3(rep)``; all three come from the same pass.
        """
        x = self.normalize(x)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        fmap = F.relu(self.conv4(x))
        z = torch.flatten(F.max_pool2d(fmap, 2), 1)
        z = self.drop(F.relu(self.fc1(z)))
        rep = F.relu(self.fc2(z))
        return fmap, rep, self.fc3(rep)


@register_model("smallcnn")
def smallcnn(
    *,
    channels: int = 1,
    input_size: Tuple[int, int] = (28, 28),
    mean: Sequence[float] = FASHION_MNIST_MEAN,
    std: Sequence[float] = FASHION_MNIST_STD,
    num_classes: int = 10,
    dropout: float = 0.5,
    width: int = 1,
) -> SmallCNN:
    """TRADES' SmallCNN; defaults to Fashion-MNIST (1x28x28, 10 classes); ``width`` 2 or 4 for a wider one."""
    return SmallCNN(channels, input_size, mean, std, num_classes, dropout=float(dropout), width=width)

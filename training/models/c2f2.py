"""C2F2: robrank's 2-conv, 2-fc embedder for 28x28 images (3.79 M parameters at 1x28x28, 512-d)."""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FASHION_MNIST_MEAN, FASHION_MNIST_STD, Normalize
from .registry import register_model


class C2F2(nn.Module):
    """conv5x5(32, pad 2) ReLU maxpool2, conv5x5(64, pad 2) ReLU maxpool2, fc1024 ReLU, fc D, L2-normalise.

    Same layers as robrank's ranking C2F2 (no dropout, no BatchNorm); unlike robrank, the input is
    normalised by the model's first layer and the output is L2-normalised inside the model, so the
    exported artifact yields the exact vectors retrieval compares.

    Input [B, channels, H, W] in [0, 1]; embedding [B, D] with unit L2 norm.
    """

    def __init__(
        self,
        channels: int,
        input_size: Tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        embedding_dim: int,
    ) -> None:
        super().__init__()
        h, w = (s // 4 for s in input_size)
        if h < 1 or w < 1:
            raise ValueError(f"c2f2 needs inputs of at least 4x4, got {tuple(input_size)}")
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(channels, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * h * w, 1024)
        self.fc2 = nn.Linear(1024, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] in [0, 1] -> embedding [B, D], unit L2 norm."""
        return self.features(x)[2]

    @torch.jit.export
    def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, C, H, W] in [0, 1] -> (fmap [B, 64, H/2, W/2], rep [B, 1024], embedding [B, D]).

        fmap is the ReLU output of the second conv before its max-pool; rep is what the output layer (fc2)
        consumes, so ``embedding = normalize(fc2(rep))``.
        """
        x = self.normalize(x)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        fmap = F.relu(self.conv2(x))
        z = torch.flatten(F.max_pool2d(fmap, 2), 1)
        rep = F.relu(self.fc1(z))
        return fmap, rep, F.normalize(self.fc2(rep), p=2.0, dim=1)


@register_model("c2f2")
def c2f2(
    *,
    channels: int = 1,
    input_size: Tuple[int, int] = (28, 28),
    mean: Sequence[float] = FASHION_MNIST_MEAN,
    std: Sequence[float] = FASHION_MNIST_STD,
    embedding_dim: int = 512,
) -> C2F2:
    """robrank's C2F2 embedder; defaults to Fashion-MNIST (1x28x28) and 512-d embeddings."""
    return C2F2(channels, input_size, mean, std, embedding_dim)

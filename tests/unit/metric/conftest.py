"""Tiny embedders and SPC-2 batches for the metric-learning tests."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class TinyEmbedder(nn.Module):
    """[B, 1, 8, 8] in [0, 1] -> L2-normalised [B, 16]."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 16))

    def forward(self, x):
        return F.normalize(self.net(x), dim=1)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny():
    return TinyEmbedder().eval()


def spc2_batch(pairs: int, classes: int, dim: int = 8, seed: int = 0):
    """Random unit embeddings [2 * pairs, dim] and labels in SPC-2 order (pair k at 2k, 2k+1)."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, classes, (pairs,), generator=g)
    cls[:2] = torch.tensor([0, 1])  # at least two classes
    labels = cls.repeat_interleave(2)
    emb = F.normalize(torch.randn(2 * pairs, dim, generator=g), dim=1)
    return emb, labels

"""Euclidean distance between L2-normalised embeddings, triplet hardness, the triplet loss and the
Intra-Class Structure (ICS) term.

Every function takes embeddings that are already L2-normalised (the embedders normalise inside the
model), so distances lie in [0, 2] and hardness in [-2, 2].
"""
from __future__ import annotations

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.reducers import MeanReducer

MARGIN = 0.2  # the triplet margin of robrank and the HM paper for Euclidean distance on the unit sphere

# sqrt has an infinite derivative at 0 (a pair of identical embeddings); the floor keeps gradients finite.
_EPS = 1e-12


def pairwise_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise Euclidean distance: x, y [T, D] -> [T]."""
    return (x - y).pow(2).sum(dim=1).clamp_min(_EPS).sqrt()


def pdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """All-pairs Euclidean distance of unit vectors: x [N, D], y [M, D] -> [N, M], via 2 - 2 <x, y>."""
    return (2.0 - 2.0 * x @ y.t()).clamp_min(_EPS).sqrt()


def hardness(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Triplet hardness H = d(a, p) - d(a, n): [T, D] x 3 -> [T] in [-2, 2]. A triplet violates the margin
    m when H > -m."""
    return pairwise_distance(a, p) - pairwise_distance(a, n)


def triplet_loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float = MARGIN,
                 reduction: str = "mean") -> torch.Tensor:
    """L_T = max(0, d(a, p) - d(a, n) + margin): [T, D] x 3 -> scalar (mean) or [T] (none)."""
    loss = (hardness(a, p, n) + margin).clamp_min(0.0)
    return loss.mean() if reduction == "mean" else loss


def triplet_loss_pml(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float = MARGIN) -> torch.Tensor:
    """The same mean triplet loss computed by pytorch-metric-learning's TripletMarginLoss (Euclidean distance,
    mean over all triplets, zero-loss ones included, as robrank averages). [T, D] x 3 -> scalar."""
    t = a.shape[0]
    emb = torch.cat([a, p, n])
    idx = torch.arange(t, device=a.device)
    labels = torch.zeros(3 * t, dtype=torch.long, device=a.device)  # unused with an explicit indices tuple
    fn = TripletMarginLoss(margin=margin, distance=LpDistance(normalize_embeddings=False), reducer=MeanReducer())
    return fn(emb, labels, indices_tuple=(idx, idx + t, idx + 2 * t))


def ics_loss(a: torch.Tensor, a_adv: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Intra-Class Structure term L_T(a, a~, p; margin 0) = mean(max(0, d(a, a~) - d(a, p))): the adversarial
    anchor must stay closer to its benign self than the benign positive is. [T, D] x 3 -> scalar."""
    return (pairwise_distance(a, a_adv) - pairwise_distance(a, p)).clamp_min(0.0).mean()

"""Per-anchor triplet samplers for SPC-2 batches (robrank's ``spc2-*`` miners).

A SPC-2 batch holds pairs of same-class images at positions (2k, 2k+1); the anchors are the pairs'
first images, so a batch of B images gives B / 2 triplets. Each sampler returns index tensors
(anchor, positive, negative), int64 [B / 2] each, into the batch. Positives are the other images of the
anchor's class in the batch (at least the pair partner); negatives are images of other classes.

- ``random``: the pair partner and a uniformly drawn negative.
- ``semihard``: the pair partner and a random negative with d(a, p) < d(a, n) < d(a, p) + margin
  (Schroff et al. 2015), else a random negative.
- ``softhard``: a random negative closer than the farthest positive, and a random positive farther than
  the closest negative; each falls back to a random one when no such item exists.
- ``distance``: the pair partner and a negative drawn with probability proportional to q(d)^-1, the inverse
  density of distances between uniform points on the unit sphere, d clipped below at 0.5 and zero weight at
  d >= 1.4 (Wu et al. 2017, robrank's constants), else a random negative.
- ``hardest``: the farthest positive and the closest negative (ties: the lowest index).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from training.metric.hardness import MARGIN, pdist

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

DW_CUTOFF = 0.5
DW_NONZERO_LOSS_CUTOFF = 1.4


def spc2_anchors(batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Anchor positions of a SPC-2 batch: [0, 2, 4, ...], int64 [batch_size // 2]."""
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"a SPC-2 batch has an even size >= 2, got {batch_size}")
    return torch.arange(0, batch_size, 2, device=device)


def _masks(labels: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative masks, bool [T, B]."""
    same = labels[anchors].unsqueeze(1) == labels.unsqueeze(0)
    pos = same.clone()
    pos[torch.arange(anchors.numel(), device=labels.device), anchors] = False
    return pos, ~same


def _draw(weights: torch.Tensor, fallback: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One index per row, drawn with probability proportional to ``weights`` [T, B] (>= 0); rows whose weights
    are all zero draw uniformly from ``fallback`` (bool [T, B]) instead. -> int64 [T]."""
    w = weights.float()
    empty = w.sum(dim=1) <= 0
    w = torch.where(empty.unsqueeze(1), fallback.float(), w)
    if bool((w.sum(dim=1) <= 0).any()):
        raise ValueError("an anchor has no valid candidate: every anchor needs a positive and a negative "
                         "(a SPC-2 batch with at least two classes)")
    # multinomial on a CPU generator keeps the draw reproducible whatever the embeddings' device.
    return torch.multinomial(w.cpu(), 1, generator=generator).reshape(-1).to(weights.device)


def _partner(anchors: torch.Tensor) -> torch.Tensor:
    return anchors + 1


def _random(d, pos, neg, anchors, margin, g):
    return _partner(anchors), _draw(neg, neg, g)


def _semihard(d, pos, neg, anchors, margin, g):
    p = _partner(anchors)
    dap = d.gather(1, p.unsqueeze(1))
    window = neg & (d > dap) & (d < dap + margin)
    return p, _draw(window, neg, g)


def _softhard(d, pos, neg, anchors, margin, g):
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    far_pos = torch.where(pos, d, -inf).amax(dim=1, keepdim=True)
    near_neg = torch.where(neg, d, inf).amin(dim=1, keepdim=True)
    p = _draw(pos & (d > near_neg), pos, g)
    n = _draw(neg & (d < far_pos), neg, g)
    return p, n


def distance_weights(d: torch.Tensor, dim: int, neg: torch.Tensor) -> torch.Tensor:
    """Wu et al.'s negative weights q(d)^-1, normalised per row: d [T, B] distances on the unit sphere in
    R^dim, neg bool [T, B] -> [T, B] >= 0 (zero off ``neg`` and at d >= 1.4)."""
    dc = d.clamp_min(DW_CUTOFF)
    log_q = (dim - 2.0) * dc.log() + (dim - 3.0) / 2.0 * (1.0 - dc.pow(2) / 4.0).clamp_min(1e-8).log()
    valid = neg & (d < DW_NONZERO_LOSS_CUTOFF)
    log_w = torch.where(valid, -log_q, torch.full_like(log_q, -float("inf")))
    top = log_w.amax(dim=1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return torch.exp(log_w - top)


def _distance(d, pos, neg, anchors, margin, g, dim=None):
    return _partner(anchors), _draw(distance_weights(d, dim, neg), neg, g)


def _hardest(d, pos, neg, anchors, margin, g):
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    p = torch.where(pos, d, -inf).argmax(dim=1)
    n = torch.where(neg, d, inf).argmin(dim=1)
    return p, n


SAMPLERS: dict[str, Callable] = {
    "random": _random,
    "semihard": _semihard,
    "softhard": _softhard,
    "distance": _distance,
    "hardest": _hardest,
}


@torch.no_grad()
def sample_triplets(emb: torch.Tensor, labels: torch.Tensor, rule: str, margin: float = MARGIN,
                    generator: Optional[torch.Generator] = None) -> Triplets:
    """Mine one triplet per SPC-2 anchor with ``rule`` (a key of :data:`SAMPLERS`).

    emb: [B, D] L2-normalised embeddings (B even, SPC-2 order); labels: int64 [B].
    Returns (anchor, positive, negative) int64 [B / 2] each, indices into the batch.
    """
    if rule not in SAMPLERS:
        raise ValueError(f"unknown triplet sampler {rule!r}; choose one of {', '.join(SAMPLERS)}")
    anchors = spc2_anchors(emb.shape[0], emb.device)
    if not bool((labels[anchors] == labels[anchors + 1]).all()):
        raise ValueError("not a SPC-2 batch: positions 2k and 2k+1 must share a class")
    emb = emb.detach().float()
    d = pdist(emb[anchors], emb)
    pos, neg = _masks(labels, anchors)
    if rule == "distance":
        p, n = _distance(d, pos, neg, anchors, margin, generator, dim=emb.shape[1])
    else:
        p, n = SAMPLERS[rule](d, pos, neg, anchors, margin, generator)
    return anchors, p, n

"""Adversarial ranking attacks on embedders (robrank's definitions, W = M = 1) and the embedding-shift
attack that EST trains on.

Zhou et al., "Adversarial Ranking Attack and Defense", ECCV 2020, and "Enhancing Adversarial Robustness for
Deep Metric Learning", CVPR 2022 (TMA, ES, LTM, GTM, GTT).

Every attack perturbs one image per row of its batch (a candidate for CA+/CA-, a query otherwise) inside
an L-p ball with :func:`serving.runtime.attacks.pgd.pgd`, no random start, the model in eval mode. The gallery
(clean embeddings [N, D], L2-normalised) is fixed; a row's objective depends only on its own image and
on gallery items, so rows never interact. :func:`select_targets` draws, per row, the gallery items its
attack is about; ``self_idx`` is the row's own position in the gallery (or -1), never a target, never
ranked. Distances are Euclidean between unit vectors.

| name | perturbed | objective (maximised) |
|---|---|---|
| CA+ | candidate c | -mean_k max(0, d(c~, q) - d(g_k, q)): c rises in query q's ranking (q random) |
| CA- | candidate c | -mean_k max(0, d(g_k, q) - d(c~, q)): c falls (q from c's top 1 %) |
| QA+ | query q | -mean_k max(0, d(q~, c) - d(q~, g_k)): candidate c rises (c random) |
| QA- | query q | -mean_k max(0, d(q~, g_k) - d(q~, c)): c falls (c from q's top 1 %) |
| TMA | query q | cos(phi(q~), g_t), t random: the query moves onto a target embedding |
| ES | query q | d(phi(q~), phi(q)): embedding shift |
| LTM | query q | mean d(q~, same class) - mean d(q~, other classes): mis-rank the classes |
| GTM | query q | -d(q~, g_t), t the closest item of another class |
| GTT | query q | d(q~, g_t1) - mean_{k=2..5} d(q~, g_k): push the original top-1 out of the top 4 |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from serving.runtime.attacks.base import eval_mode
from serving.runtime.attacks.core import grad_enabled
from serving.runtime.attacks.pgd import pgd
from serving.runtime.attacks.threat import LpBall

RANK_ATTACKS = ("CA+", "CA-", "QA+", "QA-", "TMA", "ES", "LTM", "GTM", "GTT")
TOP_FRACTION = 0.01  # CA- and QA- pick their pair from the top 1 % of the clean ranking
GTT_DEPTH = 4  # GTT succeeds when the original top-1 leaves the top 4
# The ES objective has a zero gradient at its clean start (a distance to itself); a fixed tiny offset of
# the reference embedding breaks the tie, as robrank does with 1e-7 noise on its first step.
ES_JITTER = 1e-4

_EPS = 1e-12


def _dist(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[b, D] x [N, D] -> [b, N] Euclidean distances of unit vectors."""
    return (2.0 - 2.0 * e @ g.t()).clamp_min(_EPS).sqrt()


def _rowdist(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (e - g).pow(2).sum(dim=-1).clamp_min(_EPS).sqrt()


@dataclass
class RankTargets:
    """What each row of an attack batch is about. gallery [N, D] and labels [N] are shared; the rest has one
    entry per row: self_idx [b] (-1: not in the gallery), label [b], orig [b, D] (clean embedding of the
    attacked image), target [b] (the paired query/candidate/target, -1 when unused), others [b, k]
    (GTT's original ranks 2..5; empty otherwise)."""

    gallery: torch.Tensor
    labels: torch.Tensor
    self_idx: torch.Tensor
    label: torch.Tensor
    orig: torch.Tensor
    target: torch.Tensor
    others: torch.Tensor

    def rows(self, sl: slice) -> "RankTargets":
        return RankTargets(self.gallery, self.labels, self.self_idx[sl], self.label[sl], self.orig[sl],
                           self.target[sl], self.others[sl])

    def exclude(self, with_target: bool) -> torch.Tensor:
        """bool [b, N]: gallery items a row ranks against (not itself, and not its target when asked)."""
        n = self.gallery.shape[0]
        keep = torch.ones(self.self_idx.numel(), n, dtype=torch.bool, device=self.gallery.device)
        rows = torch.arange(self.self_idx.numel(), device=keep.device)
        has_self = self.self_idx >= 0
        keep[rows[has_self], self.self_idx[has_self]] = False
        if with_target:
            keep[rows, self.target] = False
        return keep


def _masked_mean(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (v * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


def _candidate_loss(sign: float) -> Callable[[torch.Tensor, RankTargets], torch.Tensor]:
    def loss(e: torch.Tensor, t: RankTargets) -> torch.Tensor:
        q = t.gallery[t.target]
        a = _rowdist(e, q).unsqueeze(1)
        with torch.no_grad():
            b = _dist(q, t.gallery)
        return -_masked_mean((sign * (a - b)).clamp_min(0.0), t.exclude(True))

    return loss


def _query_loss(sign: float) -> Callable[[torch.Tensor, RankTargets], torch.Tensor]:
    def loss(e: torch.Tensor, t: RankTargets) -> torch.Tensor:
        a = _rowdist(e, t.gallery[t.target]).unsqueeze(1)
        b = _dist(e, t.gallery)
        return -_masked_mean((sign * (a - b)).clamp_min(0.0), t.exclude(True))

    return loss


def _tma(e, t):
    return (e * t.gallery[t.target]).sum(dim=1) / e.norm(dim=1).clamp_min(_EPS)


def _es(e, t):
    return _rowdist(e, t.orig + ES_JITTER)


def _ltm(e, t):
    d = _dist(e, t.gallery)
    keep = t.exclude(False)
    same = (t.labels.unsqueeze(0) == t.label.unsqueeze(1)) & keep
    diff = (t.labels.unsqueeze(0) != t.label.unsqueeze(1)) & keep
    return _masked_mean(d, same) - _masked_mean(d, diff)


def _gtm(e, t):
    return -_rowdist(e, t.gallery[t.target])


def _gtt(e, t):
    d_top = _rowdist(e, t.gallery[t.target])
    d_others = _rowdist(e.unsqueeze(1), t.gallery[t.others]).mean(dim=1)
    return d_top - d_others


OBJECTIVES: dict[str, Callable[[torch.Tensor, RankTargets], torch.Tensor]] = {
    "CA+": _candidate_loss(+1.0),
    "CA-": _candidate_loss(-1.0),
    "QA+": _query_loss(+1.0),
    "QA-": _query_loss(-1.0),
    "TMA": _tma,
    "ES": _es,
    "LTM": _ltm,
    "GTM": _gtm,
    "GTT": _gtt,
}


@torch.no_grad()
def select_targets(name: str, orig: torch.Tensor, self_idx: torch.Tensor, label: torch.Tensor,
                   gallery: torch.Tensor, labels: torch.Tensor,
                   generator: Optional[torch.Generator] = None) -> RankTargets:
    """Draws each row's pair for attack ``name`` from the clean ranking.

    orig: clean embeddings of the attacked images [b, D]; self_idx [b]; label [b]; gallery [N, D];
    labels [N]. CA+/QA+/TMA: a uniformly random gallery item; CA-/QA-: a random item of the row's clean
    top 1 %; GTM: the closest item of another class; GTT: the clean top-1 (target) and ranks 2..5 (others).
    Random draws use ``generator`` (CPU) in row order.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown ranking attack {name!r}; choose one of {', '.join(RANK_ATTACKS)}")
    b, n = orig.shape[0], gallery.shape[0]
    dev = gallery.device
    base = RankTargets(gallery, labels, self_idx, label, orig, torch.full((b,), -1, dtype=torch.long, device=dev),
                       torch.empty(b, 0, dtype=torch.long, device=dev))
    d = _dist(orig, gallery).masked_fill(~base.exclude(False), float("inf"))
    target = base.target
    others = base.others
    if name in ("CA+", "QA+", "TMA"):
        w = base.exclude(False).float().cpu()
        target = torch.multinomial(w, 1, generator=generator).reshape(-1).to(dev)
    elif name in ("CA-", "QA-"):
        top = max(1, int(n * TOP_FRACTION))
        near = d.topk(top, dim=1, largest=False).indices
        pick = torch.randint(0, top, (b,), generator=generator).to(dev)
        target = near.gather(1, pick.unsqueeze(1)).reshape(-1)
    elif name == "GTM":
        other = labels.unsqueeze(0) != label.unsqueeze(1)
        target = d.masked_fill(~other, float("inf")).argmin(dim=1)
    elif name == "GTT":
        near = d.topk(GTT_DEPTH + 1, dim=1, largest=False).indices
        target, others = near[:, 0], near[:, 1:]
    return RankTargets(gallery, labels, self_idx, label, orig, target, others)


def rank_attack(model: nn.Module, name: str, x: torch.Tensor, targets: RankTargets, ball: LpBall,
                steps: int) -> torch.Tensor:
    """PGD (no random start) of attack ``name`` on images x [b, C, H, W] in [0, 1], rows aligned with
    ``targets``. Returns x_adv like x, inside ``ball`` around x."""
    objective = OBJECTIVES[name]
    with eval_mode(model), grad_enabled():
        return pgd(lambda xa: objective(model(xa), targets), x, ball, steps, random_start=False)


def embedding_shift_attack(model: nn.Module, x: torch.Tensor, ball: LpBall, steps: int) -> torch.Tensor:
    """The ES attack alone: maximise ||phi(x~) - phi(x)|| per image (EST's inner maximisation), no random
    start. x [B, C, H, W] in [0, 1] -> x_adv like x."""
    with eval_mode(model), grad_enabled():
        with torch.no_grad():
            ref = model(x).detach() + ES_JITTER
        return pgd(lambda xa: _rowdist(model(xa), ref), x, ball, steps, random_start=False)

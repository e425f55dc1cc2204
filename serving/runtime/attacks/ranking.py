"""Adversarial ranking attacks on embedders as robrank defines them (W = M = 1, metric 'N': Euclidean between
unit vectors) and the embedding-shift attack that EST trains on.

Zhou et al., "Adversarial Ranking Attack and Defense", ECCV 2020, and "Enhancing Adversarial Robustness for
Deep Metric Learning", CVPR 2022 (TMA, ES, LTM, GTM, GTT). Reference code: robrank,
``robrank/attacks/advrank.py`` (``AdvRank.eval_advrank`` selects and measures, ``AdvRank.attack`` runs the
PGD loop), ``advrank_loss.py`` (``AdvRankLoss``: the objectives) and ``advrank_qcselector.py``
(``QCSelector``: the pairs); the rob28/rob224 suites are ``profile_rob28``/``profile_rob224`` in
``robrank/cmdline.py``.

Every attack perturbs one image per row of its batch (a candidate for CA+/CA-, a query otherwise) inside
an L-p ball with :func:`serving.runtime.attacks.pgd.pgd`, no random start, the model in eval mode. The gallery
G (clean embeddings [N, D], L2-normalised) is fixed; a row's objective depends only on its own image and
on gallery items, so rows never interact. :func:`select_targets` draws, per row, the gallery item its
attack is about from the row's clean ranking; ``self_idx`` is the row's own position in the gallery (or -1).
robrank minimises a loss; here each objective is that loss negated and maximised (the same PGD iterates).

| name | perturbed | objective (maximised), x over all of G | pair (from the clean ranking, self excluded) |
|---|---|---|---|
| CA+ | candidate c | -mean_x max(0, d(c~, q) - d(x, q)) | q uniform over G |
| CA- | candidate c | -mean_x max(0, d(x, q) - d(c~, q)) | q uniform over c's top 1 % |
| QA+ | query q | -mean_x max(0, d(q~, c) - d(q~, x)) | c uniform over G |
| QA- | query q | -mean_x max(0, d(q~, x) - d(q~, c)) | c uniform over q's top 1 % |
| TMA | query q | cos(q~, t) | t uniform over G |
| ES | query q | d(q~, q) | - |
| LTM | query q | -max(0, max_{x: y_x != y} d(q~, x) - min_{x: y_x = y} d(q~, x)) | y = q's label |
| GTM | query q | -d(q~, t) | t: the nearest item whose label differs from the clean top-1's |
| GTT | query q | QA- with c = the clean top-1 | - |

Where this departs from robrank, and why (each departure is at most 1/N of a term unless stated):

- Random pairs (CA+, QA+, TMA) never draw the row itself; robrank's ``th.randint`` over all of G may (chance
  1/N), which turns the attack into a trivial one for that row.
- LTM leaves the query's own gallery item out of the same-class minimum, as robrank's
  ``mask_same.scatter(1, loc_self, False)`` intends; that call is not in place, so robrank's minimum includes
  it. With it, the minimum is the distance to the query's own clean embedding and LTM partly becomes ES.
- GTM's target is the nearest gallery item (self excluded) whose label differs from the clean top-1's label,
  as ``QCSelector._sel_gtm`` describes; its ``argrank[i, mask_unmatch[i]].argmin()`` returns a position inside
  the masked list, not a gallery index, so robrank pulls towards an unrelated item.
- ES's zero gradient at the clean start is broken by a fixed offset of the reference (:data:`ES_JITTER`) at
  every step; robrank adds 1e-7 at the first step only. 1e-7 vanishes under our distance's clamp, and 1e-4
  moves the maximised distance by at most 1e-4 * sqrt(D).
- The pair draws use a seeded ``torch.Generator`` in row order, not numpy's global RNG: same distributions,
  other draws.
- The measurements (:func:`serving.runtime.evaluation.retrieval.measure`) follow robrank's, see there.

Not here: robrank's SP-QA (QA plus a weighted QA+ term keeping the clean top-5 in place, ``SPQA`` in
``AdvRank.attack``) and its full-order attacks (FOA); neither is in the rob28/rob224 suites behind the ERS.
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

TOP_FRACTION = 0.01  # CA- and QA- pick their pair from the top 1 % of the clean ranking (robrank's `topmost`)
GTT_DEPTH = 4  # GTT measures whether the original top-1 stays in the top 4 (robrank's `retain@4`)
# The ES objective has a zero gradient at its clean start (a distance to itself); a fixed tiny offset of
# the reference embedding breaks the tie, as robrank does with 1e-7 on its first step.
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
    attacked image), target [b] (the paired query/candidate/target, -1 when unused)."""

    gallery: torch.Tensor
    labels: torch.Tensor
    self_idx: torch.Tensor
    label: torch.Tensor
    orig: torch.Tensor
    target: torch.Tensor

    def rows(self, sl: slice) -> "RankTargets":
        return RankTargets(self.gallery, self.labels, self.self_idx[sl], self.label[sl], self.orig[sl],
                           self.target[sl])

    def not_self(self) -> torch.Tensor:
        """bool [b, N]: every gallery item but the row's own one."""
        n = self.gallery.shape[0]
        keep = torch.ones(self.self_idx.numel(), n, dtype=torch.bool, device=self.gallery.device)
        rows = torch.arange(self.self_idx.numel(), device=keep.device)
        has_self = self.self_idx >= 0
        keep[rows[has_self], self.self_idx[has_self]] = False
        return keep


def _candidate_loss(sign: float) -> Callable[[torch.Tensor, RankTargets], torch.Tensor]:
    """CA+ (sign +1) / CA- (-1): robrank's ``RankLossCandidateAttack``, negated."""
    def loss(e: torch.Tensor, t: RankTargets) -> torch.Tensor:
        q = t.gallery[t.target]
        a = _rowdist(e, q).unsqueeze(1)
        with torch.no_grad():
            b = _dist(q, t.gallery)
        return -(sign * (a - b)).clamp_min(0.0).mean(dim=1)

    return loss


def _query_loss(sign: float) -> Callable[[torch.Tensor, RankTargets], torch.Tensor]:
    """QA+ (sign +1) / QA- (-1): robrank's ``RankLossQueryAttack``, negated."""
    def loss(e: torch.Tensor, t: RankTargets) -> torch.Tensor:
        a = _rowdist(e, t.gallery[t.target]).unsqueeze(1)
        b = _dist(e, t.gallery)
        return -(sign * (a - b)).clamp_min(0.0).mean(dim=1)

    return loss


def _tma(e, t):
    """robrank's ``RankLossTargetedMismatchAttack`` (1 - cos), negated up to its constant."""
    return (e * t.gallery[t.target]).sum(dim=1) / e.norm(dim=1).clamp_min(_EPS)


def _es(e, t):
    """robrank's ``RankLossEmbShift``, negated."""
    return _rowdist(e, t.orig + ES_JITTER)


def _ltm(e, t):
    """robrank's LTM loss in ``AdvRank.attack`` (relu(max d(q~, other class) - min d(q~, own class))), negated."""
    d = _dist(e, t.gallery)
    same = t.labels.unsqueeze(0) == t.label.unsqueeze(1)
    far_other = d.masked_fill(same, float("-inf")).amax(dim=1)
    near_own = d.masked_fill(~same | ~t.not_self(), float("inf")).amin(dim=1)
    return -(far_other - near_own).clamp_min(0.0)


def _gtm(e, t):
    """robrank's ``RankLossGreedyTop1Misrank`` (the distance to the top-1 unmatching item), negated."""
    return -_rowdist(e, t.gallery[t.target])


# The ranking attacks, by name: each one's objective (maximised over the query image). The only list of their names.
RANK_OBJECTIVES: dict[str, Callable[[torch.Tensor, RankTargets], torch.Tensor]] = {
    "CA+": _candidate_loss(+1.0),
    "CA-": _candidate_loss(-1.0),
    "QA+": _query_loss(+1.0),
    "QA-": _query_loss(-1.0),
    "TMA": _tma,
    "ES": _es,
    "LTM": _ltm,
    "GTM": _gtm,
    # robrank's RankLossGreedyTop1Translocation is its QA- loss with the clean top-1 as the candidate.
    "GTT": _query_loss(-1.0),
}
RANK_ATTACKS = tuple(RANK_OBJECTIVES)  # in this order: evaluation seeds each attack by its index


@torch.no_grad()
def select_targets(name: str, orig: torch.Tensor, self_idx: torch.Tensor, label: torch.Tensor,
                   gallery: torch.Tensor, labels: torch.Tensor,
                   generator: Optional[torch.Generator] = None) -> RankTargets:
    """Draws each row's pair for attack ``name`` from the clean ranking (robrank's ``QCSelector``).

    orig: clean embeddings of the attacked images [b, D]; self_idx [b]; label [b]; gallery [N, D];
    labels [N]. The row's own item is never drawn. CA+/QA+/TMA: a uniformly random gallery item; CA-/QA-: a
    uniformly random item of the row's clean top 1 % (at least 1 item); GTM: the nearest item whose label
    differs from the clean top-1's label; GTT: the clean top-1. Random draws use ``generator`` (CPU) in row
    order.
    """
    if name not in RANK_OBJECTIVES:
        raise ValueError(f"unknown ranking attack {name!r}; choose one of {', '.join(RANK_ATTACKS)}")
    b, n = orig.shape[0], gallery.shape[0]
    dev = gallery.device
    base = RankTargets(gallery, labels, self_idx, label, orig, torch.full((b,), -1, dtype=torch.long, device=dev))
    keep = base.not_self()
    d = _dist(orig, gallery).masked_fill(~keep, float("inf"))
    target = base.target
    if name in ("CA+", "QA+", "TMA"):
        target = torch.multinomial(keep.float().cpu(), 1, generator=generator).reshape(-1).to(dev)
    elif name in ("CA-", "QA-"):
        top = max(1, int(n * TOP_FRACTION))
        near = d.topk(top, dim=1, largest=False).indices
        pick = torch.randint(0, top, (b,), generator=generator).to(dev)
        target = near.gather(1, pick.unsqueeze(1)).reshape(-1)
    elif name == "GTM":
        top1_label = labels[d.argmin(dim=1)]
        other = labels.unsqueeze(0) != top1_label.unsqueeze(1)
        target = d.masked_fill(~other, float("inf")).argmin(dim=1)
    elif name == "GTT":
        target = d.argmin(dim=1)
    return RankTargets(gallery, labels, self_idx, label, orig, target)


def rank_attack(model: nn.Module, name: str, x: torch.Tensor, targets: RankTargets, ball: LpBall,
                steps: int) -> torch.Tensor:
    """PGD (no random start) of attack ``name`` on images x [b, C, H, W] in [0, 1], rows aligned with
    ``targets``. Returns x_adv like x, inside ``ball`` around x."""
    objective = RANK_OBJECTIVES[name]
    with eval_mode(model), grad_enabled():
        return pgd(lambda xa: objective(model(xa), targets), x, ball, steps, random_start=False)


def embedding_shift_attack(model: nn.Module, x: torch.Tensor, ball: LpBall, steps: int,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The ES attack alone: maximise ||phi(x~) - phi(x)|| per image (EST's inner maximisation; for L2-normalised
    embeddings the same as minimising their cosine). x [B, C, H, W] in [0, 1] -> x_adv like x.

    Without ``generator`` it starts at x (robrank's ES, and EST's), where the objective's gradient would vanish
    but for the reference's fixed jitter; with one it starts at a uniform random point of the ball drawn from it
    (the export's parity check, which wants inputs away from x)."""
    with eval_mode(model), grad_enabled():
        with torch.no_grad():
            ref = model(x).detach() + ES_JITTER
        return pgd(lambda xa: _rowdist(model(xa), ref), x, ball, steps, random_start=generator is not None,
                   generator=generator)

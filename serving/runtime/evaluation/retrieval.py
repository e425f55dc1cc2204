"""Embedder robustness under the ranking attacks (robrank's definitions, W = M = 1) and the ERS aggregate with
each term's standard error.

A query set is attacked against a fixed gallery of clean embeddings; a query that is itself a gallery item (its
``self_idx``) never retrieves itself in the Recall@1 and retain@4 measures, while the CA/QA percentiles rank
against the whole gallery, own item included, as robrank does. Offline evaluation attacks test images against the whole test set; a probe
attacks its held-out probe set against the archive's gallery.

The measurements follow robrank's ``AdvRank.eval_advrank`` on the adversarial batch, the ERS terms
``ersnormalize`` in robrank's ``tools/pjswipe.py``. Departures, and why:

- R@1 after ES/LTM/GTM and GTT's retain@4 leave out the row's own gallery item by its index; robrank leaves out
  the item nearest to the clean embedding, which is the same item whenever the query is in the gallery (and
  the query's clean embedding is not duplicated), and an arbitrary one for a query outside the gallery.
- ES:D is the shift of the returned adversarial image's embedding; robrank's ``embshift`` reuses the embedding
  its PGD loop computed before the last step, an image it does not return.
- Every figure is a mean over queries; robrank averages per-batch means, which weights a short last batch
  more. Per-query means are what the standard errors describe.
"""
from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import torch
from pydantic import Field
from torch import nn

from serving.runtime.attacks.base import eval_mode
from serving.runtime.attacks.ranking import GTT_DEPTH, RANK_ATTACKS, RankTargets, rank_attack, select_targets
from serving.runtime.attacks.threat import LpBall
from serving.runtime.spec import Frozen

log = logging.getLogger(__name__)

# The ten ERS terms in the paper's column order, each mapped to [0, 100] (higher = more robust).
ERS_TERMS = ("CA+", "CA-", "QA+", "QA-", "TMA", "ES:D", "ES:R", "LTM", "GTM", "GTT")
# term = offset + scale * raw, robrank's ``ersnormalize``: a random CA+/QA+ pair sits at the 50th percentile on
# average, hence the 2; ES:D lies in [0, 2] for unit vectors. Like robrank, no term is clipped, so a CA+/QA+
# percentile above 50 or a negative TMA cosine gives a term above 100.
_TERM_AFFINE: dict[str, tuple[float, float]] = {
    "CA+": (0.0, 2.0),
    "CA-": (100.0, -1.0),
    "QA+": (0.0, 2.0),
    "QA-": (100.0, -1.0),
    "TMA": (100.0, -100.0),
    "ES:D": (100.0, -50.0),
    "ES:R": (0.0, 1.0),
    "LTM": (0.0, 1.0),
    "GTM": (0.0, 1.0),
    "GTT": (0.0, 1.0),
}


class RankProfile(Frozen):
    """One L-inf attack budget for the whole suite (pixel units)."""

    name: str
    eps: float = Field(gt=0)
    step: float = Field(gt=0)
    steps: int = Field(ge=1)


# robrank's cmdline.py: profile_rob28 (eps 0.30196 = 77/255) and profile_rob224 (eps 0.03137 = 8/255), both
# alpha 0.011764 = 3/255 and pgditer 32.
PROFILES = {
    "rob28": RankProfile(name="rob28", eps=77 / 255, step=3 / 255, steps=32),
    "rob224": RankProfile(name="rob224", eps=8 / 255, step=3 / 255, steps=32),
}


def default_profile(input_size: Sequence[int]) -> str:
    return "rob28" if max(input_size) <= 32 else "rob224"


def ers_term(name: str, raw: torch.Tensor | float) -> torch.Tensor | float:
    """One ERS term from its raw value (a float, or a tensor of per-query values)."""
    offset, scale = _TERM_AFFINE[name]
    return offset + scale * raw


def ers_terms(raw: dict[str, float]) -> dict[str, float]:
    """Per-attack values -> ERS terms (100 = unharmed), for the attacks present in ``raw``.

    raw: CA+/CA-/QA+/QA- rank percentiles (%), TMA mean cosine, ES:D mean embedding shift (in [0, 2]),
    ES:R/LTM/GTM Recall@1 (%), GTT % of queries whose top-1 stays in the top 4. CA+ and QA+ double the
    percentile (a random item sits at 50 % on average).
    """
    return {k: float(ers_term(k, raw[k])) for k in ERS_TERMS if k in raw}


def ers(raw: dict[str, float]) -> float:
    """Empirical Robustness Score: the mean of the ten terms of :func:`ers_terms` (robrank's ``ers``)."""
    missing = [k for k in ERS_TERMS if k not in raw]
    if missing:
        raise ValueError(f"ERS needs all ten terms; missing {missing}")
    terms = ers_terms(raw)
    return float(sum(terms[k] for k in ERS_TERMS) / len(ERS_TERMS))


def standard_error(v: torch.Tensor) -> float:
    """Standard error of the mean of per-query values v [Q] (sample standard deviation / sqrt(Q)); 0 for Q < 2."""
    v = v.double()
    return float(v.std(unbiased=True) / v.numel() ** 0.5) if v.numel() > 1 else 0.0


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """x [N, C, H, W] -> embeddings [N, D] (eval mode)."""
    with eval_mode(model):
        out = [model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else x.new_zeros(0, 0)


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.t() + b.pow(2).sum(1).unsqueeze(0)).clamp_min(0)


@torch.no_grad()
def _nearest(e: torch.Tensor, gallery: torch.Tensor, self_idx: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k gallery indices of e [b, D] with each row's own item excluded: [b, k]."""
    d = _sqdist(e, gallery)
    has = self_idx >= 0
    rows = torch.arange(e.shape[0], device=e.device)
    d[rows[has], self_idx[has]] = float("inf")
    return d.topk(k, dim=1, largest=False).indices


@torch.no_grad()
def measure(name: str, e_adv: torch.Tensor, t: RankTargets) -> dict[str, torch.Tensor]:
    """Per-row outcome of attack ``name`` from the adversarial embeddings e_adv [b, D], as robrank measures it:
    CA: 'prank', % of the gallery nearer to the query than the candidate (robrank's ``RankLossCandidateAttack``
    rank / N); QA: 'prank', % of the gallery ranked before the candidate (``RankLossQueryAttack``'s rank / N);
    TMA: 'cos' to the target; ES: 'shift' ||e_adv - orig|| and 'r1'; LTM/GTM: 'r1' (Recall@1 %, self excluded);
    GTT: 'kept' (100 when the clean top-1 is still in the top 4, self excluded)."""
    g = t.gallery
    if name.startswith("CA") or name.startswith("QA"):
        if name.startswith("CA"):
            q = g[t.target]
            a = (e_adv - q).norm(dim=1, keepdim=True)
            b = torch.cdist(q, g)
        else:
            b = torch.cdist(e_adv, g)
            a = b.gather(1, t.target.unsqueeze(1))  # from the same matrix, so the candidate never precedes itself
        return {"prank": 100.0 * (b < a).float().mean(dim=1)}
    if name == "TMA":
        return {"cos": (e_adv * g[t.target]).sum(1) / e_adv.norm(dim=1)}
    nn1 = _nearest(e_adv, g, t.self_idx, GTT_DEPTH)
    r1 = 100.0 * (t.labels[nn1[:, 0]] == t.label).float()
    if name == "ES":
        return {"shift": (e_adv - t.orig).norm(dim=1), "r1": r1}
    if name in ("LTM", "GTM"):
        return {"r1": r1}
    if name == "GTT":
        return {"kept": 100.0 * (nn1 == t.target.unsqueeze(1)).any(1).float()}
    raise ValueError(name)


def attack_queries(model: nn.Module, xq: torch.Tensor, yq: torch.Tensor, self_idx: torch.Tensor,
                   gallery: torch.Tensor, labels: torch.Tensor, profile: RankProfile,
                   attacks: Sequence[str] = RANK_ATTACKS, seed: int = 0, batch_size: int = 250,
                   deadline: Optional[float] = None, on_batch=None) -> dict:
    """Runs each ranking attack once per query image (W = M = 1) and aggregates.

    xq [Q, C, H, W] in [0, 1], yq [Q]: the attacked images; self_idx int64 [Q]: each one's position in the
    gallery (-1 when it is not a gallery item); gallery [N, D] clean unit embeddings with labels [N]. Returns
    {'raw': per-attack values, 'terms': ERS terms of the attacks run, 'ERS' (all nine attacks) or None,
    'ERS_lite' (mean of the terms present), 'seconds'}. ``on_batch(name, x_adv, e_adv, rows)`` sees every
    adversarial batch; past ``deadline`` (time.monotonic()) a TimeoutError is raised between batches.
    """
    model.eval()
    ball = LpBall("linf", profile.eps, profile.step)
    dev = xq.device
    # Each query's clean embedding, once for every attack: its gallery vector, or computed when it is no item.
    self_idx = self_idx.to(dev)
    in_gallery = self_idx >= 0
    orig = gallery[self_idx.clamp_min(0)]
    if not in_gallery.all():
        orig = torch.where(in_gallery.unsqueeze(1), orig, embed(model, xq))
    raw: dict[str, float] = {}
    per_query: dict[str, torch.Tensor] = {}  # ERS term -> per-query term values [Q]
    seconds: dict[str, float] = {}
    for name in attacks:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed * 1009 + RANK_ATTACKS.index(name))
        outs: dict[str, list] = {}
        for s in range(0, len(xq), batch_size):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"time budget spent during {name}")
            rows = torch.arange(s, min(s + batch_size, len(xq)), device=dev)
            tgt = select_targets(name, orig[rows], self_idx[rows], yq[rows], gallery, labels, generator=g)
            x_adv = rank_attack(model, name, xq[rows], tgt, ball, profile.steps)
            e_adv = embed(model, x_adv)
            if on_batch is not None:
                on_batch(name, x_adv, e_adv, rows)
            for k, v in measure(name, e_adv, tgt).items():
                outs.setdefault(k, []).append(v.cpu())
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"time budget spent (after {name})")
        cat = {k: torch.cat(v) for k, v in outs.items()}
        pairs = ((("ES:D", "shift"), ("ES:R", "r1")) if name == "ES" else ((name, next(iter(cat))),))
        for term, key in pairs:
            raw[term] = float(cat[key].mean())
            per_query[term] = ers_term(term, cat[key].double())
        seconds[name] = round(time.perf_counter() - t0, 1)
        log.info("%s: %s (%.0f s)", name, {k: round(float(v.mean()), 4) for k, v in cat.items()}, seconds[name])
    terms = ers_terms(raw)
    out = {"raw": raw, "seconds": seconds, "terms": terms,
           "terms_se": {k: standard_error(v) for k, v in per_query.items()},
           "ERS": None, "ERS_se": None, "queries": int(len(xq)),
           "ERS_lite": float(sum(terms.values()) / len(terms)) if terms else None}
    if all(k in raw for k in ERS_TERMS):
        out["ERS"] = ers(raw)
        # Every attack ran on the same queries, so a query's mean of its ten terms is its share of the ERS: the
        # ERS is their mean, and its standard error counts the correlation between terms.
        out["ERS_se"] = standard_error(torch.stack([per_query[k] for k in ERS_TERMS]).mean(dim=0))
    return out


def attack_suite(model: nn.Module, x: torch.Tensor, y: torch.Tensor, query_idx: torch.Tensor,
                 profile: RankProfile, attacks: Sequence[str] = RANK_ATTACKS, seed: int = 0,
                 batch_size: int = 250, gallery: Optional[torch.Tensor] = None) -> dict:
    """The test set as gallery: x [N, C, H, W] in [0, 1], y [N]; query_idx int64 [Q] the attacked images'
    positions in it. See :func:`attack_queries`."""
    if gallery is None:
        gallery = embed(model, x)
    query_idx = query_idx.to(x.device)
    return attack_queries(model, x[query_idx], y[query_idx], query_idx, gallery, y, profile, attacks, seed,
                          batch_size)

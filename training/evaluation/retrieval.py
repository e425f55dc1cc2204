"""Retrieval evaluation of embedders: benign metrics and the ranking-attack suite with its ERS.

The test set is both the query set and the gallery, and a query never retrieves itself. Benign metrics
always use every test image as a query; the attack suite attacks the stated query subset (every test
image by default) against the full gallery.
"""
from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import numpy as np
import torch
from pydantic import Field
from torch import nn

from serving.runtime.spec import Frozen
from training.attacks.ranking import RANK_ATTACKS, GTT_DEPTH, RankTargets, rank_attack, select_targets
from training.attacks.threat import LpBall

log = logging.getLogger(__name__)

# The ten ERS terms in the paper's column order, each mapped to [0, 100] (higher = more robust).
ERS_TERMS = ("CA+", "CA-", "QA+", "QA-", "TMA", "ES:D", "ES:R", "LTM", "GTM", "GTT")


class RankProfile(Frozen):
    """One L-inf attack budget for the whole suite (pixel units)."""

    name: str
    eps: float = Field(gt=0)
    step: float = Field(gt=0)
    steps: int = Field(ge=1)


PROFILES = {
    "rob28": RankProfile(name="rob28", eps=77 / 255, step=3 / 255, steps=32),  # robrank's 28x28 setting
    "rob224": RankProfile(name="rob224", eps=8 / 255, step=3 / 255, steps=32),  # the paper's ResNet-18 setting
}


def default_profile(input_size: Sequence[int]) -> str:
    return "rob28" if max(input_size) <= 32 else "rob224"


def ers_terms(raw: dict[str, float]) -> dict[str, float]:
    """Per-attack values -> ERS terms in [0, 100].

    raw: CA+/CA-/QA+/QA- rank percentiles (%), TMA mean cosine, ES:D mean embedding shift (in [0, 2]),
    ES:R/LTM/GTM Recall@1 (%), GTT % of queries whose top-1 stays in the top 4. CA+ and QA+ double the
    percentile (a random item sits at 50 % on average) and are capped at 100.
    """
    t = {
        "CA+": min(100.0, 2.0 * raw["CA+"]),
        "CA-": 100.0 - raw["CA-"],
        "QA+": min(100.0, 2.0 * raw["QA+"]),
        "QA-": 100.0 - raw["QA-"],
        "TMA": 100.0 * (1.0 - raw["TMA"]),
        "ES:D": 100.0 * (2.0 - raw["ES:D"]) / 2.0,
        "ES:R": raw["ES:R"],
        "LTM": raw["LTM"],
        "GTM": raw["GTM"],
        "GTT": raw["GTT"],
    }
    return {k: float(min(100.0, max(0.0, v))) for k, v in t.items()}


def ers(raw: dict[str, float]) -> float:
    """Empirical Robustness Score: the mean of the ten terms of :func:`ers_terms`, in [0, 100]."""
    terms = ers_terms(raw)
    return float(sum(terms[k] for k in ERS_TERMS) / len(ERS_TERMS))


# ---------------------------------------------------------------------------------------------- embeddings


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """x [N, C, H, W] -> embeddings [N, D] (eval mode)."""
    was = model.training
    model.eval()
    out = [model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    model.train(was)
    return torch.cat(out) if out else x.new_zeros(0, 0)


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.t() + b.pow(2).sum(1).unsqueeze(0)).clamp_min(0)


# ---------------------------------------------------------------------------------------------- benign


@torch.no_grad()
def retrieval_metrics(emb: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 2),
                      chunk: int = 1024, nmi: bool = True, seed: int = 0) -> dict[str, float]:
    """Recall@k, mAP (over the whole ranking), mAP@R and NMI, all in %, for emb [N, D], labels [N].

    Every item is a query against all the others (a query never retrieves itself). Recall@k: a same-class
    item in the top k. mAP: mean over queries of the average precision at each relevant item's rank.
    mAP@R (Musgrave et al. 2020): R = the query's number of relevant items, AP over the top R divided by R.
    NMI: k-means (faiss, k = number of classes) against the labels.
    """
    emb = emb.float()
    n = emb.shape[0]
    labels = labels.to(emb.device)
    hits = {k: 0 for k in ks}
    ap_sum = apr_sum = 0.0
    counts = torch.bincount(labels)
    for s in range(0, n, chunk):
        q = emb[s:s + chunk]
        d = _sqdist(q, emb)
        rows = torch.arange(q.shape[0], device=emb.device)
        d[rows, rows + s] = float("inf")
        order = d.argsort(dim=1)[:, :n - 1]  # self is last
        rel = (labels[order] == labels[s:s + chunk].unsqueeze(1)).float()
        for k in ks:
            hits[k] += int((rel[:, :k].sum(1) > 0).sum())
        cum = rel.cumsum(1)
        ranks = torch.arange(1, n, device=emb.device, dtype=torch.float32)
        prec = cum / ranks
        n_rel = rel.sum(1)
        ap_sum += float(((prec * rel).sum(1) / n_rel.clamp_min(1)).sum())
        r = counts[labels[s:s + chunk]] - 1
        in_r = ranks.unsqueeze(0) <= r.unsqueeze(1).float()
        apr_sum += float(((prec * rel * in_r).sum(1) / r.clamp_min(1).float()).sum())
    out = {f"R@{k}": 100.0 * hits[k] / n for k in ks}
    out["mAP"] = 100.0 * ap_sum / n
    out["mAP@R"] = 100.0 * apr_sum / n
    if nmi:
        out["NMI"] = 100.0 * nmi_kmeans(emb, labels, seed=seed)
    return out


def nmi_kmeans(emb: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> float:
    """NMI (arithmetic normalisation) between faiss k-means clusters (k = number of classes) and labels."""
    import faiss
    from sklearn.metrics import normalized_mutual_info_score

    x = np.ascontiguousarray(emb.detach().cpu().numpy().astype(np.float32))
    y = labels.detach().cpu().numpy()
    k = int(np.unique(y).size)
    km = faiss.Kmeans(x.shape[1], k, niter=50, seed=int(seed), verbose=False)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return float(normalized_mutual_info_score(y, assign.reshape(-1)))


# ---------------------------------------------------------------------------------------------- attacks


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
    """Per-row outcome of attack ``name`` from the adversarial embeddings e_adv [b, D]:
    CA/QA: 'prank' (% of the compared gallery ranked before the pair); TMA: 'cos'; ES: 'shift' and 'r1';
    LTM/GTM: 'r1'; GTT: 'kept' (1 when the original top-1 is still in the top 4)."""
    g = t.gallery
    if name.startswith("CA") or name.startswith("QA"):
        keep = t.exclude(True)
        if name.startswith("CA"):
            q = g[t.target]
            a = (e_adv - q).norm(dim=1, keepdim=True)
            b = torch.cdist(q, g)
        else:
            a = (e_adv - g[t.target]).norm(dim=1, keepdim=True)
            b = torch.cdist(e_adv, g)
        before = ((b < a) & keep).sum(1).float()
        return {"prank": 100.0 * before / keep.sum(1).float()}
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


def attack_suite(model: nn.Module, x: torch.Tensor, y: torch.Tensor, query_idx: torch.Tensor,
                 profile: RankProfile, attacks: Sequence[str] = RANK_ATTACKS, seed: int = 0,
                 batch_size: int = 250, gallery: Optional[torch.Tensor] = None) -> dict:
    """Runs each ranking attack once per query image (W = M = 1) and aggregates.

    x [N, C, H, W] in [0, 1], y [N]: the test set (the gallery); query_idx: int64 [Q] positions of the
    attacked images in it. Returns {'raw': per-attack values, 'terms': ERS terms, 'ERS', 'seconds'}
    (ERS only when all nine attacks ran).
    """
    model.eval()
    ball = LpBall("linf", profile.eps, profile.step)
    dev = x.device
    if gallery is None:
        gallery = embed(model, x)
    raw: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for name in attacks:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed * 1009 + RANK_ATTACKS.index(name))
        outs: dict[str, list] = {}
        for s in range(0, query_idx.numel(), batch_size):
            qi = query_idx[s:s + batch_size].to(dev)
            tgt = select_targets(name, gallery[qi], qi, y[qi], gallery, y, generator=g)
            x_adv = rank_attack(model, name, x[qi], tgt, ball, profile.steps)
            e_adv = embed(model, x_adv)
            for k, v in measure(name, e_adv, tgt).items():
                outs.setdefault(k, []).append(v.cpu())
        vals = {k: float(torch.cat(v).mean()) for k, v in outs.items()}
        if name == "ES":
            raw["ES:D"], raw["ES:R"] = vals["shift"], vals["r1"]
        else:
            raw[name] = next(iter(vals.values()))
        seconds[name] = round(time.perf_counter() - t0, 1)
        log.info("%s: %s (%.0f s)", name, {k: round(v, 4) for k, v in vals.items()}, seconds[name])
    out = {"raw": raw, "seconds": seconds}
    if all(k in raw for k in ERS_TERMS):
        out["terms"] = ers_terms(raw)
        out["ERS"] = ers(raw)
    return out


def evaluate_embedder(model: nn.Module, x: torch.Tensor, y: torch.Tensor, query_idx: torch.Tensor,
                      profile: RankProfile, seed: int = 0, batch_size: int = 250) -> dict:
    """Benign metrics on the full test set, then the attack suite on ``query_idx``."""
    t0 = time.perf_counter()
    gallery = embed(model, x)
    benign = retrieval_metrics(gallery, y, seed=seed)
    log.info("benign: %s", {k: round(v, 2) for k, v in benign.items()})
    suite = attack_suite(model, x, y, query_idx, profile, seed=seed, batch_size=batch_size, gallery=gallery)
    return {"task": "embedding", "benign": benign, "profile": profile.model_dump(), "attacks": suite["raw"],
            "terms": suite.get("terms"), "ERS": suite.get("ERS"), "attack_seconds": suite["seconds"],
            "queries": int(query_idx.numel()), "gallery": int(x.shape[0]),
            "seconds": round(time.perf_counter() - t0, 1)}


def format_table(report: dict) -> str:
    b = report["benign"]
    lines = [f"benign (gallery {report['gallery']}): " + ", ".join(f"{k} {v:.1f}" for k, v in b.items()),
             f"attacks ({report['profile']['name']}: eps {report['profile']['eps']:.4f}, "
             f"{report['profile']['steps']} steps, {report['queries']} queries):",
             f"{'attack':<6} {'value':>8} {'term':>6}"]
    for k in ERS_TERMS:
        v = report["attacks"].get(k)
        term = (report.get("terms") or {}).get(k)
        lines.append(f"{k:<6} {v:>8.3f} {term:>6.1f}" if term is not None else f"{k:<6} {v!s:>8}")
    if report.get("ERS") is not None:
        lines.append(f"ERS {report['ERS']:.1f}")
    return "\n".join(lines)

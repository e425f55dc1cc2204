"""The offline retrieval report of an embedder: benign metrics (R@1, mAP@R, NMI) and the ranking-attack suite of
:mod:`serving.runtime.evaluation.retrieval` with its ERS, as ``robustserve evaluate``, the benches and the zoo cards write it.

The test set is both the query set and the gallery, and a query never retrieves itself. Benign metrics
always use every test image as a query; the attack suite attacks the stated query subset (every test
image by default) against the full gallery.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from serving.runtime.evaluation.retrieval import (  # noqa: F401  (re-exported for training code)
    ERS_TERMS,
    PROFILES,
    RankProfile,
    _sqdist,
    attack_suite,
    default_profile,
    embed,
    ers,
    ers_terms,
    measure,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- embeddings


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


def evaluate_embedder(model: nn.Module, x: torch.Tensor, y: torch.Tensor, query_idx: torch.Tensor,
                      profile: RankProfile, seed: int = 0, batch_size: int = 250) -> dict:
    """Benign metrics on the full test set, then the attack suite on ``query_idx``."""
    t0 = time.perf_counter()
    gallery = embed(model, x)
    benign = retrieval_metrics(gallery, y, seed=seed)
    log.info("benign: %s", {k: round(v, 2) for k, v in benign.items()})
    suite = attack_suite(model, x, y, query_idx, profile, seed=seed, batch_size=batch_size, gallery=gallery)
    return {"task": "embedding", "benign": benign, "profile": profile.model_dump(), "attacks": suite["raw"],
            "terms": suite.get("terms"), "terms_se": suite.get("terms_se"), "ERS": suite.get("ERS"),
            "ERS_se": suite.get("ERS_se"), "attack_seconds": suite["seconds"],
            "queries": int(query_idx.numel()), "gallery": int(x.shape[0]),
            "seconds": round(time.perf_counter() - t0, 1)}


def format_table(report: dict) -> str:
    """The benign line, then one row per ERS term: raw value, term and the term's standard error over queries."""
    b = report["benign"]
    se = report.get("terms_se") or {}
    lines = [f"benign (gallery {report['gallery']}): " + ", ".join(f"{k} {v:.1f}" for k, v in b.items()),
             f"attacks ({report['profile']['name']}: eps {report['profile']['eps']:.4f}, "
             f"{report['profile']['steps']} steps, {report['queries']} queries):",
             f"{'attack':<6} {'value':>8} {'term':>6} {'SE':>5}"]
    for k in ERS_TERMS:
        v = report["attacks"].get(k)
        term = (report.get("terms") or {}).get(k)
        if term is None:
            lines.append(f"{k:<6} {v!s:>8}")
        else:
            lines.append(f"{k:<6} {v:>8.3f} {term:>6.1f} {se[k]:>5.2f}" if k in se else f"{k:<6} {v:>8.3f} {term:>6.1f}")
    if report.get("ERS") is not None:
        tail = f" +- {report['ERS_se']:.2f} (SE)" if report.get("ERS_se") is not None else ""
        lines.append(f"ERS {report['ERS']:.1f}{tail}")
    return "\n".join(lines)

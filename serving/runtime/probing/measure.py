"""The measurement of one probe, host-agnostic: a server's runner, ``robustserve probe`` and ``robustserve gate``
all reach it through the served task's ``measure`` (:mod:`serving.runtime.tasks`): :func:`classifier_probe` for
classifiers, :func:`retrieval_probe` for retrieval models.

Gradients come from ``module``, the TorchScript twin of the served artifact (ONNX has none), under
``torch.enable_grad()`` outside inference mode; ``serve`` is the serving session (numpy in, numpy out), which also
scores every adversarial example: a gap between the two figures means the served engine does not see the
adversarial examples the way the gradient engine does.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from serving.runtime.evaluation.classification import (
    AttackSpec,
    cascade,
    eps_monotone,
    gradient_checks,
    predict,
    wilson_interval,
)
from serving.runtime.evaluation.retrieval import RankProfile, _nearest, attack_queries, embed
from serving.runtime.probe_set import ProbeSet
from serving.runtime.probing.params import ProbeConfig

ServeFn = Callable[[np.ndarray], np.ndarray]


def attack_specs(cfg: ProbeConfig, eps: float) -> list[AttackSpec]:
    ratio = cfg.step / eps if cfg.step is not None else cfg.step_ratio
    from serving.runtime.attacks import get_attack

    # A one-step attack (FGSM) keeps its one step whatever the probe's budget.
    return [AttackSpec(name=a, steps=cfg.steps if get_attack(a).takes("steps") else None, step_ratio=ratio,
                       norm=cfg.norm) for a in cfg.attacks]


def _serve_labels(serve: ServeFn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = [serve(x[s:s + batch_size].detach().cpu().numpy()).argmax(1) for s in range(0, len(x), batch_size)]
    return torch.from_numpy(np.concatenate(out)).to(x.device) if out else torch.empty(0, dtype=torch.long)


def _serve_embed(serve: ServeFn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = [serve(x[s:s + batch_size].detach().cpu().numpy()) for s in range(0, len(x), batch_size)]
    return torch.from_numpy(np.concatenate(out)).to(x.device)


def classifier_probe(module: nn.Module, serve: ServeFn, probes: ProbeSet, cfg: ProbeConfig,
                     deadline: Optional[float] = None, device: str = "cpu") -> dict:
    """Clean and robust accuracy of the first ``cfg.n`` probe images, per eps the cascade of ``cfg.attacks``
    (cumulative per attack, worst case per point, 95 % Wilson interval), the same adversarial examples scored by
    ``serve`` (transfer), and the gradient-masking flags."""
    x = torch.from_numpy(probes.images()[:cfg.n]).to(device)
    y = torch.from_numpy(probes.y[:cfg.n]).to(device)
    n, bs = len(y), cfg.batch_size
    with torch.no_grad():
        clean_mask = predict(module, x, bs) == y
    serve_clean = _serve_labels(serve, x, bs) == y
    k = int(clean_mask.sum())
    rows, curve = [], {}
    for eps in cfg.eps:
        fooled: dict[str, torch.Tensor] = {}

        def sink(lbl: str, xa: torch.Tensor, pos: torch.Tensor) -> None:
            wrong = _serve_labels(serve, xa, bs) != y[pos]
            fooled.setdefault(lbl, torch.zeros(n, dtype=torch.bool, device=x.device))[pos] |= wrong

        t0 = time.perf_counter()
        cum, robust, secs = cascade(module, attack_specs(cfg, eps), x, y, eps, cfg.seed, bs, sink=sink,
                                    progress=False, deadline=deadline)
        alive = serve_clean.clone()
        transfer = {}
        for lbl in cum:
            if lbl in fooled:
                alive &= ~fooled[lbl]
            transfer[lbl] = alive.sum().item() / n
        kr, kt = int(robust.sum()), int(alive.sum())
        rows.append({"eps": eps, "attacks": cum, "worst_case": kr / n, "worst_case_ci95": wilson_interval(kr, n),
                     "transfer": transfer, "transfer_worst_case": kt / n, "transfer_ci95": wilson_interval(kt, n),
                     "seconds": {**secs, "total": round(time.perf_counter() - t0, 2)}})
        curve[eps] = kr / n
    flags = gradient_checks(module, x[:bs], y[:bs])
    flags["eps_monotone"] = eps_monotone(curve)
    flags["any_flag"] = any(v.get("flag") for v in flags.values() if isinstance(v, dict))
    return {"n": n, "clean_accuracy": k / n, "clean_ci95": wilson_interval(k, n),
            "serving_clean_accuracy": int(serve_clean.sum()) / n, "robust": rows, "flags": flags}


def retrieval_probe(module: nn.Module, serve: ServeFn, probes: ProbeSet, cfg: ProbeConfig, gallery: np.ndarray,
                    gallery_labels: np.ndarray, gallery_ids: list[str], deadline: Optional[float] = None,
                    device: str = "cpu") -> dict:
    """Recall@1 of the first ``cfg.n`` probe images against the gallery, clean and under the embedding-shift
    attack (and by ``serve`` on the same adversarial queries), the mean embedding shift, and ERS-lite (the mean
    of the ERS terms of ``cfg.attacks``), per eps. A probe image that is itself in the gallery never retrieves
    itself."""
    x = torch.from_numpy(probes.images()[:cfg.n]).to(device)
    y = torch.from_numpy(probes.y[:cfg.n]).to(device)
    g = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32)).to(device)
    gl = torch.from_numpy(np.asarray(gallery_labels, dtype=np.int64)).to(device)
    where = {gid: i for i, gid in enumerate(gallery_ids)}
    ids = probes.ids[:cfg.n] if probes.ids is not None else ()
    self_idx = torch.tensor([where.get(i, -1) for i in ids] if ids else [-1] * len(y), dtype=torch.long,
                            device=device)
    n, bs = len(y), cfg.batch_size

    def r1(e: torch.Tensor) -> float:
        e = torch.nn.functional.normalize(e.float(), dim=1)
        nn1 = _nearest(e, g, self_idx, 1)[:, 0]
        return float((gl[nn1] == y).float().mean())

    clean = r1(embed(module, x))
    serve_clean = r1(_serve_embed(serve, x, bs))
    rows = []
    for eps in cfg.eps:
        adv_serve: list[tuple[torch.Tensor, torch.Tensor]] = []

        def on_batch(name: str, x_adv: torch.Tensor, e_adv: torch.Tensor, rows_: torch.Tensor) -> None:
            if name == "ES":
                adv_serve.append((rows_, _serve_embed(serve, x_adv, bs)))

        profile = RankProfile(name="probe", eps=eps, step=cfg.step if cfg.step is not None else cfg.step_ratio * eps,
                              steps=cfg.steps)
        t0 = time.perf_counter()
        suite = attack_queries(module, x, y, self_idx, g, gl, profile, cfg.attacks, cfg.seed, bs,
                               deadline=deadline, on_batch=on_batch)
        e_serve = torch.zeros(n, g.shape[1], device=device)
        for rows_, e in adv_serve:
            e_serve[rows_] = e
        raw = suite["raw"]
        rows.append({"eps": eps, "recall_at_1_attacked": raw["ES:R"] / 100.0, "embedding_shift": raw["ES:D"],
                     "ers_lite": suite["ERS_lite"], "terms": suite["terms"], "terms_se": suite["terms_se"],
                     "raw": raw,
                     "transfer_recall_at_1_attacked": r1(e_serve),
                     "seconds": {**suite["seconds"], "total": round(time.perf_counter() - t0, 2)}})
    return {"n": n, "gallery": int(len(g)), "self_matches_excluded": int((self_idx >= 0).sum()),
            "recall_at_1": clean, "serving_recall_at_1": serve_clean, "robust": rows}

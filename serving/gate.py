"""``robustserve gate``: a canary gate for rollouts. Probes a baseline and a candidate archive offline on the same
probe set (the baseline's) with the same attacks and seed, and refuses promotion (exit 1) when the candidate's
robustness drops by more than the allowed delta.

Classifiers compare worst-case robust accuracy at every eps (and clean accuracy when ``max_clean_drop`` is
set); retrieval models compare Recall@1 under attack and ERS-lite (in points of 100). The decision and both
reports go to ``out`` as JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import Field

from serving.probe import ProbeParams, load_archive_service, opened_archive, probe_service
from serving.runtime.spec import Frozen
from serving.runtime.tasks import get_task


class GateConfig(Frozen):
    baseline: Optional[str] = None  # .mar or export folder now in production
    candidate: Optional[str] = None  # .mar or export folder to promote
    probe: ProbeParams = ProbeParams()
    max_drop: float = Field(0.02, ge=0.0, le=1.0)  # robust accuracy (or attacked Recall@1), absolute
    max_clean_drop: Optional[float] = Field(None, ge=0.0, le=1.0)
    max_ers_drop: float = Field(2.0, ge=0.0)  # ERS-lite points, retrieval only
    out: Optional[str] = None


def compare(base: dict, cand: dict, cfg: GateConfig) -> dict[str, Any]:
    """{"promote": bool, "checks": [{figure, baseline, candidate, drop, allowed, ok}]}."""
    if base.get("task") != cand.get("task"):
        raise ValueError(f"the baseline is a {base.get('task')} model, the candidate a {cand.get('task')} model")
    checks = [{"figure": figure, "baseline": b, "candidate": c, "drop": b - c, "allowed": allowed,
               "ok": b - c <= allowed + 1e-12}
              for figure, b, c, allowed in get_task(base["task"]).gate_checks(base["results"], cand["results"], cfg)
              if allowed is not None]
    return {"promote": all(c["ok"] for c in checks), "checks": checks}


def gate(cfg: GateConfig) -> dict[str, Any]:
    if cfg.baseline is None or cfg.candidate is None:
        raise ValueError("name both archives: --set baseline=<.mar or export folder> --set candidate=<...>")
    with opened_archive(cfg.baseline) as rb, opened_archive(cfg.candidate) as rc:
        from serving.runtime.artifacts import load_manifest

        tasks = load_manifest(rb).model.task, load_manifest(rc).model.task
        if tasks[0] != tasks[1]:
            raise ValueError(f"the baseline {cfg.baseline} is a {tasks[0]} model and the candidate {cfg.candidate} "
                             f"a {tasks[1]} model: a gate compares two models of one task")
        base_svc, cand_svc = load_archive_service(rb), load_archive_service(rc)
        if base_svc.probes is None:
            raise ValueError(f"{cfg.baseline} holds no probe set to compare on")
        cand_svc.probes = base_svc.probes
        base = probe_service(base_svc, cfg.probe, cfg.baseline)
        cand = probe_service(cand_svc, cfg.probe, cfg.candidate)
    if base["probe_set_sha256"] != cand["probe_set_sha256"] or base["config"] != cand["config"]:
        raise RuntimeError("the two probes differ in probe set or attack config; refusing to compare them")
    decision = compare(base, cand, cfg)
    decision.update(baseline=base, candidate=cand, probe_set_sha256=base["probe_set_sha256"],
                    config=base["config"], seed=base["seed"])
    return decision


def run(cfg: GateConfig) -> int:
    decision = gate(cfg)
    for c in decision["checks"]:
        pct = "" if c["figure"].startswith("ers") else " (x100)"
        scale = 1.0 if c["figure"].startswith("ers") else 100.0
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['figure']}{pct}: baseline {scale * c['baseline']:.2f}, "
              f"candidate {scale * c['candidate']:.2f}, drop {scale * c['drop']:.2f} (allowed "
              f"{scale * c['allowed']:.2f})")
    verdict = "PROMOTE" if decision["promote"] else "REFUSE"
    print(f"gate: {verdict} {cfg.candidate} over {cfg.baseline} (probe set {decision['probe_set_sha256'][:16]}..., "
          f"attacks {decision['config']['attacks']}, eps {decision['config']['eps']}, seed {decision['seed']})")
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(decision, indent=1))
        print(f"report: {cfg.out}")
    return 0 if decision["promote"] else 1

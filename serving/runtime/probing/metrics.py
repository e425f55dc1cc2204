"""A probe report as metric samples, named the Prometheus way. The server publishes them as TorchServe model
metrics (``robustserve_probe_*``, labels ModelName and Level first), ``robustserve monitor`` under its own prefix.

attack labels: the cascade's columns (``PGD-20``, ``CW-20``, ``APGD-CE``, ...; cumulative: robust to it and to every
attack before it) and ``worst`` (worst case per point); eps as written by ``%g``.
"""
from __future__ import annotations

from typing import Iterator

# name -> (kind, unit, extra label names in order)
PROBE_METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "clean_accuracy_ratio": ("gauge", "ratio", ()),
    "robust_accuracy_ratio": ("gauge", "ratio", ("attack", "eps")),
    "transfer_robust_accuracy_ratio": ("gauge", "ratio", ("attack", "eps")),
    "recall_at_1_ratio": ("gauge", "ratio", ("condition",)),
    "ers_lite": ("gauge", "score", ()),
    "embedding_shift": ("gauge", "distance", ()),
    "gradient_masking_flag": ("gauge", "flag", ("check",)),
    "duration_seconds": ("gauge", "seconds", ()),
    "last_success_timestamp_seconds": ("gauge", "seconds", ()),
    "runs_total": ("counter", "count", ("status",)),
}
SERVER_PREFIX = "robustserve_probe_"
MASKING_CHECKS = ("zero_gradients", "softmax_outputs", "eps_monotone")


def _eps(e: float) -> str:
    return f"{e:g}"


def report_samples(report: dict) -> Iterator[tuple[str, dict[str, str], float]]:
    """(metric suffix, labels, value) of every figure of ``report``; a failed probe yields only its run count.
    Retrieval figures under attack are those of the first (smallest) eps."""
    yield "runs_total", {"status": str(report.get("status"))}, 1.0
    res = report.get("results")
    if report.get("status") != "ok" or not res:
        return
    yield "duration_seconds", {}, float(report.get("duration_s") or 0.0)
    yield "last_success_timestamp_seconds", {}, float(report.get("started_unix", 0.0)) + float(
        report.get("duration_s") or 0.0)
    if report.get("task") == "classification":
        yield "clean_accuracy_ratio", {}, float(res["clean_accuracy"])
        for row in res["robust"]:
            eps = _eps(row["eps"])
            for lbl, v in row["attacks"].items():
                yield "robust_accuracy_ratio", {"attack": lbl, "eps": eps}, float(v)
            yield "robust_accuracy_ratio", {"attack": "worst", "eps": eps}, float(row["worst_case"])
            for lbl, v in row["transfer"].items():
                yield "transfer_robust_accuracy_ratio", {"attack": lbl, "eps": eps}, float(v)
            yield "transfer_robust_accuracy_ratio", {"attack": "worst", "eps": eps}, float(row["transfer_worst_case"])
        for check in MASKING_CHECKS:
            flag = res["flags"].get(check) or {}
            if flag.get("checked", True):  # eps monotonicity needs two or more eps: no figure rather than a 0
                yield "gradient_masking_flag", {"check": check}, float(bool(flag.get("flag")))
    else:
        row = res["robust"][0]
        yield "recall_at_1_ratio", {"condition": "clean"}, float(res["recall_at_1"])
        yield "recall_at_1_ratio", {"condition": "attacked"}, float(row["recall_at_1_attacked"])
        yield "ers_lite", {}, float(row["ers_lite"])
        yield "embedding_shift", {}, float(row["embedding_shift"])


def probe_samples(report: dict, prefix: str = SERVER_PREFIX) -> Iterator[tuple[str, str, str, dict, float]]:
    """(full name, kind, unit, labels, value) for a metrics backend."""
    for suffix, labels, value in report_samples(report):
        kind, unit, _ = PROBE_METRICS[suffix]
        yield prefix + suffix, kind, unit, labels, value

"""A probe report as metric samples, named the Prometheus way. The server publishes them as TorchServe model
metrics (``robustserve_probe_*``, labels ModelName and Level first), ``robustserve monitor`` under its own prefix.

Each probe replaces its model's figures, never leaving an older probe's series beside them as if current:
- the monitor removes every series of the model that the new probe does not measure (another eps or attack, a
  check not made), as a Pushgateway group is replaced on each push;
- TorchServe's frontend can neither remove a series nor carry NaN (its metric lines take digits only), so the
  server's gauges carry ``config``: a short hash of the probe's configuration (attacks, eps, steps, n, seed, ...).
  A series is then only ever overwritten by a probe of the same configuration, every series of one ``config``
  comes from one probe, and the current figures are those of the ``config`` whose
  ``robustserve_probe_last_success_timestamp_seconds`` is the latest (see the README's metrics section).

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
CONFIG_LABEL = "config"

def report_samples(report: dict) -> Iterator[tuple[str, dict[str, str], float]]:
    """(metric suffix, labels, value) of every figure of ``report`` (its task's
    :meth:`~serving.runtime.tasks.ServedTask.metric_samples`); a failed probe yields only its run count."""
    yield "runs_total", {"status": str(report.get("status"))}, 1.0
    res = report.get("results")
    if report.get("status") != "ok" or not res:
        return
    yield "duration_seconds", {}, float(report.get("duration_s") or 0.0)
    yield "last_success_timestamp_seconds", {}, float(report.get("started_unix", 0.0)) + float(
        report.get("duration_s") or 0.0)
    from serving.runtime.tasks import get_task

    yield from get_task(report.get("task")).metric_samples(res)


def config_id(report: dict) -> str:
    """12 hex digits naming a probe's configuration (the same for every probe run with it)."""
    import hashlib
    import json

    body = json.dumps(report.get("config"), sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(body).hexdigest()[:12]


def probe_samples(report: dict, prefix: str = SERVER_PREFIX) -> Iterator[tuple[str, str, str, dict, float]]:
    """(full name, kind, unit, labels, value) for a metrics backend that cannot remove a series (TorchServe):
    every gauge also carries ``config`` (:func:`config_id`), the run counter does not."""
    for suffix, labels, value in report_samples(report):
        kind, unit, _ = PROBE_METRICS[suffix]
        if kind == "gauge":
            labels = {**labels, CONFIG_LABEL: config_id(report)}
        yield prefix + suffix, kind, unit, labels, value

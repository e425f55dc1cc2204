"""A probe report as metric samples (serving.runtime.probing.metrics)."""
from __future__ import annotations

import math

import pytest

from serving.runtime.probing.metrics import (PROBE_METRICS, SERVER_PREFIX, config_id, probe_samples,
                                              report_samples)


def test_classifier_report_samples(finished):
    svc, started, _ = finished
    rep = svc.probe_runner.history.find(started.body["probe"]["id"])
    samples = list(report_samples(rep))
    keyed = {(name, tuple(sorted(labels.items()))): v for name, labels, v in samples}
    assert len(keyed) == len(samples)  # no series is reported twice
    assert keyed[("runs_total", (("status", "ok"),))] == 1.0
    assert keyed[("clean_accuracy_ratio", ())] == rep["results"]["clean_accuracy"]
    robust = {labels["eps"]: set() for name, labels, _ in samples if name == "robust_accuracy_ratio"}
    for name, labels, _ in samples:
        if name == "robust_accuracy_ratio":
            robust[labels["eps"]].add(labels["attack"])
    assert robust == {"0.05": {"PGD-3", "FGSM", "worst"}, "0.2": {"PGD-3", "FGSM", "worst"}}
    for row in rep["results"]["robust"]:
        eps = f"{row['eps']:g}"
        for lbl, v in row["attacks"].items():
            assert keyed[("robust_accuracy_ratio", (("attack", lbl), ("eps", eps)))] == v
            assert keyed[("transfer_robust_accuracy_ratio", (("attack", lbl), ("eps", eps)))] == row["transfer"][lbl]
        assert keyed[("robust_accuracy_ratio", (("attack", "worst"), ("eps", eps)))] == row["worst_case"]
        assert keyed[("transfer_robust_accuracy_ratio", (("attack", "worst"), ("eps", eps)))] == \
            row["transfer_worst_case"]
    for check in ("zero_gradients", "softmax_outputs", "eps_monotone"):
        assert keyed[("gradient_masking_flag", (("check", check),))] == float(rep["results"]["flags"][check]["flag"])
    assert keyed[("duration_seconds", ())] == rep["duration_s"]
    assert keyed[("last_success_timestamp_seconds", ())] == pytest.approx(rep["started_unix"] + rep["duration_s"])


def test_probe_samples_follow_the_declared_metrics(finished):
    svc, started, _ = finished
    rep = svc.probe_runner.history.find(started.body["probe"]["id"])
    out = list(probe_samples(rep))
    assert len(out) == len(list(report_samples(rep)))
    for full, kind, unit, labels, value in out:
        assert full.startswith(SERVER_PREFIX)
        declared_kind, declared_unit, label_names = PROBE_METRICS[full[len(SERVER_PREFIX):]]
        # A gauge also names the probe's configuration: TorchServe never drops a series, so one config's series
        # must not be overwritten by another's.
        extra = ("config",) if kind == "gauge" else ()
        assert (kind, unit, tuple(labels)) == (declared_kind, declared_unit, label_names + extra)
        assert kind == "counter" or labels["config"] == config_id(rep)
        assert math.isfinite(value)
    assert [o[:2] for o in out if o[1] == "counter"] == [("robustserve_probe_runs_total", "counter")]
    assert list(probe_samples(rep, prefix="x_"))[0][0] == "x_runs_total"


def test_config_id_names_the_configuration_not_the_run():
    a = {"config": {"attacks": ["PGD-20"], "eps": [0.05], "steps": 20, "n": 64, "seed": 0}, "id": "1"}
    b = {**a, "id": "2", "started_unix": 5.0}
    c = {**a, "config": {**a["config"], "eps": [0.05, 0.1]}}
    assert config_id(a) == config_id(b) != config_id(c) and len(config_id(a)) == 12


@pytest.mark.parametrize("status", ["failed", "timeout"])
def test_unsuccessful_report_yields_only_its_run_count(status):
    report = {"status": status, "task": "classification", "results": None, "duration_s": 3.0, "started_unix": 1.0}
    assert list(report_samples(report)) == [("runs_total", {"status": status}, 1.0)]
    assert list(probe_samples(report)) == [("robustserve_probe_runs_total", "counter", "count", {"status": status},
                                            1.0)]

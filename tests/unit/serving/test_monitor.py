"""The monitor's exporter and its wait for a server, in-process (the end-to-end runs are integration tests)."""
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving.monitor import Monitor, MonitorConfig
from serving.runtime.evaluation.classification import eps_monotone


def clf_report(rows, started=1.0):
    """rows: {eps: {attack label: accuracy}}; the worst case is the last column (cumulative cascade)."""
    curve = {e: min(cols.values()) for e, cols in rows.items()}
    flags = {"zero_gradients": {"flag": False}, "softmax_outputs": {"flag": False}, "eps_monotone": eps_monotone(curve)}
    return {"status": "ok", "task": "classification", "duration_s": 2.0, "started_unix": started, "results": {
        "clean_accuracy": 0.9, "flags": flags,
        "robust": [{"eps": e, "attacks": cols, "worst_case": min(cols.values()), "transfer": cols,
                    "transfer_worst_case": min(cols.values())} for e, cols in rows.items()]}}


def series(mon, name):
    out = {}
    for fam in text_string_to_metric_families(generate_latest(mon.registry).decode()):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_each_probe_replaces_the_models_series(tmp_path):
    mon = Monitor(MonitorConfig(history=str(tmp_path / "h.jsonl"), workdir=str(tmp_path)))
    mon.record("clf", clf_report({0.05: {"PGD-20": 0.8, "APGD-CE": 0.7}, 0.1: {"PGD-20": 0.7, "APGD-CE": 0.625}}),
               "ok")
    mon.record("other", clf_report({0.1: {"PGD-20": 0.5}}), "ok")
    first = series(mon, "robustserve_monitor_robust_accuracy_ratio")
    assert first[(("attack", "APGD-CE"), ("eps", "0.1"), ("model", "clf"))] == 0.625
    assert (("check", "eps_monotone"), ("model", "clf")) in series(mon, "robustserve_monitor_gradient_masking_flag")
    # A PGD-only probe at one eps: APGD-CE and eps 0.1 were not measured, so they are gone, not left stale
    # beside a worst case they would contradict; eps monotonicity was not checked, so it has no series either.
    mon.record("clf", clf_report({0.05: {"PGD-20": 0.75}}, started=2.0), "ok")
    now = series(mon, "robustserve_monitor_robust_accuracy_ratio")
    assert {k: v for k, v in now.items() if ("model", "clf") in k} == {
        (("attack", "PGD-20"), ("eps", "0.05"), ("model", "clf")): 0.75,
        (("attack", "worst"), ("eps", "0.05"), ("model", "clf")): 0.75}
    flags = series(mon, "robustserve_monitor_gradient_masking_flag")
    assert (("check", "eps_monotone"), ("model", "clf")) not in flags
    assert (("check", "zero_gradients"), ("model", "clf")) in flags
    # Another model's series are its own.
    assert now[(("attack", "PGD-20"), ("eps", "0.1"), ("model", "other"))] == 0.5
    # A failed probe replaces nothing: the last successful figures stay (with their timestamp).
    mon.record("clf", {"status": "failed", "error": "x"}, "failed")
    assert series(mon, "robustserve_monitor_robust_accuracy_ratio") == now


def test_one_eps_is_not_checked_rather_than_fine():
    one = eps_monotone({0.1: 0.5})
    assert one["checked"] is False and one["flag"] is None and "one eps" in one["why"]
    two = eps_monotone({0.05: 0.5, 0.1: 0.6})
    assert two["checked"] is True and two["flag"] is True


def test_a_server_that_does_not_answer_is_waited_for(tmp_path):
    mon = Monitor(MonitorConfig(workdir=str(tmp_path / "nothing"), models=("clf",), history=str(tmp_path / "h")))
    assert mon.round() is False  # nothing probed, nothing raised
    ready, models = mon.readiness()
    assert not ready and "server not reachable" in models["clf"]["why"]
    assert series(mon, "robustserve_monitor_server_up") == {(): 0.0}
    assert series(mon, "robustserve_monitor_probes_total") == {}  # waiting is not a failed probe

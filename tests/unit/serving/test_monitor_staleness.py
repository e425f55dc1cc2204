"""The monitor outlives its server and never passes off old figures as current."""
import time

from serving.monitor import Monitor, MonitorConfig

OK = {"status": "ok", "task": "classification", "duration_s": 1.0, "results": {
    "clean_accuracy": 0.9, "flags": {}, "robust": [{"eps": 0.1, "attacks": {"PGD-20": 0.6}, "worst_case": 0.6,
                                                    "transfer": {"PGD-20": 0.6}, "transfer_worst_case": 0.6}]}}


def sample(mon: Monitor, name: str, **labels) -> float:
    return mon.registry.get_sample_value(name, labels)


def test_a_down_server_fails_the_round_and_figures_turn_stale(tmp_path):
    cfg = MonitorConfig(workdir=str(tmp_path / "nothing-runs-here"), max_age_s=0.5,
                        history=str(tmp_path / "h.jsonl"))
    mon = Monitor(cfg)
    mon.record("m", {**OK, "started_unix": time.time()}, "ok")
    assert mon.readiness()[0] and sample(mon, "robustserve_monitor_stale", model="m") == 0
    assert mon.round() is False  # no server: a round that found nothing to probe, not an exception
    assert sample(mon, "robustserve_monitor_server_up") == 0
    time.sleep(0.6)
    ready, models = mon.readiness()
    assert not ready and models["m"]["stale"] and "not reachable" in models["m"]["why"]
    assert sample(mon, "robustserve_monitor_stale", model="m") == 1
    assert sample(mon, "robustserve_monitor_ready") == 0
    mon.server_down = None  # back (as the next round that reaches the server sets it), with fresh figures
    mon.record("m", {**OK, "started_unix": time.time()}, "ok")
    assert mon.readiness()[0] and sample(mon, "robustserve_monitor_stale", model="m") == 0


def test_a_model_that_never_succeeded_turns_stale_too(tmp_path):
    mon = Monitor(MonitorConfig(models=("m",), max_age_s=0.2, history=str(tmp_path / "h.jsonl")))
    assert sample(mon, "robustserve_monitor_max_age_seconds") == 0.2
    mon.readiness()
    assert sample(mon, "robustserve_monitor_stale", model="m") == 0
    time.sleep(0.3)
    ready, models = mon.readiness()
    assert sample(mon, "robustserve_monitor_stale", model="m") == 1 and models["m"]["stale"]


def test_default_max_age_tolerates_one_missed_round():
    cfg = MonitorConfig(interval_s=60, wait_s=30)
    assert cfg.stale_after_s == 150

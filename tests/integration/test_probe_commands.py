"""`robustserve probe`, `robustserve monitor` and `robustserve gate` against a real TorchServe and real archives."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.monitor import Monitor, MonitorConfig
from serving.probe import ProbeParams, probe_offline
from tests.integration.conftest import in_own_pid_namespace
from tests.unit.serving.builders import export_small, write_untrained_checkpoint

pytestmark = pytest.mark.integration

SMALL = {"attacks": ["pgd"], "eps": [0.05], "steps": 5, "n": 32, "seed": 3}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def server_sets(server) -> list[str]:
    """Only the work folder: its addresses and keys are read there."""
    return ["--set", f"workdir={server.cfg.workdir}"]


def after_rate_limit(server, model: str) -> None:
    """Waits until a probe of ``model`` may start again (the test server allows one start every 3 s)."""
    state = server.inst.probe_dir / f"{model}.state.json"
    last = json.loads(state.read_text())["started_unix"] if state.exists() else 0.0
    time.sleep(max(0.0, last + 3.2 - time.time()))


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_probe_command_against_the_server_equals_it_offline(server, tmp_path):
    after_rate_limit(server, "clf")
    out = tmp_path / "report.json"
    sets = [f"probe.{k}={json.dumps(v)}" for k, v in SMALL.items()]
    r = cli("probe", "--set", "model=clf", *server_sets(server), *[a for s in sets for a in ("--set", s)],
            "--set", f"out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "worst case" in r.stdout and "clean accuracy" in r.stdout
    served = json.loads(out.read_text())
    # The same probe offline, on the archive TorchServe serves.
    offline = probe_offline(server.store / "clf.mar", ProbeParams(**SMALL))
    assert served["config"] == offline["config"] and served["probe_set_sha256"] == offline["probe_set_sha256"]
    assert served["artifacts"] == offline["artifacts"]
    assert served["results"]["robust"][0]["attacks"] == offline["results"]["robust"][0]["attacks"]
    assert served["results"]["clean_accuracy"] == offline["results"]["clean_accuracy"]
    # A bad probe is refused with the server's message, and the command says so.
    bad = cli("probe", "--set", "model=clf", *server_sets(server), "--set", "probe.steps=999")
    assert bad.returncode == 1 and "cap of 30" in bad.stderr


def test_monitor_metrics_alert_and_readiness(server, tmp_path):
    after_rate_limit(server, "clf")
    cfg = MonitorConfig(workdir=server.cfg.workdir, models=("clf",), port=0, floor=0.99, interval_s=1,
                        probe=ProbeParams(**SMALL), history=str(tmp_path / "monitor.jsonl"))
    mon = Monitor(cfg)
    port = mon.serve_http()
    try:
        status, _ = get(f"http://127.0.0.1:{port}/ready")
        assert status == 503  # no probe yet
        report = mon.probe_model("clf")
        assert report["status"] == "ok", report
        worst = report["results"]["robust"][0]["worst_case"]
        assert worst < 0.99  # a standard-trained model is far from robust
        status, body = get(f"http://127.0.0.1:{port}/ready")
        assert status == 503 and "below the floor" in json.loads(body)["models"]["clf"]["why"]
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}
        assert values[("robustserve_monitor_robust_accuracy_ratio",
                       (("attack", "worst"), ("eps", "0.05"), ("model", "clf")))] == pytest.approx(worst)
        assert values[("robustserve_monitor_alert", (("model", "clf"),))] == 1.0
        assert values[("robustserve_monitor_slo_ok", (("model", "clf"),))] == 0.0
        assert values[("robustserve_monitor_robust_accuracy_floor_ratio", (("model", "clf"),))] == 0.99
        assert values[("robustserve_monitor_probes_total", (("model", "clf"), ("status", "ok")))] == 1.0
        assert values[("robustserve_monitor_ready", ())] == 0.0
        # An immediate second probe is refused by the server's rate limit: counted, the figures stay.
        mon.probe_model("clf")
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        assert 'robustserve_monitor_probes_total{model="clf",status="refused"} 1.0' in text.decode()
        # A floor the model meets: the next successful probe clears the alert and the model is ready.
        mon.cfg = cfg.model_copy(update={"floor": 0.0})
        after_rate_limit(server, "clf")
        assert mon.probe_model("clf")["status"] == "ok"
        status, body = get(f"http://127.0.0.1:{port}/ready")
        assert status == 200 and json.loads(body)["ready"] is True
        lines = (tmp_path / "monitor.jsonl").read_text().splitlines()
        assert len(lines) == 3
    finally:
        mon.close()


def test_monitor_command_runs_its_rounds(server, tmp_path):
    after_rate_limit(server, "clf")
    sets = [f"probe.{k}={json.dumps(v)}" for k, v in SMALL.items()]
    r = cli("monitor", *server_sets(server), "--set", "models=[clf]", "--set", "port=0", "--set", "rounds=1",
            "--set", "floor=0.0", "--set", f"history={tmp_path / 'h.jsonl'}",
            *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "round 1: clf: ok" in r.stdout
    refused = cli("monitor", *server_sets(server), "--set", "host=0.0.0.0")
    assert refused.returncode == 2 and "loopback" in refused.stderr


def test_gate_promotes_an_equal_candidate_and_refuses_a_worse_one(server, tmp_path):
    good = server.store / "clf.mar"
    worse = export_small(write_untrained_checkpoint(tmp_path / "u" / "model.pt", "smallcnn", seed=5),
                         tmp_path / "u" / "export", probe_points=64)
    sets = [f"probe.{k}={json.dumps(v)}" for k, v in SMALL.items()]
    args = [a for s in sets for a in ("--set", s)]
    same = cli("gate", "--set", f"baseline={good}", "--set", f"candidate={server.exports['clf']}", *args,
               "--set", f"out={tmp_path / 'same.json'}")
    assert same.returncode == 0, same.stdout + same.stderr[-2000:]
    assert "PROMOTE" in same.stdout
    decision = json.loads((tmp_path / "same.json").read_text())
    assert all(c["drop"] == 0 for c in decision["checks"])
    refused = cli("gate", "--set", f"baseline={good}", "--set", f"candidate={worse}", *args,
                  "--set", "max_drop=0.02", "--set", f"out={tmp_path / 'worse.json'}")
    assert refused.returncode == 1, refused.stdout + refused.stderr[-2000:]
    assert "REFUSE" in refused.stdout and "FAIL" in refused.stdout
    decision = json.loads((tmp_path / "worse.json").read_text())
    # Both measured on the baseline's probe set with the same attack and seed.
    assert decision["baseline"]["probe_set_sha256"] == decision["candidate"]["probe_set_sha256"]
    assert decision["checks"][0]["drop"] > 0.02


def test_monitor_waits_for_a_server_that_does_not_answer_then_probes_it(server, tmp_path):
    """Started before the server (an empty work folder), the monitor keeps looking instead of exiting, with /ready
    at 503 saying why; once the folder holds the server's config and keys, it finds the server over HTTP and
    probes it."""
    after_rate_limit(server, "clf")
    work = tmp_path / "w"
    work.mkdir()
    sets = [f"probe.{k}={json.dumps(v)}" for k, v in SMALL.items()]
    err_log = tmp_path / "monitor.err"
    with err_log.open("w") as err_file:  # a file, not a pipe: stdout is read to its end before stderr
        proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "monitor", "--set", f"workdir={work}",
                                 "--set", "models=[clf]", "--set", "port=0", "--set", "rounds=1", "--set",
                                 "retry_s=0.2", "--set", "floor=0.0", *[a for s in sets for a in ("--set", s)]],
                                stdout=subprocess.PIPE, stderr=err_file, text=True)
    try:
        first = proc.stdout.readline()
        port = int(first.split("http://127.0.0.1:", 1)[1].split("/", 1)[0])
        time.sleep(1.5)  # several looks at an empty folder
        assert proc.poll() is None, err_log.read_text()[-2000:]
        status, body = get(f"http://127.0.0.1:{port}/ready")
        assert status == 503 and "no TorchServe answers" in json.loads(body)["server"]
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        assert "robustserve_monitor_server_up 0.0" in text.decode()
        for name in ("config.properties", "key_file.json", "probe_key.json"):
            (work / name).write_bytes((server.inst.work / name).read_bytes())
        proc.wait(timeout=240)
        # The rest through the reader that gave the first line: readline() may have buffered the lines printed
        # right after it, which communicate() (reading the pipe itself) would never see.
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err_log.read_text()[-2000:]
    assert "waiting for the server" in out and "round 1: clf: ok" in out


def test_monitor_as_a_sidecar_in_its_own_pid_namespace(server, tmp_path):
    """The documented sidecar: the monitor in its own PID namespace, sharing only the work folder and the
    network, finds the server over HTTP and probes it."""
    after_rate_limit(server, "clf")
    sets = [f"probe.{k}={json.dumps(v)}" for k, v in SMALL.items()]
    r = in_own_pid_namespace("monitor", *server_sets(server), "--set", "port=0", "--set", "rounds=1",
                             "--set", "floor=0.0", "--set", f"history={tmp_path / 'h.jsonl'}",
                             "--set", "models=[clf]", *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "round 1: clf: ok" in r.stdout and "waiting for the server" not in r.stdout

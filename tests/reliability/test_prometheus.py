"""A real Prometheus (Debian's prometheus) on loopback scrapes the server and the monitor with the shipped alert
rules loaded; a weak model (untrained: robust accuracy far below the floor) makes the robustness alert go off,
read back from Prometheus's alerts API. Skipped only where the prometheus binary is not installed."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import free_ports
from tests.reliability.conftest import REPO, child_env, python_m, running, serve_config, write_config

RULES = REPO / "deploy" / "monitoring" / "prometheus-rules.yaml"
ALERT = "RobustAccuracyBelowFloor"

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="prometheus is not installed (Debian package prometheus; scripts/setup.sh "
                                       "installs it where it can)")


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_weak_model_fires_the_shipped_alert(rel_store, tmp_path):
    cfg = serve_config(rel_store, tmp_path / "serve")
    # The shipped rules as they are, and a copy whose only change is `for: 0s`, so the test need not wait the
    # shipped 10 minutes to see the same expression fire.
    shipped = yaml.safe_load(RULES.read_text())
    quick = {"groups": [{**g, "name": g["name"] + "-now", "rules": [{**r, "for": "0s"} for r in g["rules"]]}
                        for g in shipped["groups"]]}
    (tmp_path / "quick-rules.yaml").write_text(yaml.safe_dump(quick))
    with running(cfg) as srv:
        mon_yaml = write_config(tmp_path / "monitor.yaml", {
            "workdir": cfg.workdir, "interval_s": 5, "port": 0, "floor": 0.5,
            "probe": {"attacks": ["fgsm"], "n": 16, "steps": 1}, "wait_s": 60})
        mon = subprocess.Popen(python_m("serving.cli", "monitor", "--config", str(mon_yaml)), cwd=REPO,
                               env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        prom = None
        try:
            mon_port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", mon.stdout.readline()).group(1))
            (prom_port,) = free_ports(1)
            conf = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES), str(tmp_path / "quick-rules.yaml")],
                    "scrape_configs": [
                        {"job_name": "robustserve-monitor", "static_configs": [{"targets": [f"127.0.0.1:{mon_port}"]}]},
                        {"job_name": "torchserve",
                         "static_configs": [{"targets": [f"127.0.0.1:{cfg.ports.metrics}"]}]}]}
            (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(conf))
            prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                     f"--web.listen-address=127.0.0.1:{prom_port}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            api = f"http://127.0.0.1:{prom_port}/api/v1"
            deadline = time.monotonic() + 150
            firing, pending, targets = [], [], {}
            while time.monotonic() < deadline:
                try:
                    alerts = _get(f"{api}/alerts")["data"]["alerts"]
                    targets = {t["labels"]["job"]: t["health"] for t in _get(f"{api}/targets")["data"]["activeTargets"]}
                except OSError:
                    time.sleep(1)
                    continue
                firing = [a for a in alerts if a["labels"]["alertname"] == ALERT and a["state"] == "firing"]
                pending = [a for a in alerts if a["labels"]["alertname"] == ALERT and a["state"] == "pending"]
                if firing and pending:
                    break
                time.sleep(1)
            assert targets == {"robustserve-monitor": "up", "torchserve": "up"}, targets
            assert firing and firing[0]["labels"]["model"] == "clf", alerts
            assert float(firing[0]["value"]) < 0.5
            # The shipped rule itself is active on the same series, waiting out its `for`.
            assert pending and pending[0]["labels"]["model"] == "clf"
            # Prometheus also scraped the server's own probe metrics.
            q = _get(f"{api}/query?query=robustserve_probe_runs_total")["data"]["result"]
            assert q, "no robustserve_probe_runs_total from TorchServe"
        finally:
            for p in (prom, mon):
                if p is not None:
                    p.terminate()
                    p.wait(30)

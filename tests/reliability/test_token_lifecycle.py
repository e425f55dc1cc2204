"""Keys expire (here after 1 minute); every call the project makes to its own server keeps working past that:
status, probe, the monitor and the container's health command, 2+ minutes after the start."""
import json
import re
import subprocess
import time
import urllib.request

from serving.tokens import read_key_file
from tests.reliability.conftest import REPO, child_env, cli, python_m, running, serve_config, write_config

EXPIRY_MIN = 1


def test_everything_works_past_the_key_expiry(rel_store, tmp_path):
    cfg = serve_config(rel_store, tmp_path / "serve", token_expiration_min=EXPIRY_MIN)
    server_yaml = write_config(tmp_path / "serve.yaml", cfg.model_dump(mode="json"))
    probe = {"attacks": ["fgsm"], "n": 8, "steps": 1}
    mon_yaml = write_config(tmp_path / "monitor.yaml", {
        "workdir": cfg.workdir, "interval_s": 15, "port": 0, "floor": 0.0, "probe": probe,
        "wait_s": 60})
    with running(cfg) as srv:
        t0 = time.time()
        first = read_key_file(srv.inst.key_file)
        mon = subprocess.Popen(python_m("serving.cli", "monitor", "--config", str(mon_yaml)), cwd=REPO,
                               env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", mon.stdout.readline()).group(1))
            time.sleep(max(0.0, t0 + 2 * 60 * EXPIRY_MIN + 5 - time.time()))
            late = time.time()
            st = cli("serving.cli", "status", "--config", str(server_yaml))
            assert st.returncode == 0, st.stdout + st.stderr
            probe_yaml = write_config(tmp_path / "probe.yaml", {"workdir": cfg.workdir,
                                                                "model": "clf", "probe": probe, "wait_s": 60})
            pr = cli("serving.cli", "probe", "--config", str(probe_yaml))
            assert pr.returncode == 0, pr.stdout + pr.stderr
            health = cli("serving.cli", "health", "--config", str(server_yaml))  # the Dockerfile HEALTHCHECK
            assert health.returncode == 0, health.stdout + health.stderr
            # The monitor's newest probe, made after the first keys expired, succeeded.
            deadline = time.time() + 60
            while True:
                doc = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5))
                st_clf = doc["models"].get("clf", {})
                if st_clf.get("last_success", 0) > late or time.time() > deadline:
                    break
                time.sleep(1)
            assert st_clf.get("last_success", 0) > late, doc
        finally:
            mon.terminate()
            mon.wait(30)
        now = read_key_file(srv.inst.key_file)
        # The keys did expire and were renewed through the API key, not somehow kept alive.
        assert now["management"]["key"] != first["management"]["key"]
        assert now["inference"]["key"] != first["inference"]["key"]
        assert now["API"]["key"] == first["API"]["key"]


import subprocess
import sys

import numpy as np
import pytest

from serving.client import Client

from serving.serve import Instance, ServeConfig, _alive, _port_free, healthy
from tests.integration.conftest import free_ports
from tests.unit.serving.builders import encode

pytestmark = pytest.mark.integration


def cli(*args):
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, timeout=240)


def test_serve_status_stop_from_the_command_line(server, tmp_path):
    p = free_ports(5)
    sets = [f"model_store={server.store}", "models=[clf]", f"workdir={tmp_path / 'w'}",
            f"ports.inference={p[0]}", f"ports.management={p[1]}", f"ports.metrics={p[2]}",
            f"ports.grpc_inference={p[3]}", f"ports.grpc_management={p[4]}"]
    args = [a for s in sets for a in ("--set", s)]
    cfg = ServeConfig(model_store=str(server.store), models=("clf",), workdir=str(tmp_path / "w"),
                      ports=dict(zip(("inference", "management", "metrics", "grpc_inference", "grpc_management"), p)))
    try:
        r = cli("serve", *args)
        assert r.returncode == 0, r.stderr[-2000:]
        # The user is told where the keys are and how to send them.
        assert str(tmp_path / "w" / "key_file.json") in r.stdout and "Authorization: Bearer" in r.stdout
        again = cli("serve", *args)
        assert again.returncode == 1 and "already runs" in again.stderr
        st = cli("status", *args)
        assert st.returncode == 0 and "clf v1.0: READY" in st.stdout
        assert healthy(cfg)
        inst = Instance(cfg)
        client = Client(inst)
        first = client.predict("clf", encode(np.full((28, 28), 9, np.uint8)))
        second = client.predict("clf", b"not an image")  # an error reply, then the connection is reused
        third = client.predict("clf", encode(np.full((28, 28), 9, np.uint8)))
        client.close()
        assert (first.status, second.status, third.status) == (200, 415, 200)
        assert first.body == third.body
        pids = [inst.pid()]
        assert pids[0] is not None
    finally:
        r = cli("stop", *args)
    assert r.returncode == 0 and "stopped" in r.stdout
    # stop returns only once the server is gone: its pid, its ports and its key file.
    assert _alive(pids) == []
    assert all(_port_free("127.0.0.1", port) for port in p)
    assert not (tmp_path / "w" / "key_file.json").exists()
    st = cli("status", *args)
    assert st.returncode == 3 and "not running" in st.stdout


def test_container_entry_point_serves_in_the_foreground_and_stops_on_sigterm(server, tmp_path):
    import signal
    import time

    p = free_ports(5)
    cfg = ServeConfig(model_store=str(server.store), models=("clf",), workdir=str(tmp_path / "c"),
                      ports=dict(zip(("inference", "management", "metrics", "grpc_inference", "grpc_management"), p)))
    sets = [f"model_store={server.store}", "models=[clf]", f"workdir={tmp_path / 'c'}"] + [
        f"ports.{k}={v}" for k, v in cfg.ports.model_dump().items()]
    proc = subprocess.Popen([sys.executable, "-m", "serving.serve", "run", *[a for s in sets for a in ("--set", s)]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while not healthy(cfg):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "not healthy in time"
            time.sleep(0.5)
        java = Instance(cfg).pid()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        assert _alive([java]) == [] and not healthy(cfg)
        assert subprocess.run([sys.executable, "-m", "serving.serve", "health", *[a for s in sets for a in ("--set", s)]],
                              timeout=60).returncode == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        from serving.serve import stop

        stop(cfg)

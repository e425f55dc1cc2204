import shlex
import subprocess
import sys

import numpy as np
import pytest

from serving.client import Client

from serving.serve import Instance, ServeConfig, _alive, _port_free, healthy
from tests.integration.conftest import free_ports, in_own_pid_namespace
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
        assert str(tmp_path / "w" / "probe_key.json") in r.stdout
        # gRPC is printed where it listens (the folder's config), management on its own host.
        assert f"gRPC:       127.0.0.1:{p[3]} (inference), 127.0.0.1:{p[4]} (management)" in r.stdout
        again = cli("serve", *args)
        assert again.returncode == 1 and "already runs" in again.stderr and len(again.stderr.splitlines()) == 1
        hint = again.stderr.split("stop it first with: ", 1)[1].strip()
        # Only the work folder: the ports are read from the config.properties the server was started with.
        st = cli("status", "--set", f"workdir={tmp_path / 'w'}")
        assert st.returncode == 0 and "clf v1.0: READY" in st.stdout, st.stdout + st.stderr
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
        # The hint printed by the refused second serve works as pasted.
        argv = shlex.split(hint) if "hint" in locals() else ["robustserve", "stop", *args]
        assert argv[:2] == ["robustserve", "stop"]
        r = cli(*argv[1:])
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
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--foreground",
                             *[a for s in sets for a in ("--set", s)]],
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
        gone = cli("health", "--set", f"workdir={tmp_path / 'c'}")
        assert gone.returncode == 1 and "not healthy" in gone.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
        from serving.serve import stop

        stop(cfg)


def test_status_from_another_pid_namespace_finds_the_server_over_http(server):
    probe = in_own_pid_namespace("status", "--set", f"workdir={server.cfg.workdir}")
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert "found over HTTP" in probe.stdout and "clf v1.0: READY" in probe.stdout
    health = in_own_pid_namespace("health", "--set", f"workdir={server.cfg.workdir}")
    assert health.returncode == 0 and "healthy" in health.stdout
    # It cannot stop a server whose process it cannot see, and says so instead of claiming none runs.
    stop = in_own_pid_namespace("stop", "--set", f"workdir={server.cfg.workdir}")
    assert stop.returncode == 1 and "not visible from here" in stop.stderr
    assert healthy(server.cfg)

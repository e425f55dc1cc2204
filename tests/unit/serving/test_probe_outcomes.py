"""Every probe ends in the history as ok, failed, timeout or lost; a full disk is answered clearly and never
leaves the gate's lock held; probe parameters are finite and bounded."""
import json
import os
import subprocess
import sys

import pytest

import serving.runtime.probing.history as history_mod
from serving.runtime.probing.history import ProbeGate
from serving.serve import Instance, ServeConfig, last_probe
from tests.unit.serving.builders import KEY, ask, probe_service


@pytest.mark.parametrize("probe, message", [
    ({"step": float("inf")}, "finite"),
    ({"eps": [0.0314159]}, "multiples of 0.001 or of 1/255"),
    ({"step": 0.9}, "exceeds max_eps"),
])
def test_probe_parameters_are_finite_bounded_and_on_a_grid(classifier_export, tmp_path, probe, message):
    svc = probe_service(classifier_export, tmp_path)
    reply = ask(svc, {"probe": probe})
    assert reply.status == 400 and message in reply.body["error"]["message"], reply.body
    # As raw bytes too: what a client sends, parsed by the handler's own JSON reader.
    body = json.dumps({"probe": probe}).encode()
    replies, _ = svc.decode_all([svc_raw(body)])
    assert replies[0].status == 400


def svc_raw(body):
    from serving.runtime.service import RawRequest

    return RawRequest(body=body, probe_key=KEY)


def test_a_probe_whose_worker_died_is_recorded_as_lost(classifier_export, tmp_path):
    svc = probe_service(classifier_export, tmp_path)
    # Another worker took the gate for a probe and died (a process that exits while holding it).
    code = (f"import sys; sys.path.insert(0, {os.getcwd()!r}); from serving.runtime.probing.history import "
            f"ProbeGate; ProbeGate({str(tmp_path)!r}, {svc.name!r}).acquire('feedfacefeedface', 0.0); "
            f"import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True)
    reply = ask(svc, {"probe": {"action": "status", "id": "feedfacefeedface"}})
    assert reply.status == 200, reply.body
    rep = reply.body["probe"]
    assert rep["status"] == "lost" and "died" in rep["error"]
    # Recorded once, and the model can be probed again.
    ask(svc, {"probe": {"action": "status", "id": "feedfacefeedface"}})
    assert [r["status"] for r in svc.probe_runner.history.reports()] == ["lost"]
    assert ask(svc, {"probe": {"attacks": ["fgsm"], "n": 2}}).status == 202
    svc.probe_runner.wait(60)


def test_full_disk_at_start_is_a_clear_507_and_frees_the_lock(classifier_export, tmp_path, monkeypatch):
    svc = probe_service(classifier_export, tmp_path)
    real = history_mod._write_state

    def full(path, state):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(history_mod, "_write_state", full)
    reply = ask(svc, {"probe": {"attacks": ["fgsm"], "n": 2}})
    assert reply.status == 507 and "No space left" in reply.body["error"]["message"]
    monkeypatch.setattr(history_mod, "_write_state", real)
    fd = ProbeGate(tmp_path, svc.name).acquire("0123456789abcdef", 0.0)  # not wedged
    ProbeGate.release(fd)


def test_full_disk_at_the_end_keeps_the_report_answerable(classifier_export, tmp_path, monkeypatch):
    svc = probe_service(classifier_export, tmp_path)

    def full(report):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(svc.probe_runner.history, "append", full)
    started = ask(svc, {"probe": {"attacks": ["fgsm"], "n": 2}})
    svc.probe_runner.wait(60)
    rep = ask(svc, {"probe": {"action": "status", "id": started.body["probe"]["id"]}}).body["probe"]
    assert rep["status"] == "ok" and "No space left" in rep["history_error"]
    assert svc.probe_runner.gate.running() is None  # the gate was released


def test_status_names_the_last_probe_outcome(classifier_export, tmp_path):
    inst = Instance(ServeConfig(workdir=str(tmp_path)))
    svc = probe_service(classifier_export, inst.probe_dir)
    assert last_probe(inst, svc.name) is None
    started = ask(svc, {"probe": {"attacks": ["fgsm"], "n": 2}})
    svc.probe_runner.wait(60)
    got = last_probe(inst, svc.name)
    assert got["id"] == started.body["probe"]["id"] and got["status"] == "ok"

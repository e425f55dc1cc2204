"""The probe API of a real ModelService (serving.runtime.probing.runner): start, status, keys, limits, timeouts
and failures. Runs on the untrained SmallCNN export of conftest.py; no server is started."""
from __future__ import annotations

import json
import shutil

import pytest

from serving.runtime.probing.history import ProbeGate
from serving.runtime.probing.measure import classifier_probe
from serving.runtime.probing.metrics import report_samples
from serving.runtime.probing.params import ProbeConfig
from serving.runtime.service import RawRequest
from tests.unit.serving.builders import KEY, ask, encode, probe_service, sample_images, without_seconds

RESOLVED = {"task": "classification", "attacks": ["pgd", "fgsm"], "eps": [0.05, 0.2], "steps": 3, "step": None,
            "step_ratio": 0.25, "n": 8, "seed": 5, "batch_size": 128, "norm": "linf"}


def test_probe_start_answers_202_then_status_the_report(finished):
    svc, started, _ = finished
    assert started.status == 202
    body = started.body["probe"]
    pid = body["id"]
    assert body["status"] == "running" and body["model"] == svc.name
    assert body["config"] == RESOLVED
    assert body["poll"] == {"probe": {"action": "status", "id": pid}}
    reply = ask(svc, body["poll"])
    assert reply.status == 200
    rep = reply.body["probe"]
    assert rep["id"] == pid and rep["status"] == "ok" and rep["error"] is None
    assert rep["config"] == RESOLVED and rep["seed"] == 5 and rep["task"] == "classification"
    res = rep["results"]
    assert res["n"] == 8
    assert [row["eps"] for row in res["robust"]] == [0.05, 0.2]
    assert [list(row["attacks"]) for row in res["robust"]] == [["PGD-3", "FGSM"]] * 2
    # What names the measured thing: the model's artifacts, the probe set, the engines.
    arts = svc.manifest.artifacts
    assert rep["artifacts"] == {"torchscript": arts["torchscript"].sha256, "onnx": arts["onnx"].sha256}
    assert rep["probe_set_sha256"] == svc.probes.sha256()
    assert rep["engines"] == {"gradients": "torchscript", "scoring": svc.engine}
    assert rep["duration_s"] >= 0 and rep["started"] <= rep["finished"]
    assert ask(svc, {"probe": {"action": "last"}}).body == {"probe": rep}
    assert svc.probe_runner.gate.running() is None  # the gate is free once the report is written


def test_probe_report_is_reproducible_from_its_config(finished):
    svc, started, _ = finished
    rep = svc.probe_runner.history.find(started.body["probe"]["id"])
    again = classifier_probe(svc.gradient_module(), svc.forward, svc.probes, ProbeConfig(**rep["config"]))
    assert without_seconds(again) == without_seconds(rep["results"])


def test_on_report_gets_the_finished_report(finished):
    svc, started, seen = finished
    assert len(seen) == 1
    assert json.loads(json.dumps(seen[0])) == svc.probe_runner.history.find(started.body["probe"]["id"])


def test_probe_json_may_come_as_bytes_or_text(classifier_export, tmp_path):
    svc = probe_service(classifier_export, tmp_path)
    text = json.dumps({"probe": {"attacks": ["fgsm"], "n": 2}})
    for body in (text.encode(), bytearray(b"  \n" + text.encode()), text):
        reply = ask(svc, body)
        assert reply.status == 202, reply.body
        svc.probe_runner.wait(60)
        rep = ask(svc, json.dumps(reply.body["probe"]["poll"]).encode()).body["probe"]
        assert rep["status"] == "ok" and rep["config"]["attacks"] == ["fgsm"] and rep["config"]["n"] == 2
    assert len(svc.probe_runner.history.reports()) == 3


@pytest.mark.parametrize("key,status,code", [(None, 401, "probe_key_missing"), ("", 401, "probe_key_missing"),
                                             ("x" * 20, 403, "probe_key_wrong"), (KEY + " ", 403, "probe_key_wrong")])
def test_probe_key_checked(classifier_export, tmp_path, key, status, code):
    svc = probe_service(classifier_export, tmp_path)
    reply = ask(svc, {"probe": {}}, key=key)
    assert (reply.status, reply.body["error"]["code"]) == (status, code)
    # The key is checked before the body is read: a stranger learns nothing about the schema or the limits.
    reply = ask(svc, {"probe": {"steps": 10 ** 6, "bogus": 1}}, key=key)
    assert reply.status == status
    assert svc.probe_runner.history.reports() == [] and svc.probe_runner.gate.running() is None


def test_probes_refused_when_not_enabled(classifier_export, tmp_path):
    svc = probe_service(classifier_export, tmp_path, enable=False)
    reply = ask(svc, {"probe": {}})
    assert (reply.status, reply.body["error"]["code"]) == (403, "probes_disabled")
    svc = probe_service(classifier_export, tmp_path, key=None)  # no probe key issued
    reply = ask(svc, {"probe": {}})
    assert (reply.status, reply.body["error"]["code"]) == (403, "probes_disabled")
    assert "no probe key" in reply.body["error"]["message"]
    svc = probe_service(classifier_export, tmp_path, enabled=False)  # switched off in model-config.yaml
    reply = ask(svc, {"probe": {}})
    assert (reply.status, reply.body["error"]["code"]) == (403, "probes_disabled")
    assert "model-config.yaml" in reply.body["error"]["message"]


@pytest.mark.parametrize("body,message", [
    ({"probe": {}, "image": "aGVsbG8="}, "unexpected key(s) ['image']"),
    ({"probe": "start"}, "'probe' must be a JSON object"),
    ({"probe": {"eps": []}}, "probe: eps:"),
    ({"probe": {"colour": 1}}, "probe: colour:"),
    ({"probe": {"action": "status"}}, "needs the probe's 'id'"),
    ({"probe": {"action": "status", "id": "xyz"}}, "probe: id:"),
    ({"probe": {"n": 17}}, "n 17 exceeds the 16 images"),
])
def test_bad_probe_requests_answer_400(classifier_export, tmp_path, body, message):
    svc = probe_service(classifier_export, tmp_path)
    reply = ask(svc, body)
    assert reply.status == 400 and message in reply.body["error"]["message"], reply.body
    assert svc.probe_runner.history.reports() == []


def test_probe_beside_inference_in_one_batch(classifier_export, tmp_path):
    svc = probe_service(classifier_export, tmp_path)
    x, _ = sample_images(2)
    raws = [RawRequest(encode(x[0])), RawRequest({"probe": {"action": "last"}}, probe_key=KEY),
            RawRequest({"probe": {}}, probe_key="wrong" * 4), RawRequest(encode(x[1]))]
    replies = svc.complete(*svc.decode_all(raws))
    assert [r.status for r in replies] == [200, 404, 403, 200]
    assert replies[1].body["error"]["code"] == "not_found"  # nothing has run yet
    assert [len(r.body["predictions"]) for r in (replies[0], replies[3])] == [5, 5]


def test_unknown_probe_id_is_404_and_another_workers_probe_is_202(classifier_export, tmp_path):
    svc = probe_service(classifier_export, tmp_path)
    reply = ask(svc, {"probe": {"action": "status", "id": "0123456789abcdef"}})
    assert (reply.status, reply.body["error"]["code"]) == (404, "not_found")
    fd = ProbeGate(tmp_path, svc.name).acquire("fedcba9876543210", 0.0)  # another worker's probe is running
    try:
        reply = ask(svc, {"probe": {"action": "status", "id": "fedcba9876543210"}})
        assert reply.status == 202
        assert reply.body["probe"]["status"] == "running" and reply.body["probe"]["running_s"] >= 0
        reply = ask(svc, {"probe": {}})
        assert (reply.status, reply.body["error"]["code"]) == (409, "probe_running")
        assert "fedcba9876543210" in reply.body["error"]["message"]
    finally:
        ProbeGate.release(fd)
    assert ask(svc, {"probe": {"attacks": ["fgsm"], "n": 2}}).status == 202
    svc.probe_runner.wait(60)


def test_probe_starts_are_rate_limited(classifier_export, tmp_path):
    svc = probe_service(classifier_export, tmp_path, min_interval_s=60.0)
    assert ask(svc, {"probe": {"attacks": ["fgsm"], "n": 2}}).status == 202
    svc.probe_runner.wait(60)
    reply = ask(svc, {"probe": {"attacks": ["fgsm"], "n": 2}})
    assert (reply.status, reply.body["error"]["code"]) == (429, "rate_limited")
    assert "retry in" in reply.body["error"]["message"]
    assert len(svc.probe_runner.history.reports()) == 1  # a refused start leaves no report


def test_probe_past_its_timeout_reports_timeout(classifier_export, tmp_path):
    seen: list[dict] = []
    svc = probe_service(classifier_export, tmp_path, timeout_s=1e-6, on_report=seen.append)
    started = ask(svc, {"probe": {"n": 4}})
    assert started.status == 202 and started.body["probe"]["timeout_s"] == 1e-6
    svc.probe_runner.wait(60)
    pid = started.body["probe"]["id"]
    rep = ask(svc, {"probe": {"action": "status", "id": pid}}).body["probe"]
    assert rep["status"] == "timeout" and rep["results"] is None and "stopped after" in rep["error"]
    assert rep["config"]["n"] == 4  # a timed-out report still says what was asked for
    assert svc.probe_runner.history.find(pid) == rep
    assert [r["status"] for r in seen] == ["timeout"]
    assert svc.probe_runner.gate.running() is None


def test_failed_probe_is_reported_not_fatal(classifier_export, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(classifier_export, root)
    seen: list[dict] = []
    svc = probe_service(root, tmp_path / "state", on_report=seen.append)
    with open(root / "model.torchscript.pt", "ab") as f:  # the gradient twin changed after the server loaded
        f.write(b"\0")
    started = ask(svc, {"probe": {"n": 4}})
    svc.probe_runner.wait(60)
    rep = ask(svc, {"probe": {"action": "status", "id": started.body["probe"]["id"]}}).body["probe"]
    assert rep["status"] == "failed" and rep["results"] is None
    assert rep["error"].startswith("ArtifactError:") and "SHA-256" in rep["error"]
    assert [r["status"] for r in seen] == ["failed"]
    assert svc.probe_runner.gate.running() is None
    x, _ = sample_images(1)
    assert svc.handle([RawRequest(encode(x[0]))])[0].status == 200  # the worker still serves
    assert list(report_samples(rep)) == [("runs_total", {"status": "failed"}, 1.0)]

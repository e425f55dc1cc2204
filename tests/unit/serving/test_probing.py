"""On-demand robustness probes: request limits, the report history and the gate, the runner behind a real
ModelService, the measurement, the metric samples, the start-up self-check, and the TorchServe adapter's part.

Everything runs on the untrained SmallCNN / C2F2 exports of conftest.py and their real Fashion-MNIST probe images;
no server is started.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from handlers.base import PROBE_DIR_ENV, PROBE_KEY_ENV
from handlers.classification import ClassificationHandler
from serving.runtime.artifacts import load_manifest
from serving.runtime.errors import ArtifactError, InvalidInput
from serving.runtime.evaluation.classification import cascade, predict
from serving.runtime.probe_set import ProbeSet, clean_score, self_check_margin
from serving.runtime.probing.history import Busy, ProbeGate, ProbeHistory, RateLimited
from serving.runtime.probing.measure import attack_specs, classifier_probe, retrieval_probe
from serving.runtime.probing.metrics import (PROBE_METRICS, SERVER_PREFIX, config_id, probe_samples,
                                              report_samples)
from serving.runtime.probing.params import ProbeConfig, ProbeRequest, ProbeSettings, classifier_attacks, resolve
from serving.runtime.probing.runner import key_digest
from serving.runtime.schemas import ServiceSettings
from serving.runtime.service import RawRequest, load_service
from serving.runtime.session import open_session
from tests.unit.serving.builders import MockContext, MockMetrics, archive_small, encode, sample_images, unpack

KEY = "k" * 20
REPO = Path(__file__).resolve().parents[3]


# --- helpers -------------------------------------------------------------------------------------------------------


def probe_service(root, state_dir, key=KEY, on_report=None, enable=True, **limits):
    """A served classifier with probe limits ``limits`` (no rate limit unless asked for) and probes enabled."""
    svc = load_service(root, ServiceSettings(probe=ProbeSettings(**{"min_interval_s": 0.0, **limits})))
    if enable:
        svc.enable_probes(state_dir, key_digest(key) if key is not None else None, on_report=on_report)
    return svc


def ask(svc, body, key=KEY):
    """One request through the service's decoding path, as a host hands it over; probes never reach the batch."""
    replies, good = svc.decode_all([RawRequest(body=body, probe_key=key)])
    assert good == []
    return replies[0]


def without_seconds(results: dict) -> dict:
    """Results minus the wall-clock timings (the only part of a measurement that may differ between runs)."""
    out = json.loads(json.dumps(results))
    for row in out["robust"]:
        row.pop("seconds")
    return out


def relabeled(probes: ProbeSet, served: np.ndarray) -> ProbeSet:
    """The probe images labelled with the model's own predictions: an untrained model is then 100 % clean, so the
    attacks have points to break and the cascade's figures are not trivially 0."""
    return ProbeSet(probes.x, served.argmax(1).astype(np.int64), probes.expected, probes.ids)


def history_line(report: dict) -> bytes:
    body = json.dumps(report, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps({"report": report, "sha256": hashlib.sha256(body).hexdigest()}).encode() + b"\n"


# --- 1. request limits -------------------------------------------------------------------------------------------


def test_resolve_classifier_defaults():
    cfg = resolve(ProbeRequest(), "classification", None, (28, 28), 16, ProbeSettings())
    assert cfg.attacks == ("pgd", "cw", "apgd-ce")
    # The registry's probe flag: every registered attack but APGD-DLR (offline only).
    assert classifier_attacks() == ("apgd-ce", "apgd-t", "cw", "fgsm", "pgd")
    assert cfg.eps == (0.1,)
    assert (cfg.steps, cfg.step, cfg.n, cfg.seed, cfg.batch_size) == (20, None, 16, 0, 128)
    # The threat model's eps is the default when the archive has one.
    assert resolve(ProbeRequest(), "classification", 0.03, (28, 28), 16, ProbeSettings()).eps == (0.03,)
    # A server whose caps are below the defaults still answers a bare request: the defaults are capped, not refused.
    capped = resolve(ProbeRequest(), "classification", None, (28, 28), 600, ProbeSettings(max_steps=5, max_n=8))
    assert (capped.steps, capped.n) == (5, 8)
    # eps values are sorted and de-duplicated before they are counted.
    many = resolve(ProbeRequest(eps=[0.2, 0.1, 0.2, 0.1, 0.2]), "classification", None, (28, 28), 16,
                   ProbeSettings(max_eps_values=2))
    assert many.eps == (0.1, 0.2)


def test_resolve_embedder_defaults_put_es_first():
    cfg = resolve(ProbeRequest(), "embedding", None, (28, 28), 16, ProbeSettings())
    assert cfg.attacks == ("ES", "QA-", "GTT")
    assert cfg.eps == (77 / 255,) and cfg.steps == 32 and cfg.step == pytest.approx(3 / 255)
    assert resolve(ProbeRequest(), "embedding", None, (64, 64), 16, ProbeSettings()).eps == (8 / 255,)
    assert resolve(ProbeRequest(), "embedding", 0.05, (28, 28), 16, ProbeSettings()).eps == (0.05,)
    # Recall@1 under attack and the embedding shift come from ES, so it is added in front when left out.
    assert resolve(ProbeRequest(attacks=["GTT", "QA+"]), "embedding", None, (28, 28), 16,
                   ProbeSettings()).attacks == ("ES", "GTT", "QA+")
    assert resolve(ProbeRequest(attacks=["GTT", "ES"]), "embedding", None, (28, 28), 16,
                   ProbeSettings()).attacks == ("GTT", "ES")


LIMITS = [
    pytest.param("classification", {"attacks": ["pgd", "deepfool"]}, 16, {},
                 "unknown attack(s) ['deepfool'] for a classification model", id="unknown-attack"),
    pytest.param("classification", {"attacks": ["ES"]}, 16, {},
                 "unknown attack(s) ['ES'] for a classification model", id="retrieval-attack-on-classifier"),
    pytest.param("embedding", {"attacks": ["pgd"]}, 16, {},
                 "unknown attack(s) ['pgd'] for a embedding model", id="classifier-attack-on-embedder"),
    pytest.param("classification", {"attacks": ["cw", "pgd", "cw"]}, 16, {}, "name one attack twice",
                 id="duplicate-attack"),
    pytest.param("classification", {"attacks": ["pgd", "cw", "apgd-ce", "apgd-t", "fgsm"]}, 16, {},
                 "5 attacks asked for; this server allows at most 4", id="too-many-attacks"),
    pytest.param("embedding", {"attacks": ["QA-", "GTT"]}, 16, {"max_attacks": 2},
                 "3 attacks asked for; this server allows at most 2", id="added-ES-counts"),
    pytest.param("classification", {"eps": [0.0]}, 16, {}, "every value must lie in (0, 0.5]", id="eps-zero"),
    pytest.param("classification", {"eps": [-0.1, 0.1]}, 16, {}, "every value must lie in (0, 0.5]",
                 id="eps-negative"),
    pytest.param("classification", {"eps": [0.05, 0.2]}, 16, {"max_eps": 0.1}, "every value must lie in (0, 0.1]",
                 id="eps-over-max"),
    pytest.param("classification", {}, 16, {"max_eps": 0.05}, "every value must lie in (0, 0.05]",
                 id="default-eps-over-max"),
    pytest.param("classification", {"eps": [0.01, 0.02, 0.03, 0.04, 0.05]}, 16, {},
                 "5 eps values asked for; this server allows at most 4", id="too-many-eps"),
    pytest.param("classification", {"steps": 101}, 16, {}, "steps 101 exceeds this server's cap of 100",
                 id="steps-over-cap"),
    pytest.param("classification", {"steps": 11}, 16, {"max_steps": 10}, "steps 11 exceeds this server's cap of 10",
                 id="steps-over-custom-cap"),
    pytest.param("classification", {"n": 9}, 16, {"max_n": 8}, "n 9 exceeds this server's cap of 8 probe images",
                 id="n-over-cap"),
    pytest.param("classification", {"n": 17}, 16, {}, "n 17 exceeds the 16 images of this model's probe set",
                 id="n-over-probe-set"),
    pytest.param("classification", {}, 0, {}, "holds no probe set", id="no-probe-set"),
    pytest.param("embedding", {"n": 1}, 16, {}, "a retrieval probe needs at least 2 images", id="embedder-n-1"),
    pytest.param("embedding", {}, 1, {}, "a retrieval probe needs at least 2 images", id="embedder-one-probe"),
]


@pytest.mark.parametrize("task,request_,available,limits,message", LIMITS)
def test_resolve_refuses_what_breaks_a_limit(task, request_, available, limits, message):
    with pytest.raises(InvalidInput) as e:
        resolve(ProbeRequest(**request_), task, None, (28, 28), available, ProbeSettings(**limits))
    assert message in e.value.message
    assert e.value.status == 400


# --- 2. history ----------------------------------------------------------------------------------------------------


def _report(i: int) -> dict:
    # Attack columns deliberately out of alphabetical order: a report keeps its own key order.
    return {"id": f"{i:016x}", "status": "ok", "results": {"attacks": {"PGD-20": 0.5 / i, "CW-20": 0.25 / i}},
            "duration_s": 1.5 * i}


def test_history_round_trip_keeps_reports_and_their_key_order(tmp_path):
    h = ProbeHistory(tmp_path / "m" / "history.jsonl")
    assert h.reports() == [] and h.last() is None and h.find("0" * 16) is None  # no file yet
    reports = [_report(i) for i in (1, 2, 3)]
    for r in reports:
        h.append(r)
    assert h.reports() == reports
    assert list(h.reports()[0]["results"]["attacks"]) == ["PGD-20", "CW-20"]
    assert ProbeHistory(h.path).reports() == reports  # another reader (another worker) sees the same


def test_history_survives_a_torn_last_line(tmp_path):
    h = ProbeHistory(tmp_path / "history.jsonl")
    r1, r2, r3 = _report(1), _report(2), _report(3)
    h.append(r1)
    h.append(r2)
    torn = history_line(_report(99))
    with open(h.path, "ab") as f:  # a worker killed in the middle of its write
        f.write(torn[: len(torn) // 2])
    assert h.reports() == [r1, r2]
    h.append(r3)
    assert h.reports() == [r1, r2, r3]
    # The fragment is sealed on a line of its own, so it did not swallow the next report.
    lines = h.path.read_bytes().split(b"\n")
    assert lines[2] == torn[: len(torn) // 2] and lines[-1] == b""


def test_history_torn_first_write(tmp_path):
    h = ProbeHistory(tmp_path / "history.jsonl")
    h.path.write_bytes(b'{"report": {"id": "ab')  # the very first write was cut short
    h.append(_report(1))
    assert h.reports() == [_report(1)]


def test_history_skips_altered_and_foreign_lines(tmp_path):
    h = ProbeHistory(tmp_path / "history.jsonl")
    r1, r2 = _report(1), _report(2)
    h.append(r1)
    good = json.loads(history_line(_report(5)))
    altered = {"report": {**good["report"], "status": "failed"}, "sha256": good["sha256"]}
    with open(h.path, "ab") as f:
        f.write(json.dumps(altered).encode() + b"\n")  # parses, but the report is not the one that was hashed
        f.write(b"\n[1, 2]\nnot json\n" + json.dumps({"report": 1, "sha256": "x"}).encode() + b"\n")
        f.write(json.dumps({"sha256": good["sha256"]}).encode() + b"\n")
    h.append(r2)
    assert h.reports() == [r1, r2]
    # The hash is over the canonical (key-sorted) form: the same report with its keys in another order verifies.
    reordered = {"sha256": good["sha256"], "report": dict(reversed(list(good["report"].items())))}
    with open(h.path, "ab") as f:
        f.write(json.dumps(reordered).encode() + b"\n")
    assert h.reports() == [r1, r2, _report(5)]


def test_history_refuses_a_report_it_could_not_read_back(tmp_path):
    h = ProbeHistory(tmp_path / "history.jsonl")
    h.append(_report(1))
    with pytest.raises(ValueError):  # NaN is not JSON; it is refused before anything is written
        h.append({"id": "nan", "value": float("nan")})
    assert h.reports() == [_report(1)]
    assert h.path.read_bytes().endswith(b"\n")


def test_history_find_and_last(tmp_path):
    h = ProbeHistory(tmp_path / "history.jsonl")
    a, b = _report(1), _report(2)
    h.append(a)
    h.append(b)
    assert h.find(a["id"]) == a and h.find(b["id"]) == b
    assert h.find("f" * 16) is None
    assert h.last() == b
    newer = {**a, "status": "timeout"}
    h.append(newer)
    assert h.find(a["id"]) == newer and h.last() == newer  # the newest record of an id wins


# --- 3. gate -------------------------------------------------------------------------------------------------------


def test_gate_lets_one_probe_run(tmp_path):
    gate, other = ProbeGate(tmp_path, "m"), ProbeGate(tmp_path, "m")  # other: a second worker of the same model
    assert gate.running() is None
    fd = gate.acquire("a" * 16, 0.0)
    try:
        with pytest.raises(Busy) as e:
            gate.acquire("b" * 16, 0.0)
        assert e.value.running["id"] == "a" * 16
        # flock locks an open file: a second gate opens its own, as another process would, and is refused too.
        with pytest.raises(Busy) as e:
            other.acquire("c" * 16, 0.0)
        assert e.value.running["id"] == "a" * 16
        assert gate.running()["id"] == "a" * 16 and other.running()["id"] == "a" * 16
        assert gate.running()["pid"] > 0 and gate.running()["started_unix"] > 0
        fd2 = ProbeGate(tmp_path, "another-model").acquire("d" * 16, 0.0)  # models do not block each other
        ProbeGate.release(fd2)
    finally:
        ProbeGate.release(fd)
    assert gate.running() is None and other.running() is None
    ProbeGate.release(other.acquire("e" * 16, 0.0))


def test_gate_is_held_across_processes_and_freed_when_the_holder_dies(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, sys.argv[1]);"
         "from serving.runtime.probing.history import ProbeGate;"
         "ProbeGate(sys.argv[2], 'm').acquire('c' * 16, 0.0); print('held', flush=True); sys.stdin.read()",
         str(REPO), str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        gate = ProbeGate(tmp_path, "m")
        with pytest.raises(Busy) as e:
            gate.acquire("a" * 16, 0.0)
        assert e.value.running["id"] == "c" * 16 and e.value.running["pid"] == child.pid
        assert gate.running()["id"] == "c" * 16
    finally:
        child.kill()  # a worker that dies mid-probe: the kernel drops its lock
        child.wait(10)
    assert gate.running() is None
    ProbeGate.release(gate.acquire("a" * 16, 0.0))


def test_asking_whether_a_probe_runs_never_blocks_a_start(tmp_path):
    """A status poll reads the state only: polling in a tight loop must never make a concurrent start fail."""
    import threading

    gate, poller = ProbeGate(tmp_path, "m"), ProbeGate(tmp_path, "m")
    stop = threading.Event()
    t = threading.Thread(target=lambda: [poller.running() for _ in iter(stop.is_set, True)])
    t.start()
    try:
        for i in range(300):
            ProbeGate.release(gate.acquire(f"{i:016x}", 0.0))
    finally:
        stop.set()
        t.join()


def test_gate_rate_limit(tmp_path):
    gate = ProbeGate(tmp_path, "m")
    ProbeGate.release(gate.acquire("a" * 16, 60.0))  # no earlier start: not limited
    with pytest.raises(RateLimited) as e:
        gate.acquire("b" * 16, 60.0)
    assert e.value.retry_after_s == pytest.approx(60.0, abs=5.0)
    assert "retry after" in str(e.value)
    # A refused start must not keep the lock, nor count as a start.
    assert gate.running() is None and gate.state()["id"] == "a" * 16
    with pytest.raises(RateLimited):
        ProbeGate(tmp_path, "m").acquire("c" * 16, 60.0)  # the limit holds across workers
    ProbeGate.release(gate.acquire("d" * 16, 0.0))
    assert gate.state()["id"] == "d" * 16


def test_gate_rate_limit_counts_from_the_last_start(tmp_path):
    gate = ProbeGate(tmp_path, "m")
    ProbeGate.release(gate.acquire("a" * 16, 10.0, now=1000.0))
    with pytest.raises(RateLimited) as e:
        gate.acquire("b" * 16, 10.0, now=1004.0)
    assert e.value.retry_after_s == pytest.approx(6.0)
    ProbeGate.release(gate.acquire("b" * 16, 10.0, now=1010.5))
    assert gate.state()["started_unix"] == 1010.5


def test_gate_files_stay_in_their_folder(tmp_path):
    gate = ProbeGate(tmp_path / "state", "../evil/name")
    assert gate.lock_path.parent == tmp_path / "state" and gate.state_path.parent == tmp_path / "state"
    ProbeGate.release(gate.acquire("a" * 16, 0.0))
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == sorted([gate.lock_path.name,
                                                                            gate.state_path.name])


# --- 4. runner through a ModelService ------------------------------------------------------------------------------

REQUEST = {"attacks": ["pgd", "fgsm"], "eps": [0.2, 0.05], "steps": 3, "n": 8, "seed": 5}
RESOLVED = {"task": "classification", "attacks": ["pgd", "fgsm"], "eps": [0.05, 0.2], "steps": 3, "step": None,
            "step_ratio": 0.25, "n": 8, "seed": 5, "batch_size": 128, "norm": "linf"}


@pytest.fixture(scope="module")
def finished(classifier_export, tmp_path_factory):
    """One probe run to the end through a served classifier: (service, its 202 reply, on_report's reports)."""
    seen: list[dict] = []
    svc = probe_service(classifier_export, tmp_path_factory.mktemp("probe-state"), on_report=seen.append)
    started = ask(svc, {"probe": REQUEST})
    svc.probe_runner.wait(60)
    return svc, started, seen


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


# --- 5. the measurement --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clf(classifier_export):
    svc = load_service(classifier_export)
    return svc, svc.gradient_module()


CFG = ProbeConfig(task="classification", attacks=("pgd", "cw", "apgd-ce"), eps=(0.1, 0.2), steps=5, n=16, seed=3,
                  batch_size=6)  # 16 points in batches of 6: a short last batch


@pytest.mark.parametrize("labels", ["dataset", "served"])
def test_classifier_probe_is_the_cascade(clf, labels):
    svc, module = clf
    probes = svc.probes if labels == "dataset" else relabeled(svc.probes, svc.forward(svc.probes.images()))
    res = classifier_probe(module, svc.forward, probes, CFG)
    x, y = torch.from_numpy(probes.images()), torch.from_numpy(probes.y)
    n = len(y)
    assert res["n"] == n
    assert res["clean_accuracy"] == float((predict(module, x, 16) == y).float().mean())
    assert res["serving_clean_accuracy"] == float(np.mean(svc.forward(probes.images()).argmax(1) == probes.y))
    for row, eps in zip(res["robust"], CFG.eps, strict=True):
        cum, robust, _ = cascade(module, attack_specs(CFG, eps), x, y, eps, CFG.seed, CFG.batch_size,
                                 progress=False)
        assert row["eps"] == eps
        assert row["attacks"] == cum
        assert row["worst_case"] == int(robust.sum()) / n == list(cum.values())[-1]
        lo, hi = row["worst_case_ci95"]
        assert lo <= row["worst_case"] <= hi
        transfer = list(row["transfer"].values())
        assert list(row["transfer"]) == list(cum)
        # Transfer: the served engine scores the same adversarial examples; a point counts while it is right on
        # clean input and no attack so far has fooled the served model.
        assert all(0.0 <= v <= res["serving_clean_accuracy"] for v in transfer)
        assert transfer == sorted(transfer, reverse=True) and row["transfer_worst_case"] == transfer[-1]
        assert row["seconds"]["total"] >= 0
    if labels == "served":  # the figures are not trivially 0 or 1: the attacks broke some points, not all
        assert res["clean_accuracy"] == 1.0
        assert any(0.0 < v < 1.0 for row in res["robust"] for v in row["attacks"].values())
    assert set(res["flags"]) == {"zero_gradients", "softmax_outputs", "eps_monotone", "any_flag"}
    assert res["flags"]["eps_monotone"]["curve"] == {"0.1": res["robust"][0]["worst_case"],
                                                     "0.2": res["robust"][1]["worst_case"]}


def test_classifier_probe_is_repeatable_and_takes_the_first_n(clf):
    svc, module = clf
    probes = relabeled(svc.probes, svc.forward(svc.probes.images()))
    a = classifier_probe(module, svc.forward, probes, CFG)
    assert without_seconds(classifier_probe(module, svc.forward, probes, CFG)) == without_seconds(a)
    first = ProbeSet(probes.x[:10], probes.y[:10], probes.expected[:10])
    cfg10 = CFG.model_copy(update={"n": 10})
    assert without_seconds(classifier_probe(module, svc.forward, probes, cfg10)) == \
        without_seconds(classifier_probe(module, svc.forward, first, cfg10))


def test_attack_specs():
    cfg = ProbeConfig(task="classification", attacks=("pgd", "fgsm", "cw"), eps=(0.1,), steps=7, n=4, step=0.02)
    specs = attack_specs(cfg, 0.1)
    assert [(s.name, s.steps) for s in specs] == [("pgd", 7), ("fgsm", 1), ("cw", 7)]  # FGSM is one step
    assert all(s.step_ratio == pytest.approx(0.2) for s in specs)  # an absolute step, as a ratio of this eps
    assert attack_specs(cfg.model_copy(update={"step": None}), 0.1)[0].step_ratio == 0.25


def test_classifier_probe_past_its_deadline_before_an_attack_raises(clf):
    svc, module = clf
    with pytest.raises(TimeoutError):
        classifier_probe(module, svc.forward, svc.probes, CFG, deadline=time.monotonic() - 1)


def test_classifier_probe_past_its_deadline_during_its_last_attack_times_out(clf):
    svc, module = clf
    probes = relabeled(svc.probes, svc.forward(svc.probes.images()))
    cfg = CFG.model_copy(update={"attacks": ("pgd",), "eps": (0.2,), "batch_size": 4})
    deadline = time.monotonic() + 2.0
    calls = []

    def slow_serve(x):  # the real serving engine, slow on the attack's first batch (a busy machine)
        calls.append(len(x))
        if len(calls) > math.ceil(cfg.n / cfg.batch_size):
            time.sleep(max(0.0, deadline - time.monotonic()) + 0.05)
        return svc.forward(x)

    with pytest.raises(TimeoutError):
        classifier_probe(module, slow_serve, probes, cfg, deadline=deadline)


def test_classifier_probe_inside_inference_mode(clf):
    svc, module = clf
    cfg = CFG.model_copy(update={"attacks": ("pgd",), "eps": (0.1,)})
    plain = classifier_probe(module, svc.forward, svc.probes, cfg)
    with torch.inference_mode():
        inside = classifier_probe(module, svc.forward, svc.probes, cfg)
    assert without_seconds(inside) == without_seconds(plain)


def test_retrieval_probe_never_retrieves_the_query_itself(embedder_export):
    """The probe images as their own gallery, under their own ids: clean Recall@1 must be the leave-one-out
    score (1.0 if an image could retrieve itself)."""
    m = load_manifest(embedder_export)
    serve = open_session(embedder_export, m, engine="onnx").run
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        module = torch.jit.load(str(embedder_export / m.artifacts["torchscript"].file)).eval()
    probes = ProbeSet.load(embedder_export / "probes.npz")
    emb = serve(probes.images())
    gallery = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cfg = resolve(ProbeRequest(attacks=["ES"], steps=3), "embedding", None, (28, 28), len(probes), ProbeSettings())
    res = retrieval_probe(module, serve, probes, cfg, gallery, probes.y, list(probes.ids))
    assert res["n"] == res["gallery"] == res["self_matches_excluded"] == len(probes)
    assert res["recall_at_1"] == pytest.approx(clean_score(emb, probes.y, "embedding"))
    assert res["serving_recall_at_1"] == pytest.approx(clean_score(emb, probes.y, "embedding"))
    (row,) = res["robust"]
    assert row["eps"] == cfg.eps[0] and 0.0 <= row["recall_at_1_attacked"] <= 1.0 and row["embedding_shift"] > 0
    report = {"status": "ok", "task": "embedding", "results": res, "duration_s": 2.0, "started_unix": 10.0}
    samples = {(name, tuple(sorted(labels.items()))): v for name, labels, v in report_samples(report)}
    assert samples[("recall_at_1_ratio", (("condition", "clean"),))] == res["recall_at_1"]
    assert samples[("recall_at_1_ratio", (("condition", "attacked"),))] == row["recall_at_1_attacked"]
    assert samples[("embedding_shift", ())] == row["embedding_shift"]
    assert samples[("ers_lite", ())] == row["ers_lite"]
    assert samples[("last_success_timestamp_seconds", ())] == 12.0


# --- 6. metric samples ---------------------------------------------------------------------------------------------


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


# --- 7. start-up self-check ----------------------------------------------------------------------------------------


def _with_probe_bar(src: Path, dest: Path, min_value: float) -> Path:
    shutil.copytree(src, dest)
    spec = json.loads((dest / "spec.json").read_text())
    spec["probe_check"]["min_value"] = min_value
    (dest / "spec.json").write_text(json.dumps(spec))
    return dest


def test_export_records_the_probe_bar(classifier_export):
    m = load_manifest(classifier_export)
    check = m.probe_check
    probes = ProbeSet.load(classifier_export / "probes.npz")
    assert check.metric == "accuracy" and check.n == len(probes)
    # No evaluation and no trainer figure for an untrained model: the reference is what export measured.
    assert check.measured == clean_score(probes.expected, probes.y, "classification")
    assert check.reference == check.measured and check.reference_source == "measured at export"
    assert check.min_value == round(max(0.0, check.reference - self_check_margin(check.reference, check.n)), 6)


def test_self_check_refuses_a_model_below_its_bar(classifier_export, tmp_path):
    root = _with_probe_bar(classifier_export, tmp_path / "copy", 0.99)  # far above what an untrained model scores
    with pytest.raises(ArtifactError, match="start-up self-check failed") as e:
        load_service(root)
    assert "0.990" in str(e.value)
    svc = load_service(root, ServiceSettings(self_test=False))  # the check is what failed, nothing else
    x, _ = sample_images(1)
    assert svc.handle([RawRequest(encode(x[0]))])[0].status == 200


def test_self_check_bar_is_inclusive(classifier_export, tmp_path):
    # The served score through PNG decoding equals the one recorded at export: a bar set exactly there passes.
    measured = load_manifest(classifier_export).probe_check.measured
    load_service(_with_probe_bar(classifier_export, tmp_path / "at", measured))
    with pytest.raises(ArtifactError, match="start-up self-check failed"):
        load_service(_with_probe_bar(classifier_export, tmp_path / "above", measured + 1e-6))


def test_clean_score_classification():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5], [0.0, 0.0, 9.0]])
    assert clean_score(logits, np.array([0, 1, 2, 2]), "classification") == 0.75
    assert clean_score(logits, np.array([1, 0, 1, 0]), "classification") == 0.0
    assert clean_score(np.zeros((0, 3)), np.zeros(0, np.int64), "classification") == 0.0


def test_clean_score_embeddings_leave_one_out():
    e = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert clean_score(e, np.array([0, 0, 1, 1]), "embedding") == 1.0
    assert clean_score(e, np.array([0, 1, 0, 1]), "embedding") == 0.0
    # Cosine: the length of an embedding does not matter.
    assert clean_score(e * np.array([[100.0], [0.01], [3.0], [1.0]]), np.array([0, 0, 1, 1]), "embedding") == 1.0
    # Two images of different labels: each one's nearest *other* image is of the other label (self would be 1.0).
    assert clean_score(np.eye(2), np.array([0, 1]), "embedding") == 0.0
    # The third point's nearest other is [0.8, 0.2] (label 0), not its own label.
    assert clean_score(np.array([[1.0, 0.0], [0.8, 0.2], [0.6, 0.4]]), np.array([0, 0, 1]), "embedding") == \
        pytest.approx(2 / 3)
    assert clean_score(np.ones((1, 2)), np.array([0]), "embedding") == 0.0


def test_self_check_margin():
    assert self_check_margin(0.9, 100) == pytest.approx(3 * 0.03 + 0.02)
    assert self_check_margin(1.0, 16) == pytest.approx(0.02)
    assert self_check_margin(0.5, 0) == pytest.approx(3 * 0.5 + 0.02)  # no division by zero
    assert self_check_margin(0.5, 400) < self_check_margin(0.5, 100)


# --- 8. the TorchServe adapter ---------------------------------------------------------------------------------------


class RecordingMetrics(MockMetrics):
    def add_metric(self, name, value, unit, idx=None, dimensions=None, metric_type=None):
        self.calls.append(("metric", name, value, unit, [(d.name, d.value) for d in dimensions or []],
                           metric_type))


@pytest.fixture(scope="module")
def model_dir(classifier_export, tmp_path_factory):
    """An unpacked classifier archive, as TorchServe lays it out before calling the handler."""
    root = tmp_path_factory.mktemp("probe-handler")
    return unpack(archive_small(classifier_export, root / "store", "clf"), root / "unpacked")


@pytest.fixture
def handler(model_dir, tmp_path, monkeypatch):
    """A handler started the way `robustserve serve` starts workers: the probe key file and the state folder in the
    environment; no rate limit, so each test may start probes at once."""
    (tmp_path / "probe_key.json").write_text(json.dumps({"key": KEY}))
    monkeypatch.setenv(PROBE_KEY_ENV, str(tmp_path / "probe_key.json"))
    monkeypatch.setenv(PROBE_DIR_ENV, str(tmp_path / "probes"))
    cfg = copy.deepcopy(yaml.safe_load((model_dir / "model-config.yaml").read_text()))
    cfg["handler"]["probe"]["min_interval_s"] = 0.0
    ctx = MockContext(model_dir, "clf", yaml_config=cfg)
    ctx.metrics = RecordingMetrics()
    h = ClassificationHandler()
    h.initialize(ctx)
    h.init_context = ctx
    return h


def test_to_raw_reads_the_probe_key_header(handler):
    raw = handler.to_raw({"body": {"probe": {}}}, {"X-Probe-Key": b"abc"})
    assert (raw.body, raw.params, raw.probe_key) == ({"probe": {}}, {}, "abc")
    assert handler.to_raw({"body": {"probe": {}}}, {"x-probe-key": "abc"}).probe_key == "abc"
    assert handler.to_raw({"body": {"probe": {}}}, {}).probe_key is None
    assert handler.to_raw(b'{"probe": {}}', {"X-PROBE-KEY": bytearray(b"abc")}).probe_key == "abc"


def test_to_raw_rebuilds_a_probe_body_from_separate_keys(handler):
    raw = handler.to_raw({"probe": {"action": "last"}}, {"X-Probe-Key": b"abc"})
    assert (raw.body, raw.params, raw.probe_key) == ({"probe": {"action": "last"}}, {}, "abc")
    # Anything beside "probe" stays in the body, where the service refuses it.
    raw = handler.to_raw({"probe": {}, "image": "aGVsbG8="}, {})
    assert raw.body == {"probe": {}, "image": "aGVsbG8="}
    (reply,), _ = handler.service.decode_all([raw])
    assert reply.status == 400
    # Inference options sent as headers (X-Top-K) are not the probe's: they must not end up in its body.
    raw = handler.to_raw({"probe": {"action": "last"}}, {"X-Probe-Key": b"abc", "X-Top-K": "3"})
    assert (raw.body, raw.params) == ({"probe": {"action": "last"}}, {})


def test_handler_probe_round_trip(handler, model_dir):
    x, _ = sample_images(1)
    ctx = MockContext(model_dir, "clf", headers=[{"X-Probe-Key": KEY.encode()}, {}])
    out = [json.loads(s) for s in handler.handle(
        [{"body": {"probe": {"attacks": ["pgd"], "steps": 2, "n": 4}}}, {"body": encode(x[0])}], ctx)]
    assert ctx.statuses[0] == (202, "Accepted") and ctx.status(1) == 200
    assert ctx.response_headers[0]["content-type"] == "application/json"
    assert len(out[1]["predictions"]) == 5
    pid = out[0]["probe"]["id"]
    handler.service.probe_runner.wait(60)
    ctx = MockContext(model_dir, "clf", headers=[{"x-probe-key": KEY}])
    (rep,) = [json.loads(s) for s in handler.handle([{"probe": {"action": "status", "id": pid}}], ctx)]
    assert ctx.status(0) == 200
    assert rep["probe"]["status"] == "ok" and rep["probe"]["model"] == "clf" and rep["probe"]["version"] == "1.0"
    # The finished probe was published as model metrics through the context the worker was started with.
    published = [c for c in handler.init_context.metrics.calls if c[0] == "metric"]
    names = {c[1] for c in published}
    assert {"robustserve_probe_runs_total", "robustserve_probe_clean_accuracy_ratio",
            "robustserve_probe_robust_accuracy_ratio"} <= names
    runs = [c for c in published if c[1] == "robustserve_probe_runs_total"]
    assert len(runs) == 1
    _, _, value, unit, dims, kind = runs[0]
    assert (value, unit, dims) == (1.0, "count", [("ModelName", "clf"), ("Level", "Model"), ("status", "ok")])
    assert kind.name == "COUNTER"
    worst = [c for c in published if c[1] == "robustserve_probe_robust_accuracy_ratio" and ("attack", "worst") in c[4]]
    from serving.runtime.probing.metrics import CONFIG_LABEL, config_id

    assert [c[4] for c in worst] == [[("ModelName", "clf"), ("Level", "Model"), ("attack", "worst"), ("eps", "0.1"),
                                      (CONFIG_LABEL, config_id(rep["probe"]))]]
    assert worst[0][2] == rep["probe"]["results"]["robust"][0]["worst_case"]


def test_handler_without_a_usable_probe_key_refuses_probes(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(PROBE_DIR_ENV, str(tmp_path / "probes"))
    for key_file in (None, {"key": "short"}):
        if key_file is None:
            monkeypatch.delenv(PROBE_KEY_ENV, raising=False)
        else:
            (tmp_path / "k.json").write_text(json.dumps(key_file))
            monkeypatch.setenv(PROBE_KEY_ENV, str(tmp_path / "k.json"))
        h = ClassificationHandler()
        h.initialize(MockContext(model_dir, "clf"))
        ctx = MockContext(model_dir, "clf", headers=[{"X-Probe-Key": b"short"}])
        (out,) = h.handle([{"body": {"probe": {}}}], ctx)
        assert ctx.status(0) == 403 and json.loads(out)["error"]["code"] == "probes_disabled"

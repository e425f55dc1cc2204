"""Robustness probes inside a real TorchServe: figures equal an offline evaluation of the same model, probe set,
attacks and seed; they reach the metrics endpoint; regular traffic keeps flowing during a probe; limits and bad
probe requests answer 4xx; a model whose preprocessing does not match its training fails its start-up self-check."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from serving.runtime.probe_set import ProbeSet
from serving.runtime.probing.history import ProbeHistory
from serving.runtime.probing.metrics import config_id, probe_samples
from serving.runtime.probing.params import ProbeConfig
from serving.serve import ServeConfig, start, stop
from tests.integration.conftest import free_ports
from tests.unit.serving.builders import archive_small, encode, export_small, sample_images

pytestmark = pytest.mark.integration

CLF_PROBE = {"attacks": ["pgd", "cw", "apgd-ce"], "eps": [0.03, 0.1], "steps": 10, "n": 64, "seed": 7}


def samples(server, name: str) -> dict[tuple, float]:
    """{(sample name, sorted labels without Hostname): value} of the TorchServe metrics endpoint."""
    r = server.request("GET", "/metrics", api="metrics")
    assert r.status == 200
    out = {}
    for fam in text_string_to_metric_families(r.body):
        for s in fam.samples:
            if s.name.startswith(name):
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "Hostname"))
                out[(s.name, labels)] = s.value
    return out


def wait_for_metric(server, name: str, labels: dict, timeout: float = 20.0) -> float:
    want = tuple(sorted(labels.items()))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for (n, lab), v in samples(server, name).items():
            if n == name and set(want) <= set(lab):
                return v
        time.sleep(0.5)
    raise AssertionError(f"{name}{labels} never appeared on the metrics endpoint")


@pytest.fixture(scope="module")
def clf_report(server):
    """One classifier probe, with regular requests sent all the while it runs."""
    x, _ = sample_images(8, seed=11)
    bodies = [encode(x[i]) for i in range(8)]
    statuses, stop_flag = [], threading.Event()

    def traffic():
        i = 0
        while not stop_flag.is_set():
            statuses.append(server.predict("clf", bodies[i % 8]).status)
            i += 1

    t = threading.Thread(target=traffic)
    t.start()
    try:
        report = server.probe_report("clf", CLF_PROBE)
    finally:
        stop_flag.set()
        t.join()
    return report, statuses


def test_classifier_probe_equals_the_offline_evaluation(server, clf_report, trained_classifier):
    from serving.runtime.probing.measure import attack_specs
    from training.checkpoint import load_model
    from training.evaluation.classifier_report import evaluate_classifier

    report, _ = clf_report
    assert report["status"] == "ok", report.get("error")
    probes = ProbeSet.load(server.exports["clf"] / "probes.npz")
    cfg = ProbeConfig.model_validate(report["config"])
    assert (cfg.attacks, cfg.eps, cfg.steps, cfg.n, cfg.seed) == (("pgd", "cw", "apgd-ce"), (0.03, 0.1), 10, 64, 7)
    model, _, _ = load_model(trained_classifier)
    x, y = torch.from_numpy(probes.images()[:cfg.n]), torch.from_numpy(probes.y[:cfg.n])
    res = report["results"]
    for eps, row in zip(cfg.eps, res["robust"]):
        off = evaluate_classifier(model, x, y, attack_specs(cfg, eps), [eps], seed=cfg.seed,
                                  batch_size=cfg.batch_size, sanity=False)
        assert res["clean_accuracy"] == off["clean_accuracy"]
        assert row["attacks"] == off["results"][0]["attacks"]
        assert list(row["attacks"]) == ["PGD-10", "CW-10", "APGD-CE-10"]  # cascade order, kept through the history
        assert row["worst_case"] == off["results"][0]["worst_case"]
        lo, hi = row["worst_case_ci95"]
        assert lo <= row["worst_case"] <= hi
        # The served ONNX session sees the TorchScript adversarial examples the same way (parity at export).
        assert abs(row["transfer_worst_case"] - row["worst_case"]) <= 2 / cfg.n
    # A standard-trained model: the attack must hurt it, and more at the larger eps.
    assert res["robust"][0]["worst_case"] < res["clean_accuracy"]
    assert res["robust"][1]["worst_case"] <= res["robust"][0]["worst_case"]
    assert res["flags"]["zero_gradients"]["fraction"] == 0.0 and not res["flags"]["softmax_outputs"]["flag"]
    assert res["flags"]["eps_monotone"]["flag"] is False
    # Reproducibility: hashes of the artifacts and the probe set, versions.
    spec = json.loads((server.exports["clf"] / "spec.json").read_text())
    assert report["artifacts"]["onnx"] == spec["artifacts"]["onnx"]["sha256"]
    assert report["probe_set_sha256"] == probes.sha256()
    assert report["engines"] == {"gradients": "torchscript", "scoring": "onnx"}
    assert {"torch", "onnxruntime", "numpy", "python"} <= set(report["versions"])


def test_regular_requests_keep_succeeding_during_a_probe(clf_report):
    report, statuses = clf_report
    assert len(statuses) >= 5, f"only {len(statuses)} requests went through during a {report['duration_s']} s probe"
    assert set(statuses) == {200}


def test_probe_figures_reach_the_metrics_endpoint(server, clf_report):
    report, _ = clf_report
    this = {"ModelName": "clf", "config": config_id(report)}  # other probes of clf ran with other configs
    row = report["results"]["robust"][0]
    got = wait_for_metric(server, "robustserve_probe_robust_accuracy_ratio", {**this, "attack": "worst", "eps": "0.03"})
    assert got == pytest.approx(row["worst_case"])
    for lbl, v in row["attacks"].items():
        assert wait_for_metric(server, "robustserve_probe_robust_accuracy_ratio",
                               {**this, "attack": lbl, "eps": "0.03"}) == pytest.approx(v)
    assert wait_for_metric(server, "robustserve_probe_transfer_robust_accuracy_ratio",
                           {**this, "attack": "worst", "eps": "0.1"}) == pytest.approx(
        report["results"]["robust"][1]["transfer_worst_case"])
    assert wait_for_metric(server, "robustserve_probe_clean_accuracy_ratio", this) == \
        pytest.approx(report["results"]["clean_accuracy"])
    assert wait_for_metric(server, "robustserve_probe_duration_seconds", this) > 0
    ts = wait_for_metric(server, "robustserve_probe_last_success_timestamp_seconds", this)
    assert abs(ts - time.time()) < 3600
    assert wait_for_metric(server, "robustserve_probe_runs_total", {"ModelName": "clf", "status": "ok"}) >= 1


def test_a_probe_of_another_config_never_mixes_with_earlier_series(server, clf_report):
    """On a real TorchServe scrape: a PGD-only probe at one eps after the three-attack, two-eps probe. TorchServe
    keeps the earlier series, but under their own config; the latest config's series are exactly the latest
    probe's figures, and no masking flag claims a check that was not made."""
    first, _ = clf_report
    second = server.probe_report("clf", {"attacks": ["pgd"], "eps": [0.05], "steps": 3, "n": 32, "seed": 1})
    assert second["status"] == "ok"
    new = config_id(second)
    assert new != config_id(first)
    wait_for_metric(server, "robustserve_probe_last_success_timestamp_seconds", {"ModelName": "clf", "config": new})
    scraped = samples(server, "robustserve_probe_")
    by_config: dict[str, dict] = {}
    for (name, labels), v in scraped.items():
        lab = dict(labels)
        if lab.get("ModelName") == "clf" and "config" in lab:
            key = (name, tuple(sorted((k, x) for k, x in lab.items() if k not in ("ModelName", "Level", "config"))))
            by_config.setdefault(lab["config"], {})[key] = v
    stamps = {c: s[("robustserve_probe_last_success_timestamp_seconds", ())] for c, s in by_config.items()}
    assert max(stamps, key=stamps.get) == new
    want = {}
    for full, kind, _, labels, value in probe_samples(second):
        if kind == "gauge":
            want[(full, tuple(sorted((k, x) for k, x in labels.items() if k != "config")))] = value
    assert by_config[new].keys() == want.keys()
    for key, value in want.items():
        assert by_config[new][key] == pytest.approx(value, rel=1e-5), key
    assert ("robustserve_probe_gradient_masking_flag", (("check", "eps_monotone"),)) not in by_config[new]
    # The earlier probe's figures are still its own, under its config, unchanged by the later probe.
    row = first["results"]["robust"][1]
    assert by_config[config_id(first)][("robustserve_probe_robust_accuracy_ratio",
                                         (("attack", "worst"), ("eps", "0.1")))] == pytest.approx(row["worst_case"])


def test_probe_history_is_kept_on_disk(server, clf_report):
    report, _ = clf_report
    hist = ProbeHistory(server.inst.probe_dir / "clf" / "history.jsonl")
    assert hist.find(report["id"]) == report
    r = server.probe("clf", {"action": "last"})
    assert r.status == 200 and r.body["probe"]["id"] == hist.last()["id"]


def test_retrieval_probe_against_the_gallery(server):
    from serving.runtime.evaluation.retrieval import attack_queries, RankProfile
    from serving.runtime.index import RetrievalIndex
    from serving.runtime.session import TorchScriptSession

    report = server.probe_report("ret", {"attacks": ["ES", "GTT"], "steps": 5, "n": 32, "seed": 1})
    assert report["status"] == "ok", report.get("error")
    res = report["results"]
    probes = ProbeSet.load(server.exports["ret"] / "probes.npz")
    index = RetrievalIndex.load(server.gallery_dir("ret"))
    g = index.vectors()
    pos = {gid: i for i, gid in enumerate(index.ids)}
    self_idx = np.array([pos[i] for i in probes.ids[:32]])
    assert res["self_matches_excluded"] == 32 and res["gallery"] == 10000
    # Clean Recall@1 by brute force with the offline TorchScript twin, each query's own item left out.
    twin = TorchScriptSession(server.exports["ret"] / "model.torchscript.pt")
    e = twin.run(probes.images()[:32])
    sims = e @ g.T
    sims[np.arange(32), self_idx] = -np.inf
    assert res["recall_at_1"] == pytest.approx(np.mean(index.labels[sims.argmax(1)] == probes.y[:32]))
    # Under attack: the same ranking attacks run offline on the twin, same seed.
    cfg = ProbeConfig.model_validate(report["config"])
    row = res["robust"][0]
    off = attack_queries(twin.module, torch.from_numpy(probes.images()[:32]), torch.from_numpy(probes.y[:32]),
                         torch.from_numpy(self_idx), torch.from_numpy(g), torch.from_numpy(index.labels),
                         RankProfile(name="x", eps=cfg.eps[0], step=cfg.step, steps=cfg.steps), cfg.attacks,
                         cfg.seed, cfg.batch_size)
    assert row["raw"] == pytest.approx(off["raw"])
    assert row["ers_lite"] == pytest.approx(off["ERS_lite"])
    assert row["terms_se"] == pytest.approx(off["terms_se"]) and set(row["terms_se"]) == {"ES:D", "ES:R", "GTT"}
    assert row["recall_at_1_attacked"] == pytest.approx(off["raw"]["ES:R"] / 100)
    assert 0 < row["embedding_shift"] <= 2
    assert wait_for_metric(server, "robustserve_probe_ers_lite", {"ModelName": "ret"}) == pytest.approx(
        row["ers_lite"])
    assert wait_for_metric(server, "robustserve_probe_recall_at_1_ratio",
                           {"ModelName": "ret", "condition": "attacked"}) == pytest.approx(row["recall_at_1_attacked"])


def test_probe_limits_and_bad_requests_answer_4xx(server):
    def err(r, status, code=None, text=None):
        assert r.status == status, (r.status, r.body)
        assert isinstance(r.body, dict) and "message" in r.body["error"]
        if code:
            assert r.body["error"]["code"] == code
        if text:
            assert text in r.body["error"]["message"], r.body["error"]["message"]

    err(server.probe("clf", {"n": 8}, key=None), 401, "probe_key_missing")
    err(server.probe("clf", {"n": 8}, key="not-the-probe-key-at-all"), 403, "probe_key_wrong")
    # The inference token is needed as well: TorchServe refuses before the handler sees anything.
    r = server.probe("clf", {"n": 8}, token=False)
    assert r.status in (400, 401) and "Token" in str(r.body)
    err(server.probe("clf", {"attacks": ["deepfool"]}), 400, "invalid_input", "unknown attack")
    err(server.probe("clf", {"n": 65}), 400, "invalid_input", "cap of 64")
    err(server.probe("clf", {"steps": 31}), 400, "invalid_input", "cap of 30")
    err(server.probe("clf", {"eps": [0.0]}), 400, "invalid_input", "eps")
    err(server.probe("clf", {"attacks": ["pgd", "cw", "apgd-ce", "fgsm"]}), 400, "invalid_input", "at most 3")
    err(server.probe("clf", {"stepz": 3}), 400, "invalid_input", "stepz")
    err(server.probe("clf", "pgd"), 400, "invalid_input")
    err(server.probe("clf", {"action": "status", "id": "0123456789abcdef"}), 404, "not_found")
    err(server.request("POST", "/predictions/clf", json.dumps({"probe": {}, "image": "x"}).encode(),
                       {"Content-Type": "application/json", "X-Probe-Key": server.inst.probe_key()}),
        400, "invalid_input", "only 'probe'")
    # One at a time, then rate-limited.
    deadline = time.monotonic() + 60
    while (first := server.probe("clf", {"n": 64, "steps": 30, "attacks": ["apgd-ce"]})).status == 429:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert first.status == 202, first.body
    err(server.probe("clf", {"n": 8}), 409, "probe_running", first.body["probe"]["id"])
    pid = first.body["probe"]["id"]
    while (r := server.probe("clf", {"action": "status", "id": pid})).status == 202:
        time.sleep(0.3)
    assert r.status == 200 and r.body["probe"]["status"] == "ok"
    # The rate limit counts from the last start: a start right after a quick probe falls inside it (after the
    # probe above it might not, on a loaded machine).
    quick = {"n": 2, "steps": 1, "attacks": ["fgsm"]}
    while (r := server.probe("clf", quick)).status == 429:
        assert time.monotonic() < deadline + 60
        time.sleep(0.2)
    assert r.status == 202, r.body
    while server.probe("clf", {"action": "status", "id": r.body["probe"]["id"]}).status == 202:
        time.sleep(0.1)
    err(server.probe("clf", {"n": 8}), 429, "rate_limited", "retry in")
    # ... and the server keeps serving.
    x, _ = sample_images(1, seed=2)
    assert server.predict("clf", encode(x[0])).status == 200


def test_a_model_with_wrong_preprocessing_fails_its_start_up_self_check(tmp_path, trained_classifier):
    """The trained weights with normalisation stats computed on 0..255 pixel values (the classic slip) written into
    the checkpoint after training: parity holds, so it exports, but its probe accuracy falls far below the
    accuracy the trainer recorded, and the server refuses to load it."""
    ckpt = torch.load(trained_classifier, map_location="cpu", weights_only=False)
    keys = [k for k in ckpt["model"] if k.endswith("mean") and ckpt["model"][k].numel() == 1]
    assert keys, list(ckpt["model"])[:5]
    for k in keys:
        ckpt["model"][k.replace("mean", "std")] = ckpt["model"][k.replace("mean", "std")] * 255
        ckpt["model"][k] = ckpt["model"][k] * 255
    bad = tmp_path / "bad" / "model.pt"
    bad.parent.mkdir()
    torch.save(ckpt, bad)
    export = export_small(bad, tmp_path / "export", probe_points=64)
    check = json.loads((export / "spec.json").read_text())["probe_check"]
    assert check["reference_source"] == "the trainer's test accuracy"
    assert check["measured"] < check["min_value"]
    store = tmp_path / "store"
    archive_small(export, store, "badprep")
    p = free_ports(5)
    cfg = ServeConfig(model_store=str(store), workdir=str(tmp_path / "serve"), ready_timeout_s=30,
                      ports=dict(zip(("inference", "management", "metrics", "grpc_inference", "grpc_management"), p)))
    try:
        with pytest.raises(TimeoutError):
            start(cfg)
    finally:
        stop(cfg)
    log = (tmp_path / "serve" / "logs" / "model_log.log").read_text()
    assert "start-up self-check failed: clean accuracy" in log and "below the spec's threshold" in log

"""The measurement of one probe (serving.runtime.probing.measure) on the untrained SmallCNN / C2F2 exports of
conftest.py and their real Fashion-MNIST probe images."""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch

from serving.runtime.artifacts import load_manifest
from serving.runtime.evaluation.classification import cascade, predict
from serving.runtime.probe_set import ProbeSet, clean_score
from serving.runtime.probing.measure import attack_specs, classifier_probe, retrieval_probe
from serving.runtime.probing.metrics import report_samples
from serving.runtime.probing.params import ProbeConfig, ProbeRequest, ProbeSettings, resolve
from serving.runtime.service import load_service
from serving.runtime.session import open_session
from tests.unit.serving.builders import without_seconds


def relabeled(probes: ProbeSet, served: np.ndarray) -> ProbeSet:
    """The probe images labelled with the model's own predictions: an untrained model is then 100 % clean, so the
    attacks have points to break and the cascade's figures are not trivially 0."""
    return ProbeSet(probes.x, served.argmax(1).astype(np.int64), probes.expected, probes.ids)


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

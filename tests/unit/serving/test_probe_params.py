"""Probe requests resolved against a server's limits and the task's defaults (serving.runtime.probing.params)."""
from __future__ import annotations


import pytest

from serving.runtime.errors import InvalidInput
from serving.runtime.probing.params import ProbeRequest, ProbeSettings, classifier_attacks, resolve


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

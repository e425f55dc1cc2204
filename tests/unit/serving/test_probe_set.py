"""The probe set (serving.runtime.probe_set): the bar the export records, the start-up self-check against it,
the clean score and its margin."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from serving.runtime.artifacts import load_manifest
from serving.runtime.errors import ArtifactError
from serving.runtime.probe_set import ProbeSet, clean_score, self_check_margin
from serving.runtime.schemas import ServiceSettings
from serving.runtime.service import RawRequest, load_service
from tests.unit.serving.builders import encode, sample_images


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

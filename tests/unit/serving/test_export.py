import json
import shutil

import numpy as np
import pytest
import torch

import serving.export as export_mod
from serving.export import ExportConfig, ParityError, compare
from serving.runtime.artifacts import load_manifest, sha256_file
from serving.runtime.probe_set import ProbeSet
from serving.runtime.spec import ThreatModel
from tests.unit.serving.builders import export_small


def test_export_folder_and_spec(classifier_export, classifier_checkpoint):
    m = load_manifest(classifier_export)
    files = {p.name for p in classifier_export.iterdir()}
    assert files == {"spec.json", "model.torchscript.pt", "model.onnx", "probes.npz", "labels.json"}
    for art in m.artifacts.values():  # every file but spec.json itself is hashed
        assert sha256_file(classifier_export / art.file) == art.sha256
    assert set(m.artifacts) == {"torchscript", "onnx", "probes", "labels"}
    assert m.model.arch == "smallcnn" and m.model.num_classes == 10 and m.model.method == "untrained"
    assert (m.input.channels, m.input.height, m.input.width, m.input.color) == (1, 28, 28, "grayscale")
    assert m.output == "logits"
    assert m.training_config["model"]["arch"] == "smallcnn"
    assert m.exported["checkpoint_sha256"] == sha256_file(classifier_checkpoint)
    assert m.parity.tolerance == 1e-4 and m.parity.attack["name"] == "pgd"
    for engine in ("torchscript", "onnx"):
        kinds = {c.inputs: c for c in m.parity.checks[engine]}
        assert set(kinds) == {"clean", "adversarial"}
        for c in kinds.values():
            assert c.max_abs_diff <= 1e-4 and c.top1_equal and c.topk_equal and c.batch_sizes == (8, 1)
    assert json.loads((classifier_export / "labels.json").read_text())[0] == "T-shirt/top"
    probes = ProbeSet.load(classifier_export / "probes.npz")
    assert probes.x.shape == (16, 1, 28, 28) and probes.expected.shape == (16, 10)


def test_onnx_is_one_file_with_a_dynamic_batch(classifier_export):
    import onnx

    model = onnx.load(str(classifier_export / "model.onnx"))  # loads with no side file present
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert model.graph.input[0].name == "x" and dim0.dim_param and not dim0.dim_value
    assert model.graph.output[0].name == "logits"


def test_embedder_export(embedder_export):
    m = load_manifest(embedder_export)
    assert m.model.task == "embedding" and m.output == "embedding" and "labels" not in m.artifacts
    assert all(c.max_abs_diff <= 1e-4 for checks in m.parity.checks.values() for c in checks)


def test_parity_failure_writes_nothing_and_keeps_the_old_export(classifier_checkpoint, classifier_export,
                                                                tmp_path, monkeypatch):
    out = tmp_path / "export"
    shutil.copytree(classifier_export, out)
    before = {p.name: sha256_file(p) for p in out.iterdir()}
    class Drifting(export_mod.OnnxSession):
        """The serving session, its outputs shifted past the tolerance."""

        def run(self, x):
            return super().run(x) + np.float32(2e-3)

    monkeypatch.setattr(export_mod, "OnnxSession", Drifting)
    with pytest.raises(ParityError) as e:
        export_small(classifier_checkpoint, out)
    msg = str(e.value)
    assert "onnx on clean inputs: max |difference| 0.002" in msg
    assert "onnx on adversarial inputs" in msg and "torchscript" not in msg
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left behind


def test_failure_with_no_previous_export_leaves_no_folder(classifier_checkpoint, tmp_path, monkeypatch):
    def broken(model, spec, path, opset):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(export_mod, "_write_onnx", broken)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_small(classifier_checkpoint, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_compare_detects_rank_changes_below_the_tolerance():
    ref = np.array([[1.0, 1.00001, 0.0], [0.0, 2.0, 1.0]], np.float32)
    got = ref.copy()
    got[0, 0] += 2e-5  # overtakes class 1 while staying within 1e-4
    diff, top1, topk, k = compare(ref, got, "classification", 2)
    assert diff < 1e-4 and not top1 and topk and k == 2
    got2 = ref.copy()
    got2[1, 0] = 1.5  # class 0 enters the top-2
    assert not compare(ref, got2, "classification", 2)[2]
    assert compare(ref, ref[:1], "classification", 2)[0] == float("inf")


def test_adversarial_parity_inputs_stay_in_the_ball(classifier_checkpoint):
    from training.checkpoint import load_model

    model, spec, _ = load_model(classifier_checkpoint)
    x = torch.rand(4, 1, 28, 28)
    y = torch.arange(4)
    threat = ThreatModel(norm="linf", eps=0.05, step=0.02)
    cfg = ExportConfig(checkpoint=str(classifier_checkpoint), attack_steps=3)
    xa = export_mod._adversarial(model, spec, x, y, threat, cfg)
    d = (xa - x).abs().amax()
    assert 0 < d <= 0.05 + 1e-6 and xa.min() >= 0 and xa.max() <= 1


def test_evaluation_figures_travel_with_the_export(classifier_checkpoint, tmp_path):
    ckpt = tmp_path / "run" / "model.pt"
    ckpt.parent.mkdir()
    shutil.copy2(classifier_checkpoint, ckpt)
    report = {"checkpoint": str(ckpt), "n": 100, "points": "first 100", "clean_accuracy": 0.9,
              "results": [{"eps": 0.1, "worst_case": 0.4, "attacks": {"PGD-20": 0.45}}]}
    (tmp_path / "run" / "evaluation.json").write_text(json.dumps(report))
    m = load_manifest(export_small(ckpt, tmp_path / "run" / "export"))
    assert m.evaluation.clean_accuracy == 0.9 and m.evaluation.robust[0]["worst_case"] == 0.4
    report["checkpoint"] = "somewhere/else.pt"
    (tmp_path / "run" / "evaluation.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="evaluates"):
        export_small(ckpt, tmp_path / "run" / "export2")

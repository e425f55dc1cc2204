"""The served-task registry: the two tasks it holds, a toy task registered here (the README's recipe: one class and
its registration) that spec validation, probe parameters, archiving, service loading and the headline figures
all go through, and the errors for a task nobody registered."""
import json
import shutil

import numpy as np
import pytest
from pydantic import ValidationError

from serving.runtime.errors import InvalidInput
from serving.runtime.probing.params import ProbeConfig, ProbeRequest, ProbeSettings, resolve
from serving.runtime.service import ClassifierService
from serving.runtime.spec import ModelSpec
from serving.runtime.tasks import ServedTask, UnknownTask, base, get_task, register_task, task_names

SPEC = dict(arch="smallcnn", channels=1, input_size=(28, 28), mean=(0.5,), std=(0.5,))


class ToyService(ClassifierService):
    task = "toy-multilabel"


class ToyMultiLabel(ServedTask):
    """Independent sigmoid scores per label: a toy for the registry."""

    name = "toy-multilabel"
    output = "scores"
    clean_metric = "accuracy"
    default_attacks = ("fgsm",)
    required_attacks = ("pgd",)
    default_steps = 5
    default_step = 0.01
    min_probe_n = 3

    def probe_attacks(self):
        return ("fgsm", "pgd")

    def check_spec(self, spec):
        if not spec.num_classes:
            raise ValueError("a multi-label spec needs num_classes (the number of labels)")

    def stage_archive(self, stage, build):
        (stage / "labels.txt").write_text("\n".join(build.manifest.model.class_names or ()))

    def service_class(self):
        return ToyService

    def clean_score(self, outputs, y):
        return float(np.mean(np.asarray(outputs)[np.arange(len(y)), y] > 0))

    def headline(self, results):
        return min(r["label_recall"] for r in results["robust"])

    def gate_checks(self, base, cand, cfg):
        return [(f"label_recall@eps={b['eps']:g}", b["label_recall"], c["label_recall"], cfg.max_drop)
                for b, c in zip(base["robust"], cand["robust"])]

    def summary_lines(self, results):
        return [f"  eps {r['eps']:g}: label recall {100 * r['label_recall']:.1f} %" for r in results["robust"]]

    def metric_samples(self, results):
        yield "clean_accuracy_ratio", {}, results["clean"]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(base, "_TASKS", dict(base._TASKS))  # the registration ends with the test
    register_task(ToyMultiLabel)
    return get_task("toy-multilabel")


def report(task, label_recall, status="ok"):
    return {"task": task, "status": status, "id": "x", "model": "m", "duration_s": 1.0, "started_unix": 0.0,
            "results": {"clean": 0.9, "robust": [{"eps": 0.2, "label_recall": label_recall + 0.1},
                                                 {"eps": 0.1, "label_recall": label_recall}]}}


def test_the_registry_holds_the_served_tasks():
    assert task_names() == ["classification", "embedding"]
    assert get_task("classification").output == "logits" and get_task("embedding").title == "retrieval"
    with pytest.raises(ValueError, match="registered twice"):
        register_task(type(get_task("embedding")))
    with pytest.raises(ValueError, match="needs a name"):
        register_task(type("Nameless", (ServedTask,), {}))


def test_a_new_task_is_one_class_and_one_registration(toy):
    assert "toy-multilabel" in task_names()
    # The spec: validated by the task's own check.
    assert ModelSpec(task="toy-multilabel", num_classes=4, **SPEC).task == "toy-multilabel"
    with pytest.raises(ValidationError, match="multi-label spec needs num_classes"):
        ModelSpec(task="toy-multilabel", **SPEC)
    # Probe parameters: the task's defaults, its allowed attacks, its required attack first, its minimum n.
    cfg = resolve(ProbeRequest(), "toy-multilabel", None, (28, 28), 16, ProbeSettings())
    assert (cfg.attacks, cfg.eps, cfg.steps, cfg.step, cfg.n) == (("pgd", "fgsm"), (0.1,), 5, 0.01, 16)
    with pytest.raises(InvalidInput, match=r"unknown attack\(s\) \['cw'\] for a toy-multilabel model"):
        resolve(ProbeRequest(attacks=["cw"]), "toy-multilabel", None, (28, 28), 16, ProbeSettings())
    with pytest.raises(InvalidInput, match="a toy-multilabel probe needs at least 3 images"):
        resolve(ProbeRequest(n=2), "toy-multilabel", None, (28, 28), 16, ProbeSettings())
    # Headline figures: the monitor's SLO figure, the gate's checks, the printed summary, the metrics.
    from serving.gate import GateConfig, compare
    from serving.monitor import headline
    from serving.probe import summarize
    from serving.runtime.probing.metrics import report_samples

    assert headline(report("toy-multilabel", 0.5)) == 0.5
    assert headline(report("toy-multilabel", 0.5, status="failed")) is None
    decision = compare(report("toy-multilabel", 0.5), report("toy-multilabel", 0.4), GateConfig(max_drop=0.05))
    assert not decision["promote"] and [c["figure"] for c in decision["checks"]] == [
        "label_recall@eps=0.2", "label_recall@eps=0.1"]
    assert "eps 0.1: label recall 50.0 %" in summarize(report("toy-multilabel", 0.5))
    assert ("clean_accuracy_ratio", {}, 0.9) in list(report_samples(report("toy-multilabel", 0.5)))


def test_a_new_task_is_archived_and_served_through_its_object(toy, classifier_export, tmp_path):
    """An export whose spec names the toy task: the archive takes the task's files and the handler that serves
    any task, which answers through the task's service class."""
    from handlers.served import ServedTaskHandler
    from serving.archive import archive_contents
    from serving.runtime.artifacts import MANIFEST_NAME
    from tests.unit.serving.builders import MockContext, archive_small, encode, sample_images, unpack

    src = shutil.copytree(classifier_export, tmp_path / "export")
    doc = json.loads((src / MANIFEST_NAME).read_text())
    doc["model"]["task"] = "toy-multilabel"
    (src / MANIFEST_NAME).write_text(json.dumps(doc))
    mar = archive_small(src, tmp_path / "store", "toy")
    names = set(archive_contents(mar))
    assert {"labels.txt", "served.py"} <= names and not {"index_to_name.json", "classification.py"} & names
    h = ServedTaskHandler()
    h.initialize(MockContext(unpack(mar, tmp_path / "unpacked"), "toy"))
    assert type(h.service) is ToyService and h.service.describe()["task"] == "toy-multilabel"
    x, _ = sample_images(1)
    ctx = MockContext(h.service.root, "toy")
    [answer] = h.handle([{"body": encode(x[0])}], ctx)
    assert ctx.status(0) == 200 and len(json.loads(answer)["predictions"]) == h.service.settings.top_k


def test_unknown_tasks_are_refused_saying_which_exist():
    with pytest.raises(UnknownTask, match=r"unknown task 'detection'; the registered tasks are classification, "
                                          r"embedding"):
        get_task("detection")
    with pytest.raises(ValidationError, match="unknown task 'detection'"):
        ModelSpec(task="detection", num_classes=3, **SPEC)
    with pytest.raises(ValidationError, match="unknown task 'detection'"):
        ProbeConfig(task="detection", attacks=("pgd",), eps=(0.1,), steps=1, n=1)
    with pytest.raises(UnknownTask):
        resolve(ProbeRequest(), "detection", None, (28, 28), 16, ProbeSettings())
    from serving.monitor import headline

    with pytest.raises(UnknownTask):
        headline(report("detection", 0.5))


def test_an_export_of_an_unregistered_task_does_not_load(classifier_export, tmp_path):
    from serving.runtime.artifacts import MANIFEST_NAME
    from serving.runtime.errors import ArtifactError
    from serving.runtime.service import load_service

    src = shutil.copytree(classifier_export, tmp_path / "export")
    doc = json.loads((src / MANIFEST_NAME).read_text())
    doc["model"]["task"] = "detection"
    (src / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="unknown task 'detection'"):
        load_service(src)

import pytest

from tests.unit.serving.builders import PROBE_REQUEST, ask, export_small, probe_service, write_untrained_checkpoint


@pytest.fixture(scope="session")
def serving_root(tmp_path_factory):
    return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="session")
def classifier_checkpoint(serving_root):
    return write_untrained_checkpoint(serving_root / "clf" / "model.pt", "smallcnn")


@pytest.fixture(scope="session")
def embedder_checkpoint(serving_root):
    return write_untrained_checkpoint(serving_root / "emb" / "model.pt", "c2f2")


@pytest.fixture(scope="session")
def classifier_export(classifier_checkpoint, serving_root):
    return export_small(classifier_checkpoint, serving_root / "clf" / "export")


@pytest.fixture(scope="session")
def embedder_export(embedder_checkpoint, serving_root):
    return export_small(embedder_checkpoint, serving_root / "emb" / "export")


@pytest.fixture(scope="session")
def finished(classifier_export, tmp_path_factory):
    """One probe run to the end through a served classifier: (service, its 202 reply, on_report's reports)."""
    seen: list[dict] = []
    svc = probe_service(classifier_export, tmp_path_factory.mktemp("probe-state"), on_report=seen.append)
    started = ask(svc, {"probe": PROBE_REQUEST})
    svc.probe_runner.wait(60)
    return svc, started, seen

import pytest

from tests.unit.serving.builders import export_small, write_untrained_checkpoint


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

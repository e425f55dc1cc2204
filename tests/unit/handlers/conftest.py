import pytest

from tests.unit.serving.builders import archive_small, export_small, unpack, write_untrained_checkpoint


@pytest.fixture(scope="session")
def handler_root(tmp_path_factory):
    return tmp_path_factory.mktemp("handlers")


@pytest.fixture(scope="session")
def classifier_export(handler_root):
    ckpt = write_untrained_checkpoint(handler_root / "clf" / "model.pt", "smallcnn")
    return export_small(ckpt, handler_root / "clf" / "export")


@pytest.fixture(scope="session")
def classifier_model_dir(classifier_export, handler_root):
    """An unpacked classifier archive, as TorchServe lays it out before calling the handler."""
    mar = archive_small(classifier_export, handler_root / "store", "clf", service={"top_k": 3})
    return unpack(mar, handler_root / "unpacked" / "clf")


@pytest.fixture(scope="session")
def retrieval_model_dir(handler_root):
    ckpt = write_untrained_checkpoint(handler_root / "emb" / "model.pt", "c2f2")
    export = export_small(ckpt, handler_root / "emb" / "export")
    mar = archive_small(export, handler_root / "store", "ret", gallery={"subset": 300}, service={"k": 4})
    return unpack(mar, handler_root / "unpacked" / "ret")

import json
import zipfile

import pytest
import yaml

import serving.archive as archive_mod
from serving.archive import ArchiveConfig, archive, archive_contents
from tests.unit.serving.builders import archive_small


def test_classifier_archive_contents(classifier_export, tmp_path):
    mar = archive_small(classifier_export, tmp_path / "store", "clf", batch_size=8, max_batch_delay_ms=20,
                        service={"engine": "torchscript", "top_k": 3})
    assert mar == tmp_path / "store" / "clf.mar"
    names = set(archive_contents(mar))
    for f in ("model.torchscript.pt", "model.onnx", "spec.json", "probes.npz", "labels.json", "index_to_name.json",
              "model-config.yaml", "classification.py", "handlers/base.py", "serving/runtime/service.py",
              "MAR-INF/MANIFEST.json"):
        assert f in names, f
    assert not any(n.startswith("training/") or "__pycache__" in n for n in names)
    with zipfile.ZipFile(mar) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        cfg = yaml.safe_load(z.read("model-config.yaml"))
    assert manifest["model"]["handler"] == "classification.py"
    assert manifest["model"]["configFile"] == "model-config.yaml"
    assert cfg["batchSize"] == 8 and cfg["maxBatchDelay"] == 20
    assert cfg["handler"]["engine"] == "torchscript" and cfg["handler"]["top_k"] == 3
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["clf.mar"]  # no partial file left


def test_retrieval_archive_holds_the_gallery(embedder_export, tmp_path):
    mar = archive_small(embedder_export, tmp_path / "store", "ret", gallery={"subset": 200, "index": "hnsw"})
    names = set(archive_contents(mar))
    assert {"gallery.index", "gallery.json", "retrieval.py", "probes.npz", "model.onnx"} <= names
    with zipfile.ZipFile(mar) as z:
        meta = json.loads(z.read("gallery.json"))
        spec = json.loads(z.read("spec.json"))
    assert meta["size"] == 200 and meta["kind"] == "hnsw" and len(meta["ids"]) == 200
    assert meta["ids"][0].startswith("fashion-mnist/test/")
    assert meta["model_sha256"] == spec["artifacts"]["onnx"]["sha256"]


def test_existing_archive_kept_unless_overwrite(classifier_export, tmp_path):
    store = tmp_path / "store"
    mar = archive_small(classifier_export, store, "clf")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        archive(ArchiveConfig(export_dir=str(classifier_export), model_store=str(store), name="clf"))
    assert mar.is_file()


def test_failed_build_never_replaces_a_good_archive(classifier_export, tmp_path, monkeypatch):
    store = tmp_path / "store"
    mar = archive_small(classifier_export, store, "clf")
    good = mar.read_bytes()

    def failing(*args, **kwargs):
        raise RuntimeError("torch-model-archiver failed (1)")

    monkeypatch.setattr(archive_mod, "_run_archiver", failing)
    with pytest.raises(RuntimeError):
        archive_small(classifier_export, store, "clf")
    assert mar.read_bytes() == good
    assert sorted(p.name for p in store.iterdir()) == ["clf.mar"]


def test_tampered_export_refused(classifier_export, tmp_path):
    import shutil

    src = tmp_path / "export"
    shutil.copytree(classifier_export, src)
    (src / "labels.json").write_text("[]")
    with pytest.raises(Exception, match="SHA-256"):
        archive_small(src, tmp_path / "store", "clf")
    assert not (tmp_path / "store" / "clf.mar").exists()


@pytest.mark.parametrize("name", ["bad name", "../x", "-x", "a/b"])
def test_bad_names(classifier_export, tmp_path, name):
    with pytest.raises(ValueError):
        archive_small(classifier_export, tmp_path / "store", name)

"""Nothing untrusted is trusted: archives are unpacked with limits and checked whole, checkpoints load weights
only, and stop touches only the server of its own work folder."""
import io
import json
import stat
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from serving.archive import ExtractLimits, extract_archive
from serving.runtime.artifacts import ARCHIVE_FILES, verify_archive_files
from serving.runtime.errors import ArtifactError
from serving.runtime.schemas import ServiceSettings
from serving.runtime.service import load_service
from serving.serve import Instance, ServeConfig, stop
from tests.unit.serving.builders import archive_small


@pytest.fixture(scope="module")
def mar(embedder_export, tmp_path_factory):
    return archive_small(embedder_export, tmp_path_factory.mktemp("store"), "ret", gallery={"subset": 50})


def test_every_file_of_an_archive_is_listed_and_checked(mar, tmp_path):
    root = extract_archive(mar, tmp_path / "ok")
    listed = json.loads((root / ARCHIVE_FILES).read_text())
    assert {"model-config.yaml", "retrieval.py", "spec.json", "handlers/base.py"} <= set(listed)
    assert verify_archive_files(root)
    load_service(root, ServiceSettings(self_test=False))  # loads when intact

    gallery = root / "gallery.json"
    assert "gallery.json" in listed and "gallery.index" in listed
    gallery.write_bytes(gallery.read_bytes().replace(b"test", b"tset", 1))
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_service(root, ServiceSettings(self_test=False))

    root2 = extract_archive(mar, tmp_path / "added")
    (root2 / "serving" / "runtime" / "sneaky.py").write_text("import os\n")
    with pytest.raises(ArtifactError, match="not listed"):
        verify_archive_files(root2)


def _zip(entries, symlink=None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries:
            z.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize("entries, symlink, limits, match", [
    ([("../evil.py", "x")], None, ExtractLimits(), "outside"),
    ([("/abs.py", "x")], None, ExtractLimits(), "outside"),
    ([("a/../../evil", "x")], None, ExtractLimits(), "outside"),
    ([("ok.txt", "x")], "link", ExtractLimits(), "link"),
    ([(f"f{i}", "") for i in range(20)], None, ExtractLimits(max_entries=10), "20 entries"),
    ([("big", b"\0" * 10_000)], None, ExtractLimits(max_bytes=5_000), "10000 bytes"),
])
def test_hostile_archives_are_refused_before_writing(tmp_path, entries, symlink, limits, match):
    path = tmp_path / "x.mar"
    path.write_bytes(_zip(entries, symlink))
    dest = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        extract_archive(path, dest, limits)
    assert not (tmp_path / "evil.py").exists() and not (tmp_path / "evil").exists()


def test_a_lying_size_header_cannot_inflate(tmp_path):
    path = tmp_path / "x.mar"
    path.write_bytes(_zip([("a", b"A" * 100_000)]))
    data = bytearray(path.read_bytes())
    # Shrink the declared uncompressed size in the central directory (offset 24 of the entry).
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24:cd + 28] = (10).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises((ValueError, zipfile.BadZipFile)):
        extract_archive(path, tmp_path / "out")
    assert not (tmp_path / "out" / "a").exists() or (tmp_path / "out" / "a").stat().st_size <= 10


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoints_load_weights_only(tmp_path):
    from training.checkpoint import load_checkpoint

    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(2)}, "spec": {"arch": "x"}, "arch_options": {"size": (28, 28)}}, good)
    assert load_checkpoint(good)["arch_options"]["size"] == (28, 28)
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}, "spec": Payload()}, bad)
    with pytest.raises(ValueError, match="weights-only"):
        load_checkpoint(bad)


def test_stop_leaves_another_servers_process_alone(tmp_path):
    # A process that looks like some other TorchServe (another work folder's config), whose pid a stale pid file
    # of this work folder happens to hold.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "org.pytorch.serve.ModelServer",
                              "-f", str(tmp_path / "elsewhere" / "config.properties")])
    try:
        cfg = ServeConfig(workdir=str(tmp_path / "mine"))
        inst = Instance(cfg)
        inst.pid_file.parent.mkdir(parents=True)
        inst.pid_file.write_text(str(other.pid))
        assert inst.pid() is None
        assert stop(cfg) is False
        time.sleep(0.2)
        assert other.poll() is None  # still running
    finally:
        other.kill()
        other.wait()

"""A full disk under the probe state: the probe is refused with a clear error, nothing is left locked, and
probing works again once there is space. The state folder is a small tmpfs (mounting needs root; skipped
otherwise: the same paths are covered with injected write errors in tests/unit/serving/test_probe_outcomes.py)."""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.reliability.conftest import running, serve_config


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _fill(path: Path) -> Path:
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_full_disk_during_probes(rel_store, tmp_path):
    cfg = serve_config(rel_store, tmp_path / "serve")
    probes = Path(cfg.workdir) / "probes"
    probes.mkdir(parents=True)
    if not _mount_tmpfs(probes, "512k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with running(cfg) as srv:
            filler = _fill(probes)
            r = srv.probe("clf", {"attacks": ["fgsm"], "n": 8, "steps": 1})
            assert r.status == 507, r.body
            assert r.body["error"]["code"] == "insufficient_storage" and "space" in r.body["error"]["message"]
            filler.unlink()
            rep = srv.probe_report("clf", {"attacks": ["fgsm"], "n": 8, "steps": 1}, wait_s=120)
            assert rep["status"] == "ok"  # the failed start left no lock behind
    finally:
        subprocess.run(["umount", str(probes)], capture_output=True)

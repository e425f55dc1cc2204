"""The reliability suite: real TorchServe instances, each started by its test with its own work folder, ports
and TMPDIR, polled for readiness and always stopped. One small archive (an untrained SmallCNN: these tests are
about the server staying well, not about accuracy) is built once for the whole folder. Every test bounds its own
time."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from serving.serve import ServeConfig, start, stop
from tests.integration.conftest import Server, free_ports
from tests.unit.serving.builders import archive_small, export_small, write_untrained_checkpoint

REPO = Path(__file__).resolve().parents[2]
PROBE_LIMITS = {"max_n": 32, "max_steps": 5, "max_attacks": 2, "timeout_s": 60, "min_interval_s": 0}


@pytest.fixture(scope="session")
def rel_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    ckpt = write_untrained_checkpoint(root / "ckpt" / "model.pt")
    export = export_small(ckpt, root / "export", probe_points=32)
    store = root / "model_store"
    # Two workers, as a production model runs: one killed worker must not take the model down.
    archive_small(export, store, "clf", batch_size=8, max_batch_delay_ms=20, min_workers=2, max_workers=2,
                  service={"probe": PROBE_LIMITS})
    return store


def serve_config(store: Path, workdir: Path, **overrides: Any) -> ServeConfig:
    ports = free_ports(5)
    return ServeConfig(model_store=str(store), workdir=str(workdir),
                       ports=dict(zip(("inference", "management", "metrics", "grpc_inference", "grpc_management"),
                                      ports)), ready_timeout_s=150, **overrides)


@contextlib.contextmanager
def running(cfg: ServeConfig) -> Iterator[Server]:
    try:
        inst = start(cfg)
        yield Server(inst, Path(cfg.workdir), {}, Path(cfg.model_store))
    finally:
        stop(cfg)


def write_config(path: Path, doc: Any) -> Path:
    path.write_text(yaml.safe_dump(json.loads(json.dumps(doc, default=list))))
    return path


def python_m(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m <args>`` in a fresh process, as an operator (or a container health check) runs it."""
    return subprocess.run(python_m(*args), cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)

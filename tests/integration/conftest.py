"""One real TorchServe for the whole integration folder: a briefly trained SmallCNN classifier (served twice: ONNX
and TorchScript engines) and an untrained C2F2 embedder with a small gallery, on free loopback ports, with its own
work and temp folders, token authorization on; readiness is polled through the management API and the server is
always stopped, also when a test or the start-up fails."""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

from serving.runtime.tasks import get_task
from serving.serve import Instance, ServeConfig, start, stop
from tests.unit.serving.builders import archive_small, export_small, write_untrained_checkpoint

BATCH_DELAY_MS = 50  # generous, so concurrent requests reliably meet in one batch on a loaded 2-core machine
# Small enough that the limits are reachable in a test; min_interval_s short so consecutive probes need little waiting.
PROBE_LIMITS = {"max_n": 64, "max_steps": 30, "max_attacks": 3, "timeout_s": 120, "min_interval_s": 3}


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def in_own_pid_namespace(*args, timeout=300):
    """A robustserve command as a sidecar container runs it: its own PID namespace (the server's processes are
    invisible), the same network and the same work folder."""
    if not _unshare_works():
        pytest.skip("unshare --pid --fork --mount-proc is not permitted here (needs root or user namespaces)")
    return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "serving.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


@dataclass
class Response:
    status: int
    body: Any
    headers: dict[str, str]


class Server:
    def __init__(self, inst: Instance, root: Path, exports: dict[str, Path], store: Path):
        self.inst = inst
        self.cfg = inst.cfg
        self.root = root
        self.exports = exports
        self.store = store

    def request(self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None,
                api: str = "inference", token: bool = True, timeout: float = 60) -> Response:
        port = {"inference": self.cfg.ports.inference, "management": self.cfg.ports.management,
                "metrics": self.cfg.ports.metrics}[api]
        h = dict(headers or {})
        if token and api != "metrics":
            h.update(self.inst.headers(api))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            raw = r.read()
            hdrs = {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        return Response(r.status, parsed, hdrs)

    def predict(self, model: str, png: bytes, headers: Optional[dict] = None, path_suffix: str = "",
                **kw) -> Response:
        return self.request("POST", f"/predictions/{model}{path_suffix}", png,
                            {"Content-Type": "image/png", **(headers or {})}, **kw)

    def post_json(self, path: str, doc: Any, **kw) -> Response:
        return self.request("POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"}, **kw)

    def probe(self, model: str, probe: Any, key: Optional[str] = "server", **kw) -> Response:
        """A probe request; key "server": the server's probe key, None: no key header."""
        h = {"Content-Type": "application/json"}
        if key is not None:
            h["X-Probe-Key"] = self.inst.probe_key() if key == "server" else key
        return self.request("POST", f"/predictions/{model}", json.dumps({"probe": probe}).encode(), h, **kw)

    def probe_report(self, model: str, probe: Any, wait_s: float = 240) -> dict:
        """Starts a probe (retrying while rate-limited) and polls it to its report."""
        import time

        deadline = time.monotonic() + wait_s
        while True:
            r = self.probe(model, probe)
            if r.status != 429 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status == 202, r.body
        pid = r.body["probe"]["id"]
        while time.monotonic() < deadline:
            r = self.probe(model, {"action": "status", "id": pid})
            if r.status == 200:
                return r.body["probe"]
            assert r.status == 202, r.body
            time.sleep(0.3)
        raise TimeoutError(f"probe {pid} of {model} did not finish in {wait_s} s")

    def gallery_dir(self, model: str) -> Path:
        dest = self.root / "unpacked" / model
        if not dest.exists():
            with zipfile.ZipFile(self.store / f"{model}.mar") as z:
                z.extractall(dest)
        return dest


@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory) -> Path:
    """SmallCNN trained with the standard method for a few hundred steps: accurate enough that its answers mean
    something, cheap enough for a test. Its test accuracy is recorded in the checkpoint (the start-up
    self-check's reference)."""
    from training.config import DataConfig, MethodConfig, ModelConfig, TrainConfig
    from training.trainer import train

    out = tmp_path_factory.mktemp("train") / "smallcnn"
    cfg = TrainConfig(data=DataConfig(name="fashion-mnist"), model=ModelConfig(arch="smallcnn"),
                      method=MethodConfig(name="standard"), epochs=1, batch_size=64, max_steps_per_epoch=300,
                      eval_every=1, out_dir=str(out), resume=False, device="cpu")
    return train(cfg) / "model.pt"


@pytest.fixture(scope="session")
def server(tmp_path_factory, trained_classifier):
    root = tmp_path_factory.mktemp("integration")
    store = root / "model_store"
    clf_export = export_small(trained_classifier, root / "exports" / "clf", parity_points=16, probe_points=64)
    emb_ckpt = write_untrained_checkpoint(root / "emb" / "model.pt", "c2f2")
    emb_export = export_small(emb_ckpt, root / "exports" / "ret", probe_points=64)
    batching = dict(batch_size=16, max_batch_delay_ms=BATCH_DELAY_MS)
    archive_small(clf_export, store, "clf", service={"probe": PROBE_LIMITS}, **batching)
    # clf-ts is served by the handler that serves any registered task through its service class
    # (handlers/served.py); the others by their task's own handler.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(get_task("classification")), "handler", "handlers/served.py")
        archive_small(clf_export, store, "clf-ts", service={"engine": "torchscript"}, **batching)
    # The whole test set as gallery, so the probe images are gallery items whose self-matches must be excluded.
    archive_small(emb_export, store, "ret", gallery={"subset": None}, service={"probe": PROBE_LIMITS}, **batching)
    ports = free_ports(5)
    cfg = ServeConfig(model_store=str(store), workdir=str(root / "serve"),
                      ports=dict(zip(("inference", "management", "metrics", "grpc_inference", "grpc_management"),
                                     ports)),
                      ready_timeout_s=150)
    try:
        inst = start(cfg)
        yield Server(inst, root, {"clf": clf_export, "ret": emb_export}, store)
    finally:
        stop(cfg)

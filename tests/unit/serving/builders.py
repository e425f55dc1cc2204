"""Helpers that build what serving tests need: checkpoints, exports, archives, encoded images, a mock TorchServe
context. Imported as ``tests.unit.serving.builders`` (run pytest as ``python -m pytest`` from the repo root)."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def write_untrained_checkpoint(path: Path, arch: str = "smallcnn", seed: int = 0, **options: Any) -> Path:
    """A checkpoint in the trainer's format with random weights (method recorded as 'untrained'): for tests where
    accuracy does not matter."""
    from training.checkpoint import save_atomic
    from training.config import ModelConfig, TrainConfig
    from training.models import build_model, model_task

    opts: dict[str, Any] = {"channels": 1, "input_size": (28, 28), "mean": FMNIST_MEAN, "std": FMNIST_STD}
    if model_task(arch) == "classification":
        opts.update(num_classes=10, class_names=FMNIST_CLASSES)
    else:
        opts.update(embedding_dim=32)
    opts.update(options)
    torch.manual_seed(seed)
    model, spec = build_model(arch, **opts)
    spec = spec.model_copy(update={"method": "untrained"})
    cfg = TrainConfig(model=ModelConfig(arch=arch))
    save_atomic({"model": model.state_dict(), "spec": spec.model_dump(mode="json"), "arch_options": opts,
                 "config": cfg.model_dump(mode="json"), "epoch": 0, "metrics": {}}, path)
    return path


def export_small(checkpoint: Path, out_dir: Path, **overrides: Any) -> Path:
    from serving.export import ExportConfig, export

    kw = dict(checkpoint=str(checkpoint), out_dir=str(out_dir), parity_points=8, probe_points=16, attack_steps=3)
    kw.update(overrides)
    return export(ExportConfig(**kw))


def archive_small(export_dir: Path, store: Path, name: str, **overrides: Any) -> Path:
    from serving.archive import ArchiveConfig, archive

    kw: dict[str, Any] = dict(export_dir=str(export_dir), model_store=str(store), name=name, overwrite=True,
                              gallery={"subset": 300})
    kw.update(overrides)
    return archive(ArchiveConfig(**kw))


def unpack(mar: Path, dest: Path) -> Path:
    """What TorchServe does with an archive before loading it."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(mar) as z:
        z.extractall(dest)
    return dest


def encode(a: np.ndarray, fmt: str = "PNG", **kw: Any) -> bytes:
    """uint8 [H, W] or [H, W, 3] -> PNG/JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt, **kw)
    return buf.getvalue()


def sample_images(n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n Fashion-MNIST test images, uint8 [n, 28, 28], and labels."""
    from training.data import load_dataset

    ds = load_dataset("fashion-mnist", "test")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n]
    return ds.images[idx, 0].numpy(), ds.labels[idx].numpy()


class MockMetrics:
    def __init__(self):
        self.calls: list[tuple[str, str, float]] = []

    def add_counter(self, name, value, idx=None, dimensions=None):
        self.calls.append(("counter", name, value))

    def add_time(self, name, value, idx=None, unit="ms", dimensions=None, metric_type=None):
        self.calls.append(("time", name, value))


class MockContext:
    """The parts of ``ts.context.Context`` a handler uses, recording what the handler sets."""

    def __init__(self, model_dir: Path, model_name: str = "m", yaml_config: Optional[dict] = None,
                 headers: Optional[list[dict]] = None):
        import yaml

        self.model_name = model_name
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": 16}
        cfg_file = Path(model_dir) / "model-config.yaml"
        self.model_yaml_config = yaml_config if yaml_config is not None else (
            yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else {})
        self.manifest = {"model": {"modelName": model_name, "modelVersion": "1.0"}}
        self.metrics = MockMetrics()
        self.headers = headers or []
        self.statuses: dict[int, tuple[int, str]] = {}
        self.response_headers: dict[int, dict[str, str]] = {}

    def get_all_request_header(self, idx: int) -> dict:
        return self.headers[idx] if idx < len(self.headers) else {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0):
        self.statuses[idx] = (code, phrase)

    def set_response_header(self, idx: int, key: str, value: str):
        self.response_headers.setdefault(idx, {})[key] = value

    def set_response_content_type(self, idx: int, value: str):
        self.set_response_header(idx, "content-type", value)

    def status(self, idx: int) -> int:
        return self.statuses.get(idx, (200, ""))[0]


# --- probes --------------------------------------------------------------------------------------------------------

KEY = "k" * 20  # the probe key of the probe tests
PROBE_REQUEST = {"attacks": ["pgd", "fgsm"], "eps": [0.2, 0.05], "steps": 3, "n": 8, "seed": 5}


def probe_service(root, state_dir, key=KEY, on_report=None, enable=True, **limits):
    """A served classifier with probe limits ``limits`` (no rate limit unless asked for) and probes enabled."""
    from serving.runtime.probing.params import ProbeSettings
    from serving.runtime.probing.runner import key_digest
    from serving.runtime.schemas import ServiceSettings
    from serving.runtime.service import load_service

    svc = load_service(root, ServiceSettings(probe=ProbeSettings(**{"min_interval_s": 0.0, **limits})))
    if enable:
        svc.enable_probes(state_dir, key_digest(key) if key is not None else None, on_report=on_report)
    return svc


def ask(svc, body, key=KEY):
    """One request through the service's decoding path, as a host hands it over; probes never reach the batch."""
    from serving.runtime.service import RawRequest

    replies, good = svc.decode_all([RawRequest(body=body, probe_key=key)])
    assert good == []
    return replies[0]


def without_seconds(results: dict) -> dict:
    """Results minus the wall-clock timings (the only part of a measurement that may differ between runs)."""
    out = json.loads(json.dumps(results))
    for row in out["robust"]:
        row.pop("seconds")
    return out

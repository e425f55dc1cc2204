"""``robustserve demo``: the whole pipeline on Fashion-MNIST with small budgets.

Train a robust classifier and a robust embedder, evaluate both under attack, export them (TorchScript + ONNX,
parity-checked), archive them, serve them with TorchServe (loopback, token authorization), send classification
and retrieval requests over HTTP with the token, probe both models' robustness inside the server, print the
answers, the probe reports and a few metrics, and stop the server. Beside its own small models it serves the model
zoo's best classifier and embedder (``zoo_models``), so the same requests show a model worth deploying.
Each model's training method is one config value (``--set classifier.method=trades``,
``--set embedder.method=triplet``).
"""
from __future__ import annotations

import base64
import io
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from serving.runtime.spec import Frozen, ThreatModel
from serving.serve import Ports

log = logging.getLogger(__name__)


class DemoModel(Frozen):
    """One model of the demo: architecture, training method and its budget, evaluation budget."""

    arch: str
    method: str
    method_options: dict[str, Any] = Field(default_factory=dict)
    model_options: dict[str, Any] = Field(default_factory=dict)
    threat: ThreatModel = ThreatModel(norm="linf", eps=0.1, step=0.04)
    attack_steps: int = Field(3, ge=1)  # training attack
    steps: int = Field(700, ge=1)  # optimisation steps (one epoch of at most this many)
    batch_size: int = Field(128, ge=2)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    eval_subset: int = Field(500, ge=1)  # test points attacked by the evaluation

    @model_validator(mode="after")
    def _known(self):
        # Caught by --dry-run, before any data is loaded.
        from training.methods import method_class
        from training.models import model_task

        method_class(self.method)
        model_task(self.arch)
        return self


# Every field has a default per role, so `--set classifier.method=trades` changes that one value only.
class DemoClassifier(DemoModel):
    arch: str = "smallcnn"
    method: str = "pgd-at"


class DemoEmbedder(DemoModel):
    arch: str = "c2f2"
    method: str = "est"
    steps: int = Field(150, ge=1)
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = Field(1e-3, gt=0)
    eval_subset: int = Field(50, ge=1)  # queries attacked by the ranking-attack suite


class DemoConfig(Frozen):
    out_dir: str = "runs/demo"
    classifier: DemoClassifier = DemoClassifier()
    embedder: DemoEmbedder = DemoEmbedder()
    # The classifier's evaluation suite: a short cascade (the full default suite takes longer than the demo).
    classifier_attacks: tuple[dict[str, Any], ...] = (
        {"name": "fgsm", "steps": 1}, {"name": "pgd", "steps": 20}, {"name": "cw", "steps": 20},
        {"name": "apgd-ce", "steps": 25})
    sanity_checks: bool = True
    gallery_index: str = "flat"
    ports: Optional[Ports] = None  # None: free loopback ports, so the demo never collides with a running server
    requests: int = Field(4, ge=1)  # test images sent to each model
    # In-server robustness probes of both served models: probe images and attack steps.
    probe_n: int = Field(256, ge=2)
    probe_steps: int = Field(20, ge=1)
    retrieval_probe_n: int = Field(64, ge=2)
    num_threads: Optional[int] = Field(None, ge=1)
    # Zoo models served beside the demo's own (exported and archived, not retrained or re-evaluated): names, or
    # None for the zoo's best classifier and best embedder; [] for none.
    zoo_models: Optional[tuple[str, ...]] = None
    zoo_dir: str = "zoo"


def _zoo_models(cfg: DemoConfig) -> tuple[str, ...]:
    from serving.zoo.commands import best, entry_dir

    if cfg.zoo_models is not None:
        for name in cfg.zoo_models:
            entry_dir(cfg.zoo_dir, name)  # a clear error for a name the zoo lacks
        return cfg.zoo_models
    found = (best(cfg.zoo_dir, "classification"), best(cfg.zoo_dir, "embedding"))
    return tuple(n for n in found if n)


def _train_config(m: DemoModel, out: Path, num_threads: Optional[int]):
    from training.config import DataConfig, MethodConfig, ModelConfig, OptimConfig, TrainConfig

    return TrainConfig(
        data=DataConfig(name="fashion-mnist"),
        model=ModelConfig(arch=m.arch, options=m.model_options),
        method=MethodConfig(name=m.method, options=m.method_options, attack=m.threat, attack_steps=m.attack_steps),
        optim=OptimConfig(name=m.optimizer, lr=m.lr, schedule="cosine"),
        epochs=1, batch_size=m.batch_size, max_steps_per_epoch=m.steps, eval_every=0,
        out_dir=str(out), resume=False, num_threads=num_threads)


def run_demo(cfg: DemoConfig) -> int:
    from serving.archive import ArchiveConfig, GalleryConfig, archive
    from serving.export import ExportConfig, export
    from serving.serve import ServeConfig, start, stop
    from training.config import AttackSpec, EvaluateConfig
    from training.evaluation.run import evaluate
    from training.trainer import train

    t0 = _T0[0] = time.perf_counter()
    out = Path(cfg.out_dir)
    store = out / "model_store"
    names = {"classifier": "fmnist-classifier", "embedder": "fmnist-retrieval"}
    exports: dict[str, Path] = {}
    for role, m in (("classifier", cfg.classifier), ("embedder", cfg.embedder)):
        _stage(f"{role}: train {m.arch} with {m.method!r} ({m.steps} steps, {m.threat.norm} eps {m.threat.eps:g})")
        run_dir = train(_train_config(m, out / f"{role}-{m.method}", cfg.num_threads))
        ckpt = run_dir / "model.pt"
        _stage(f"{role}: evaluate under attack ({m.eval_subset} test points)")
        if role == "classifier":
            ev = EvaluateConfig(checkpoint=str(ckpt), subset=m.eval_subset, eps=(m.threat.eps,),
                                attacks=tuple(AttackSpec(**a) for a in cfg.classifier_attacks),
                                sanity_checks=cfg.sanity_checks, num_threads=cfg.num_threads)
        else:
            ev = EvaluateConfig(checkpoint=str(ckpt), subset=m.eval_subset, num_threads=cfg.num_threads)
        report = evaluate(ev)
        print(report["table"])
        if report.get("sanity"):
            from serving.runtime.evaluation.classification import flag_summary

            flags = flag_summary(report["sanity"])
            print(f"gradient-masking flags (True = suspicious): {json.dumps(flags)}")
        _stage(f"{role}: export TorchScript + ONNX with parity checks")
        exports[role] = export(ExportConfig(checkpoint=str(ckpt), name=names[role], num_threads=cfg.num_threads))
        _print_parity(exports[role])
        _stage(f"{role}: archive")
        mar = archive(ArchiveConfig(export_dir=str(exports[role]), model_store=str(store), overwrite=True,
                                    gallery=GalleryConfig(index=cfg.gallery_index)))
        print(f"{mar} ({mar.stat().st_size / 1e6:.1f} MB)")

    from serving.zoo.commands import archive_entry, headline, read_card

    zoo = _zoo_models(cfg)
    for name in zoo:
        _stage(f"zoo model {name}: {headline(read_card(Path(cfg.zoo_dir) / name))}; export and archive")
        mar = archive_entry(cfg.zoo_dir, name, out / "zoo" / name / "export", store, cfg.num_threads)
        print(f"{mar} ({mar.stat().st_size / 1e6:.1f} MB)")

    _stage("serve")
    ports = cfg.ports or _free_ports()
    serve_cfg = ServeConfig(model_store=str(store), models=(*names.values(), *zoo), workdir=str(out / "serve"),
                            ports=ports)
    inst = start(serve_cfg)
    try:
        from serving.serve import describe_access

        print(describe_access(inst))
        _talk(inst, names, exports, cfg, zoo)
    finally:
        _stage("stop")
        stop(serve_cfg)
        print("TorchServe stopped")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0


_T0 = [time.perf_counter()]


def _stage(text: str) -> None:
    print(f"\n== [{time.perf_counter() - _T0[0]:5.0f} s] {text}", flush=True)


def _print_parity(export_dir: Path) -> None:
    spec = json.loads((export_dir / "spec.json").read_text())
    figs = ", ".join(f"{eng} {c['inputs']} {c['max_abs_diff']:.1g}" for eng, checks in spec["parity"]["checks"].items()
                     for c in checks)
    print(f"{export_dir}: parity max |diff| {figs} (tolerance {spec['parity']['tolerance']:g})")


def _free_ports() -> Ports:
    import socket

    socks = [socket.socket() for _ in range(5)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        p = [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
    return Ports(inference=p[0], management=p[1], metrics=p[2], grpc_inference=p[3], grpc_management=p[4])


def _png(a) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _talk(inst, names: dict[str, str], exports: dict[str, Path], cfg: DemoConfig, zoo: tuple[str, ...] = ()
          ) -> None:
    import numpy as np
    import torch

    from serving.client import Client
    from training.checkpoint import load_model
    from training.data import load_dataset

    client = Client(inst)
    test = load_dataset("fashion-mnist", "test")
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(123))[:cfg.requests]
    x_u8 = test.images[idx, 0].numpy()
    y = test.labels[idx].numpy()
    classes = test.class_names
    clf = names["classifier"]

    _stage(f"classification requests to /predictions/{clf} (PNG bytes, Authorization: Bearer <inference key>)")
    for img, label in zip(x_u8, y):
        r = client.predict(clf, _png(img), headers={"X-Top-K": "3"})
        top = ", ".join(f"{p['label']} {p['probability']:.2f}" for p in r.body["predictions"])
        print(f"  true {classes[label]:12s} -> HTTP {r.status}: {top}")

    # An attacked image: PGD against the eager model inside the training threat model, sent as a PNG.
    from serving.runtime.attacks import build_attack

    spec_json = json.loads((exports["classifier"] / "spec.json").read_text())
    model, spec, _ = load_model(spec_json["exported"]["checkpoint"])
    threat = cfg.classifier.threat
    attack = build_attack("pgd", model, ThreatModel(norm=threat.norm, eps=threat.eps, step=threat.eps / 4),
                          steps=20, seed=0)
    xa = attack(torch.from_numpy(x_u8[:1, None].astype(np.float32) / 255), torch.from_numpy(y[:1]))
    adv_png = _png((xa[0, 0].numpy() * 255).round().astype(np.uint8))
    r = client.predict(clf, adv_png, headers={"X-Top-K": "1"})
    p = r.body["predictions"][0]
    print(f"  PGD-20 (eps {threat.eps:g}) on the first image, true {classes[y[0]]} -> {p['label']} "
          f"{p['probability']:.2f}")

    b64 = base64.b64encode(_png(x_u8[0])).decode()
    r = client.post_json(f"/predictions/{clf}", {"image": b64, "top_k": 1})
    print(f"  JSON {{\"image\": <base64>}} -> HTTP {r.status}: {r.body['predictions'][0]['label']}")
    v2 = {"id": "demo-1", "inputs": [{"name": "x", "shape": [2, 1, 28, 28], "datatype": "UINT8",
                                      "data": x_u8[:2].ravel().tolist()}], "parameters": {"top_k": 1}}
    r = client.post_json(f"/v2/models/{clf}/infer", v2)
    labels = {o["name"]: o["data"] for o in r.body["outputs"]}.get("top_k_labels")
    print(f"  KServe v2 /v2/models/{clf}/infer (2 images) -> HTTP {r.status}: {labels}")
    r = client.predict(clf, b"\x89PNG\r\n\x1a\nnot an image")
    print(f"  a corrupt PNG -> HTTP {r.status}: {r.body['error']['message'][:80]}")
    anon = Client(inst, token=False)
    r = anon.predict(clf, _png(x_u8[0]))
    print(f"  no token -> HTTP {r.status} (refused)")

    ret = names["embedder"]
    _stage(f"retrieval requests to /predictions/{ret} (gallery: the Fashion-MNIST test set)")
    for img, label, i in zip(x_u8, y, idx.tolist()):
        r = client.predict(ret, _png(img), headers={"X-K": "6"})
        # The query is a test image and the gallery is the test set: it finds itself first, at distance 0.
        own = f"fashion-mnist/test/{i}"
        hits = [n for n in r.body["neighbors"] if n["id"] != own][:5]
        same = sum(n["label"] == label for n in hits)
        print(f"  query {classes[label]:12s} (test image {i}, itself found at distance "
              f"{next((n['distance'] for n in r.body['neighbors'] if n['id'] == own), float('nan')):.3f}) -> "
              f"HTTP {r.status}: {same}/5 other neighbours of its class; nearest "
              + ", ".join(f"{n['id'].rsplit('/', 1)[-1]} {n['label_name']} d={n['distance']:.3f}" for n in hits[:3]))

    for name in zoo:
        _stage(f"zoo model {name}: the same test images")
        for img, label, i in zip(x_u8, y, idx.tolist()):
            r = client.predict(name, _png(img))
            if "predictions" in r.body:
                answer = ", ".join(f"{p['label']} {p['probability']:.2f}" for p in r.body["predictions"][:3])
            else:
                hits = [n for n in r.body.get("neighbors", []) if n["id"] != f"fashion-mnist/test/{i}"][:5]
                answer = f"{sum(n['label'] == label for n in hits)}/{len(hits)} nearest neighbours of its class"
            print(f"  true {classes[label]:12s} -> HTTP {r.status}: {answer}")

    from serving.probe import ProbeParams, probe_served, summarize

    _stage("robustness probes inside the server (the probe key from probe_key.json in X-Probe-Key; they run beside "
           "regular traffic)")
    for model, params in ((clf, ProbeParams(n=cfg.probe_n, steps=cfg.probe_steps)),
                          (ret, ProbeParams(n=cfg.retrieval_probe_n, steps=cfg.probe_steps))):
        print(summarize(probe_served(inst, model, params, wait_s=900)))

    _stage("metrics (Prometheus, metrics port, no token needed)")
    wanted = ("ts_inference_requests_total", "Requests2XX", "Requests4XX", "InferredImages", "InvalidRequests",
              "robustserve_probe_robust_accuracy_ratio", "robustserve_probe_clean_accuracy_ratio", "robustserve_probe_ers_lite",
              "robustserve_probe_recall_at_1_ratio", "robustserve_probe_runs_total")
    deadline = time.monotonic() + 15
    while True:  # the worker reports a probe's metrics as it finishes; the frontend picks them up shortly after
        text = client.metrics()
        if "robustserve_probe_ers_lite" in text or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for line in text.splitlines():
        # Of the robust accuracy series (one per attack and eps), the worst case per point says it all.
        if line.startswith(wanted) and ("robust_accuracy" not in line or 'attack="worst"' in line):
            print(f"  {line}")
    client.close()
    anon.close()

"""Serving throughput and latency of a classifier, in one run:

- served: requests/s and p50/p99 latency of PNG requests over HTTP (keep-alive, token) to a real TorchServe with
  the robustserve classification handler, at concurrency 1 and 32 (one client thread per connection);
- in-process: the same PNGs through the runtime's decoding and ONNX Runtime on one thread, one image at a time,
  and the full service path (decode, ONNX Runtime, softmax/top-k, JSON-ready answer).

Without --export it exports an untrained SmallCNN (throughput does not depend on the weights).

    .venv/bin/python scripts/bench_serving.py [--export runs/demo/classifier-pgd-at/export] [--seconds 10]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("bench_serving")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def untrained_export(work: Path) -> Path:
    import torch

    from serving.export import ExportConfig, export
    from training.checkpoint import save_atomic
    from training.config import TrainConfig
    from training.data import dataset_info
    from training.models import build_model

    info = dataset_info("fashion-mnist")
    opts = {"channels": 1, "input_size": (28, 28), "mean": info.mean, "std": info.std, "num_classes": 10,
            "class_names": info.class_names}
    torch.manual_seed(0)
    model, spec = build_model("smallcnn", **opts)
    ckpt = work / "ckpt" / "model.pt"
    save_atomic({"model": model.state_dict(), "spec": spec.model_copy(update={"method": "untrained"}).model_dump(
        mode="json"), "arch_options": opts, "config": TrainConfig().model_dump(mode="json"), "epoch": 0}, ckpt)
    return export(ExportConfig(checkpoint=str(ckpt), out_dir=str(work / "export"), name="bench",
                               parity_points=8, probe_points=16, attack_steps=2))


def pngs(n: int) -> list[bytes]:
    import io

    from PIL import Image

    from training.data import load_dataset

    ds = load_dataset("fashion-mnist", "test")
    out = []
    for a in ds.images[:n, 0].numpy():
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def summarise(lat_s: list[float], wall_s: float) -> dict:
    lat = sorted(lat_s)
    pct = lambda q: 1000 * lat[min(len(lat) - 1, int(q * len(lat)))]
    return {"requests": len(lat), "seconds": round(wall_s, 2), "per_second": round(len(lat) / wall_s, 1),
            "p50_ms": round(pct(0.50), 2), "p99_ms": round(pct(0.99), 2),
            "mean_ms": round(1000 * statistics.fmean(lat), 2)}


def served(inst, model: str, images: list[bytes], concurrency: int, seconds: float, warmup: int,
           until=None) -> dict:
    """Closed-loop clients, one connection each, for ``seconds`` (or until ``until()`` is true)."""
    from serving.client import Client

    lat: list[list[float]] = [[] for _ in range(concurrency)]
    batch_sizes: list[list[int]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    start_gate = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        c = Client(inst)
        for j in range(warmup):
            c.predict(model, images[(i + j) % len(images)])
        start_gate.wait()
        j = 0
        while (not until()) if until is not None else time.perf_counter() < stop_at[0]:
            t = time.perf_counter()
            r = c.predict(model, images[(i * 7919 + j) % len(images)])
            lat[i].append(time.perf_counter() - t)
            batch_sizes[i].append(int(r.headers.get("x-robustserve-batch", 0)))
            errors[i] += r.status != 200
            j += 1
        c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600
    start_gate.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    flat = [x for part in lat for x in part]
    bs = [x for part in batch_sizes for x in part]
    out = summarise(flat, wall)
    out.update(concurrency=concurrency, errors=sum(errors), mean_batch=round(statistics.fmean(bs), 2))
    return out


def in_process(export_dir: Path, images: list[bytes], seconds: float) -> dict:
    from serving.runtime.preprocess import decode_image
    from serving.runtime.schemas import ServiceSettings
    from serving.runtime.service import ClassifierService, RawRequest

    svc = ClassifierService(export_dir, ServiceSettings(engine="onnx", threads=1, self_test=False))
    limits = dict(max_bytes=svc.settings.max_image_bytes, max_pixels=svc.settings.max_image_pixels)

    def loop(fn) -> dict:
        for b in images[:50]:
            fn(b)
        lat = []
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < seconds:
            t = time.perf_counter()
            fn(images[i % len(images)])
            lat.append(time.perf_counter() - t)
            i += 1
        return summarise(lat, time.perf_counter() - t0)

    decode_run = loop(lambda b: svc.session.run(decode_image(b, svc.spec, **limits)[None]))
    full = loop(lambda b: svc.handle([RawRequest(b)]))
    return {"decode_onnxruntime": decode_run, "service_handle": full, "engine": svc.engine,
            "device": svc.session.device}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", help="classifier export folder (default: an untrained SmallCNN)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per setting")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-batch-delay-ms", type=int, default=5)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from serving.archive import ArchiveConfig, archive
    from serving.serve import ServeConfig, start, stop

    torch.set_num_threads(1)
    images = pngs(args.images)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as work:
        work = Path(work)
        export_dir = Path(args.export) if args.export else untrained_export(work)
        archive(ArchiveConfig(export_dir=str(export_dir), model_store=str(work / "store"), name="bench",
                              batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay_ms))
        p = free_ports(5)
        cfg = ServeConfig(model_store=str(work / "store"), workdir=str(work / "serve"),
                          ports=dict(inference=p[0], management=p[1], metrics=p[2], grpc_inference=p[3],
                                     grpc_management=p[4]))
        results: dict = {"model": str(export_dir), "batch_size": args.batch_size,
                         "max_batch_delay_ms": args.max_batch_delay_ms, "seconds_per_setting": args.seconds,
                         "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s) here, "
                                    f"{__import__('os').cpu_count()} cores"}
        inst = start(cfg)
        try:
            results["served"] = [served(inst, "bench", images, c, args.seconds, warmup=20)
                                 for c in args.concurrency]
        finally:
            stop(cfg)
        results["in_process"] = in_process(export_dir, images, args.seconds)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nserved (TorchServe, batch {args.batch_size}, delay {args.max_batch_delay_ms} ms, 1 worker):")
    print("| concurrency | req/s | p50 ms | p99 ms | mean batch | errors |")
    print("|---|---|---|---|---|---|")
    for r in results["served"]:
        print(f"| {r['concurrency']} | {r['per_second']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} | "
              f"{r['errors']} |")
    ip = results["in_process"]
    print("\nin-process, one thread, one image at a time:")
    print("| path | images/s | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for name in ("decode_onnxruntime", "service_handle"):
        r = ip[name]
        print(f"| {name} | {r['per_second']} | {r['p50_ms']} | {r['p99_ms']} |")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Worst-case decode cost of one maximal request, per request kind, measured side by side in one run.

"Maximal" means the largest request the default budgets accept for the benchmark's model (an untrained SmallCNN,
28 x 28 gray: decoding does not depend on the weights): images at the per-image pixel budget, as many as the
per-request budget allows, random noise (the slowest content to decompress), and a v2 tensor request at
``max_images_per_request``. Each request goes through ``ModelService.decode_all``, the handler's own path, and must
be accepted. For contrast, the same 16-bit PNG at the former default limit (4096 x 4096), which the budgets now
refuse from its header, is decoded with the limit lifted. The figures are held against the archive's response
timeout (30 s by default), where TorchServe kills the worker and with it every request of its batch.

    .venv/bin/python scripts/bench_decode.py [--repeats 5] [--out benchmarks/results/decode_budget.json]

``robustserve bench render --set stems=decode_budget`` renders the result into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESPONSE_TIMEOUT_S = 30.0  # ArchiveConfig.response_timeout_s's default

log = logging.getLogger("bench_decode")


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def budgets(svc) -> tuple[int, int]:
    from serving.runtime.preprocess import pixel_budgets

    return pixel_budgets(svc.spec, svc.settings.max_image_pixels, svc.settings.max_request_pixels)


def requests(svc, rng: np.random.Generator) -> dict[str, tuple[str, Any]]:
    """kind -> (description, body) of the maximal request of each kind."""
    per_image, per_request_pixels = budgets(svc)
    side = int(per_image ** 0.5)
    per_request = per_request_pixels // (side * side)
    c, h, w = svc.spec.channels, *svc.spec.input_size
    n = svc.settings.max_images_per_request
    gray16 = _png(rng.integers(0, 65536, (side, side), dtype=np.uint16))
    kinds = {
        "png8": (f"PNG, 8-bit gray, {side}x{side}", _png(rng.integers(0, 256, (side, side), dtype=np.uint8))),
        "png16": (f"PNG, 16-bit gray, {side}x{side}", gray16),
        "png_rgb": (f"PNG, RGB, {side}x{side}", _png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))),
        "jpeg_rgb": (f"JPEG q95, RGB, {side}x{side}", _jpeg(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))),
        "v2_bytes": (f"v2 BYTES, {per_request} x 16-bit PNG {side}x{side}", json.dumps({"inputs": [{
            "name": "x", "shape": [per_request], "datatype": "BYTES",
            "data": [base64.b64encode(gray16).decode()] * per_request}]}).encode()),
        "v2_tensor": (f"v2 FP32 tensor [{n}, {c}, {h}, {w}] as JSON numbers", json.dumps({"inputs": [{
            "name": "x", "shape": [n, c, h, w], "datatype": "FP32",
            "data": rng.random(n * c * h * w).round(6).tolist()}]}).encode()),
    }
    return kinds


def time_decode(svc, body: Any, repeats: int) -> dict[str, Any]:
    from serving.runtime.service import RawRequest

    times, status = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        replies, good = svc.decode_all([RawRequest(body, content_type="application/octet-stream")])
        times.append(time.perf_counter() - t0)
        status = replies[0].status if replies[0] is not None else 200
    return {"bytes": len(body), "status": status, "median_s": statistics.median(times), "max_s": max(times)}


def bench(export_dir: Path, repeats: int) -> dict[str, Any]:
    from serving.runtime.preprocess import decode_image
    from serving.runtime.schemas import ServiceSettings
    from serving.runtime.service import ClassifierService

    svc = ClassifierService(export_dir, ServiceSettings(self_test=False))
    rng = np.random.default_rng(0)
    rows = {}
    for kind, (what, body) in requests(svc, rng).items():
        rows[kind] = {"request": what, **time_decode(svc, body, repeats)}
        log.info("%s: %s", kind, rows[kind])
    # The former default allowed 4096 x 4096 per image: a constant 16-bit PNG that size is a few tens of KB, far
    # under the byte limit. Decoded with the pixel limit lifted, for contrast.
    old = _png(np.full((4096, 4096), 1000, np.uint16))
    refused = time_decode(svc, old, 1)
    times = []
    for _ in range(max(1, repeats // 2)):
        t0 = time.perf_counter()
        decode_image(old, svc.spec, max_bytes=len(old), max_pixels=4096 * 4096)
        times.append(time.perf_counter() - t0)
    worst = max(rows.values(), key=lambda r: r["max_s"])
    return {
        "suite": "decode-budget",
        "command": "python scripts/bench_decode.py",
        # Other jobs on the machine slow every row alike; the load average says how busy it was.
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_1m": round(os.getloadavg()[0], 2)},
        "model": {"input": [svc.spec.channels, *svc.spec.input_size]},
        "budgets": {"max_image_pixels": budgets(svc)[0], "max_request_pixels": budgets(svc)[1],
                    "max_image_bytes": svc.settings.max_image_bytes,
                    "max_images_per_request": svc.settings.max_images_per_request},
        "repeats": repeats,
        "rows": rows,
        "worst": {"kind": next(k for k, r in rows.items() if r is worst), "max_s": worst["max_s"],
                  "response_timeout_s": RESPONSE_TIMEOUT_S,
                  "fraction_of_timeout": worst["max_s"] / RESPONSE_TIMEOUT_S},
        "former_limit": {"request": "PNG, 16-bit gray, 4096x4096, constant", "bytes": len(old),
                         "status_now": refused["status"], "refused_in_s": refused["max_s"],
                         "decode_s_if_allowed": statistics.median(times)},
    }


def markdown(result: dict) -> str:
    b = result["budgets"]
    lines = [
        f"Model input {result['model']['input']}; default budgets: {b['max_image_pixels']:,} pixels per image, "
        f"{b['max_request_pixels']:,} per request, {b['max_image_bytes']:,} bytes per image, "
        f"{b['max_images_per_request']} images per request. Each maximal request (random noise, the slowest "
        f"content to decompress) went {result['repeats']} times through `ModelService.decode_all`, the handler's "
        f"path; it must be accepted (status 200). Machine: {result['machine']['cpus']} CPUs, 1-minute load "
        f"average {result['machine']['load_average_1m']} while it ran.",
        "",
        "| request | body bytes | status | median s | max s |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"].values():
        lines.append(f"| {r['request']} | {r['bytes']:,} | {r['status']} | {r['median_s']:.3f} | {r['max_s']:.3f} |")
    w, f = result["worst"], result["former_limit"]
    lines += [
        "",
        f"**Worst case: {w['max_s']:.3f} s** ({w['kind']}), {100 * w['fraction_of_timeout']:.2f} % of the "
        f"{w['response_timeout_s']:.0f} s response timeout. A full batch of such requests costs at most the "
        f"batch size times this.",
        f"For contrast, {f['request']} ({f['bytes']:,} bytes), which the former default limit accepted: refused "
        f"now with status {f['status_now']} in {f['refused_in_s'] * 1000:.1f} ms; decoding it would take "
        f"{f['decode_s_if_allowed']:.3f} s (**{f['decode_s_if_allowed'] / w['max_s']:.1f}x** the worst accepted "
        f"request).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--export", help="an export folder (default: an untrained SmallCNN, built in a temp folder)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_budget.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(ROOT))
    from serving.bench.load import untrained_export

    with tempfile.TemporaryDirectory() as tmp:
        export_dir = Path(args.export) if args.export else untrained_export(Path(tmp), "smallcnn")
        result = bench(export_dir, args.repeats)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

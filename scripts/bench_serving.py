"""Serving throughput and latency: robustserve's handlers against the plainest possible handler, side by side in
one TorchServe and one run, with a compiled load generator (``hey``); see :mod:`serving.bench.load`.

Without --export it exports an untrained SmallCNN and an untrained C2F2 embedder (speed does not depend on the
weights). Writes benchmarks/results/serving.json; `robustserve bench render --set stems=serving` regenerates its
BENCHMARKS.md section.

    .venv/bin/python scripts/bench_serving.py [--export runs/demo/classifier-pgd-at/export] [--seconds 6]

``served`` (closed-loop Python client threads) and ``pngs`` stay here for scripts/bench_probe_latency.py.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from pathlib import Path

from serving.bench.load import free_ports  # noqa: F401  (re-exported for bench_probe_latency)


ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("bench_serving")


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


def main() -> int:
    from serving.bench import load, write

    d = load.Settings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", help="classifier export folder (default: an untrained SmallCNN)")
    ap.add_argument("--embedder-export", help="embedder export folder (default: an untrained C2F2)")
    ap.add_argument("--seconds", type=float, default=d.seconds, help="measured seconds per point")
    ap.add_argument("--repeats", type=int, default=d.repeats, help="measurements of every point (medians shown)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(d.concurrency))
    ap.add_argument("--multi-images", type=int, nargs="+", default=list(d.multi_images))
    ap.add_argument("--sized-workers", type=int, default=d.sized_workers,
                    help="workers of a third archive of ours (default: one per core; 0: leave it out)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--max-batch-delay-ms", type=int, default=d.max_batch_delay_ms)
    ap.add_argument("--profile", type=float, default=d.profile_seconds, metavar="SECONDS",
                    help="also sample our worker with py-spy for this long at the highest concurrency")
    ap.add_argument("--out", default=str(ROOT / d.out))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = "scripts/bench_serving.py " + " ".join(sys.argv[1:])
    s = load.Settings(seconds=args.seconds, repeats=args.repeats, concurrency=tuple(args.concurrency),
                      multi_images=tuple(args.multi_images), batch_size=args.batch_size,
                      max_batch_delay_ms=args.max_batch_delay_ms, sized_workers=args.sized_workers,
                      export=args.export,
                      embedder_export=args.embedder_export, profile_seconds=args.profile, out=args.out,
                      command=command.strip())
    result = load.run(s)
    out = write(result, args.out)
    print(load.markdown(result))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

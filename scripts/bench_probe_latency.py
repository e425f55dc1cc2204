"""Regular traffic while a robustness probe runs, in one run: p50/p99 latency and throughput of PNG requests to a
real TorchServe, before a probe, during a probe of the same model (same worker process), and after it; printed
side by side with the during/around ratios (this machine is shared and noisy: compare within a run).

    .venv/bin/python scripts/bench_probe_latency.py [--export runs/demo/classifier-pgd-at/export]
        [--concurrency 1 8] [--seconds 10] [--probe-n 256] [--probe-steps 20]

Without --export it exports an untrained SmallCNN with a 256-image probe set (latency does not depend on the
weights; the probe's cost does not either).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_serving import free_ports, pngs, served  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def untrained_export(work: Path, probe_points: int) -> Path:
    from serving.export import ExportConfig, export
    from tests.unit.serving.builders import write_untrained_checkpoint

    ckpt = write_untrained_checkpoint(work / "ckpt" / "model.pt", "smallcnn")
    return export(ExportConfig(checkpoint=str(ckpt), out_dir=str(work / "export"), name="bench",
                               parity_points=8, probe_points=probe_points, attack_steps=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", help="classifier export folder (default: an untrained SmallCNN)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds of traffic before and after the probe")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--probe-n", type=int, default=256)
    ap.add_argument("--probe-steps", type=int, default=20)
    ap.add_argument("--probe-attacks", nargs="+", default=["pgd", "cw", "apgd-ce"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "probe_latency.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from serving.archive import ArchiveConfig, archive
    from serving.client import Client
    from serving.probe import ProbeParams, poll_served, start_served
    from serving.serve import ServeConfig, start, stop

    torch.set_num_threads(1)
    images = pngs(512)
    params = ProbeParams(attacks=tuple(args.probe_attacks), steps=args.probe_steps, n=args.probe_n)
    results: dict = {"probe": params.request(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-probe-") as work:
        work = Path(work)
        export_dir = Path(args.export) if args.export else untrained_export(work, args.probe_n)
        archive(ArchiveConfig(export_dir=str(export_dir), model_store=str(work / "store"), name="bench",
                              batch_size=16, max_batch_delay_ms=5,
                              service={"probe": {"min_interval_s": 0, "max_n": args.probe_n,
                                                 "max_steps": args.probe_steps, "timeout_s": 3600}}))
        p = free_ports(5)
        cfg = ServeConfig(model_store=str(work / "store"), workdir=str(work / "serve"),
                          ports=dict(inference=p[0], management=p[1], metrics=p[2], grpc_inference=p[3],
                                     grpc_management=p[4]))
        inst = start(cfg)
        try:
            for conc in args.concurrency:
                before = served(inst, "bench", images, conc, args.seconds, warmup=10)
                client = Client(inst)
                probe_id = start_served(client, "bench", params)["id"]
                done = threading.Event()
                report: dict = {}

                def wait_probe() -> None:
                    report.update(poll_served(Client(inst), "bench", probe_id, wait_s=3600, poll_s=0.25))
                    done.set()

                waiter = threading.Thread(target=wait_probe)
                waiter.start()
                during = served(inst, "bench", images, conc, 0, warmup=10, until=done.is_set)
                waiter.join()
                after = served(inst, "bench", images, conc, args.seconds, warmup=10)
                client.close()
                results["runs"].append({"concurrency": conc, "before": before, "during": during, "after": after,
                                        "probe_seconds": report.get("duration_s"),
                                        "probe_status": report.get("status")})
        finally:
            stop(cfg)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nregular requests while a probe runs ({', '.join(args.probe_attacks)} x {args.probe_steps} steps on "
          f"{args.probe_n} probe images, same worker):")
    print("| concurrency | phase | req/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    for run in results["runs"]:
        for phase in ("before", "during", "after"):
            r = run[phase]
            print(f"| {run['concurrency']} | {phase} | {r['per_second']} | {r['p50_ms']} | {r['p99_ms']} | "
                  f"{r['errors']} |")
    print("\n| concurrency | probe s | p99 during / around | p50 during / around | req/s during / around |")
    print("|---|---|---|---|---|")
    for run in results["runs"]:
        b, d, a = run["before"], run["during"], run["after"]
        ratio = lambda k: round(d[k] / ((b[k] + a[k]) / 2), 2)
        print(f"| {run['concurrency']} | {run['probe_seconds']} | {ratio('p99_ms')} | {ratio('p50_ms')} | "
              f"{ratio('per_second')} |")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

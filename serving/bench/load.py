"""Serving under load: robustserve's handlers against the plainest possible handler, in one TorchServe, one run.

The anchor (:mod:`serving.bench.plain_handler`) is archived on the same ONNX file as ours, with the same batching
and one worker each. A compiled load generator (``hey``, Debian package ``hey``) sends the same 28 x 28 PNG with the
inference token, closed loop, at each concurrency, alternating plain and ours point by point so drift in the
machine's load hits both alike. Per point: req/s, p50, p99, non-200 answers, and the CPU the model's worker, the
frontend (Java) and the load generator used, in % of one core. Then multi-image KServe v2 requests (16 and 64 PNGs
per request, binary tensor data as the standard client ``tritonclient`` sends it) in images/s, and the retrieval
handler on PNGs.

Results JSON: ``benchmarks/results/serving.json`` (suite ``serving``); :func:`markdown` renders its BENCHMARKS.md
section.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

PLAIN_HANDLER = Path(__file__).with_name("plain_handler.py")
PLAIN, OURS, OURS_SIZED, RETRIEVAL = "plain", "ours", "ours-sized", "ret"


@dataclass
class Settings:
    seconds: float = 6.0  # per point: the machine is shared, so points are kept short
    repeats: int = 3  # each point measured this many times, plain and ours alternating; the table shows medians
    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    multi_images: tuple[int, ...] = (16, 64)
    multi_concurrency: int = 8
    retrieval_concurrency: tuple[int, ...] = (8, 32)
    profile_seconds: float = 0  # > 0: py-spy samples our worker under the highest concurrency, after the rest
    batch_size: int = 16
    max_batch_delay_ms: int = 5
    # A third archive: ours with this many workers (sized to the machine: one per core), everything else the same;
    # 0 leaves it out. The anchor keeps one worker, as its definition says.
    sized_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    export: Optional[str] = None  # classifier export folder; None: an untrained SmallCNN
    embedder_export: Optional[str] = None  # None: an untrained C2F2 (512-d), gallery: the 10k test images
    out: str = "benchmarks/results/serving.json"
    command: str = "scripts/bench_serving.py"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def hey_exe() -> str:
    exe = shutil.which("hey")
    if exe is None:
        raise RuntimeError("the load generator 'hey' is not installed: apt-get install -y hey "
                           "(scripts/setup.sh installs it when run as root)")
    return exe


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pids(inst, model: str) -> list[int]:
    status, body = inst.get("management", f"/models/{model}")
    if status != 200:
        raise RuntimeError(f"describe {model}: HTTP {status} {body}")
    return [int(w["pid"]) for m in body for w in m.get("workers", []) if w.get("pid")]


def hey(url: str, body: Path, content_type: str, headers: dict[str, str], concurrency: int, seconds: float,
        cpu_of: dict[str, list[int]]) -> dict[str, Any]:
    """One closed-loop point: ``concurrency`` connections for ``seconds``. Latencies from hey's per-request CSV."""
    cmd = [hey_exe(), "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-T", content_type,
           "-D", str(body), "-o", "csv"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(url)
    before = {k: sum(_cpu_seconds(p) for p in pids) for k, pids in cpu_of.items()}
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    wall = time.perf_counter() - t0
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {k: 100 * (sum(_cpu_seconds(p) for p in pids) - before[k]) / wall for k, pids in cpu_of.items()}
    cpu["client"] = 100 * ((child1.ru_utime - child0.ru_utime) + (child1.ru_stime - child0.ru_stime)) / wall
    rows = list(csv.DictReader(io.StringIO(out)))
    if not rows:
        raise RuntimeError(f"hey returned no requests for {url}")
    lat = sorted(float(r["response-time"]) for r in rows)
    span = max(float(r["offset"]) + float(r["response-time"]) for r in rows)
    pct = lambda q: round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 2)
    return {"concurrency": concurrency, "requests": len(rows), "seconds": round(span, 2),
            "req_per_s": round(len(rows) / span, 1), "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "errors": sum(r["status-code"] != "200" for r in rows),
            "cpu_pct": {k: round(v, 1) for k, v in cpu.items()}}


def _frame(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:12)`` -> ``func (pkg/mod.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = "/".join(path.split("/")[-2:])
    return f"{name} ({path})" if path else name


def profile(worker: int, run_load, seconds: float, top: int = 25) -> dict[str, Any]:
    """Where the worker's time goes while ``run_load()`` drives it: py-spy samples (100/s, not pausing the process)
    -> the functions with the largest share of the busy samples, inclusive (the function and what it calls) and
    self (the function's own frames)."""
    exe = shutil.which("py-spy") or str(Path(os.sys.executable).with_name("py-spy"))
    with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
        spy = subprocess.Popen([exe, "record", "-p", str(worker), "-d", str(int(seconds)), "-r", "100",
                                "--nonblocking", "-f", "raw", "-o", raw.name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        run_load()
        _, err = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {err.strip()[-300:]}")
        text = Path(raw.name).read_text()
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n
    pct = lambda d: [[k, round(100 * v / max(total, 1), 1)] for k, v in
                     sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    return {"samples": total, "inclusive_pct": pct(inclusive), "self_pct": pct(own)}


def untrained_export(work: Path, arch: str) -> Path:
    """An export of a randomly initialised model (serving speed does not depend on the weights)."""
    import torch

    from serving.export import ExportConfig, export
    from training.checkpoint import save_atomic
    from training.config import ModelConfig, TrainConfig
    from training.data import dataset_info
    from training.models import build_model, model_task

    info = dataset_info("fashion-mnist")
    opts: dict[str, Any] = {"channels": 1, "input_size": (28, 28), "mean": info.mean, "std": info.std}
    if model_task(arch) == "classification":
        opts.update(num_classes=10, class_names=info.class_names)
    torch.manual_seed(0)
    model, spec = build_model(arch, **opts)
    ckpt = work / arch / "model.pt"
    save_atomic({"model": model.state_dict(), "spec": spec.model_copy(update={"method": "untrained"}).model_dump(
        mode="json"), "arch_options": opts, "config": TrainConfig(model=ModelConfig(arch=arch)).model_dump(
        mode="json"), "epoch": 0}, ckpt)
    return export(ExportConfig(checkpoint=str(ckpt), out_dir=str(work / arch / "export"), name=arch,
                               parity_points=8, probe_points=16, attack_steps=2))


def archive_plain(export_dir: Path, store: Path, batch_size: int, delay_ms: int) -> Path:
    """The anchor archive: the plain handler beside the same ``model.onnx`` and the label map."""
    from serving.runtime.artifacts import load_manifest

    spec = load_manifest(export_dir).model
    labels = spec.class_names or tuple(str(i) for i in range(spec.num_classes or 0))
    with tempfile.TemporaryDirectory(prefix="plain-archive-") as stage:
        stage = Path(stage)
        (stage / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(labels)}))
        shutil.copy2(PLAIN_HANDLER, stage / "plain_handler.py")
        (stage / "model-config.yaml").write_text(
            f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {batch_size}\nmaxBatchDelay: {delay_ms}\n"
            "responseTimeout: 30\n")
        exe = shutil.which("torch-model-archiver") or str(Path(os.sys.executable).with_name("torch-model-archiver"))
        subprocess.run([exe, "--model-name", PLAIN, "--version", "1.0",
                        "--serialized-file", str(export_dir / "model.onnx"), "--handler",
                        str(stage / "plain_handler.py"), "--extra-files", str(stage / "index_to_name.json"),
                        "--config-file", str(stage / "model-config.yaml"), "--export-path", str(store), "--force"],
                       check=True)
    return store / f"{PLAIN}.mar"


def png_bytes(n: int, seed: int = 0) -> list[bytes]:
    """n Fashion-MNIST test images as PNG."""
    import numpy as np
    from PIL import Image

    from training.data import load_dataset

    ds = load_dataset("fashion-mnist", "test")
    idx = np.random.default_rng(seed).permutation(len(ds))[:n]
    out = []
    for a in ds.images[idx, 0].numpy():
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def run(s: Settings) -> dict[str, Any]:
    import torch

    from serving.archive import ArchiveConfig, archive
    from serving.serve import ServeConfig, start, stop

    hey_exe()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as work:
        work = Path(work)
        clf = Path(s.export) if s.export else untrained_export(work, "smallcnn")
        emb = Path(s.embedder_export) if s.embedder_export else untrained_export(work, "c2f2")
        store = work / "store"
        batching = dict(batch_size=s.batch_size, max_batch_delay_ms=s.max_batch_delay_ms)
        archive(ArchiveConfig(export_dir=str(clf), model_store=str(store), name=OURS, **batching))
        if s.sized_workers:
            archive(ArchiveConfig(export_dir=str(clf), model_store=str(store), name=OURS_SIZED,
                                  min_workers=s.sized_workers, max_workers=s.sized_workers, **batching))
        archive(ArchiveConfig(export_dir=str(emb), model_store=str(store), name=RETRIEVAL, **batching))
        archive_plain(clf, store, s.batch_size, s.max_batch_delay_ms)
        png = work / "img.png"
        png.write_bytes(png_bytes(1)[0])
        p = free_ports(5)
        cfg = ServeConfig(model_store=str(store), workdir=str(work / "serve"), ready_timeout_s=300,
                          ports=dict(zip(("inference", "management", "metrics", "grpc_inference",
                                          "grpc_management"), p)))
        inst = start(cfg)
        try:
            result = measure(s, inst, work, png)
        finally:
            stop(cfg)
    result.update(suite="serving", command=s.command, config={
        "seconds_per_point": s.seconds, "repeats": s.repeats, "batch_size": s.batch_size,
        "max_batch_delay_ms": s.max_batch_delay_ms, "sized_workers": s.sized_workers,
        "workers_per_model": 1, "onnxruntime_threads": threads_of(s), "classifier": s.export or "untrained SmallCNN",
        "embedder": s.embedder_export or "untrained C2F2, gallery: the 10,000 test images"},
        machine={"platform": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__,
                 "load_average_before": list(os.getloadavg())})
    return result


def threads_of(s: Settings) -> dict[str, int]:
    """ONNX Runtime intra-op threads per worker of each archive: the anchor's one (its definition), ours the
    handler's default (threads 0: this machine's cores over the archive's workers)."""
    from serving.runtime.session import auto_threads

    out = {PLAIN: 1, OURS: auto_threads(1)}
    if s.sized_workers:
        out[OURS_SIZED] = auto_threads(s.sized_workers)
    return out


def _threads_text(cfg: dict) -> str:
    t = cfg["onnxruntime_threads"]
    if isinstance(t, int):  # results written before ours sized its threads
        return f"ONNX Runtime on {t} thread"
    text = f"ONNX Runtime threads per worker: plain {t[PLAIN]}, ours {t[OURS]}"
    if OURS_SIZED in t:
        text += f" ({t[OURS_SIZED]} in each of the {cfg['sized_workers']}-worker archive's workers)"
    return text + " (our handler's default, threads 0, gives each worker its share of the cores)"


def measure(s: Settings, inst, work: Path, png: Path) -> dict[str, Any]:
    from serving.runtime.v2binary import binary_request

    base = inst.url("inference")
    auth = inst.headers("inference")
    frontend = inst.pid()
    cpu_of = lambda model: {"worker": worker_pids(inst, model), "frontend": [frontend] if frontend else []}

    def point(model: str, c: int, body: Path = png, content_type: str = "image/png", path: str = "",
              extra: Optional[dict] = None) -> dict[str, Any]:
        url = base + (path or f"/predictions/{model}")
        r = hey(url, body, content_type, {**auth, **(extra or {})}, c, s.seconds, cpu_of(model))
        log.info("%s c=%d: %.1f req/s, p50 %.2f ms, p99 %.2f ms, %d errors", model, c, r["req_per_s"],
                 r["p50_ms"], r["p99_ms"], r["errors"])
        return r

    handlers = (PLAIN, OURS, OURS_SIZED) if s.sized_workers else (PLAIN, OURS)
    for model in (*handlers, RETRIEVAL):  # warm-up: first requests, lazy initialisation
        hey(base + f"/predictions/{model}", png, "image/png", auth, 4, 2, {})
    runs: dict[str, list[list]] = {m: [[] for _ in s.concurrency] for m in handlers}
    multi_of = handlers[1:]
    bodies = {}
    for n in s.multi_images:
        body, size = binary_request(png_bytes(n, seed=n))
        bodies[n] = (work / f"v2-{n}.bin", size)
        bodies[n][0].write_bytes(body)
    multi_runs: dict[str, dict[int, list]] = {m: {n: [] for n in s.multi_images} for m in multi_of}
    for rep in range(s.repeats):
        for i, c in enumerate(s.concurrency):
            k = (i + rep) % len(handlers)  # each handler goes first in turn
            for model in handlers[k:] + handlers[:k]:
                runs[model][i].append(point(model, c))
        for model in multi_of:
            for n, (f, size) in bodies.items():
                r = point(model, s.multi_concurrency, f, "application/octet-stream", f"/v2/models/{model}/infer",
                          {"Inference-Header-Content-Length": str(size)})
                r.update(images_per_request=n, images_per_s=round(r["req_per_s"] * n, 1), model=model)
                multi_runs[model][n].append(r)
    single = {m: [median_point(rs) for rs in per_c] for m, per_c in runs.items()}
    multi = [median_point(rs) for per_n in multi_runs.values() for rs in per_n.values()]
    retrieval = [point(RETRIEVAL, c) for c in s.retrieval_concurrency]
    result = {"single_image": single, "multi_image": multi, "retrieval": retrieval,
              "repeats": {"single_image": runs,
                          "multi_image": {m: {str(n): rs for n, rs in per_n.items()} for m, per_n in
                                          multi_runs.items()}}}
    if s.profile_seconds:
        c = max(s.concurrency)
        prof = profile(worker_pids(inst, OURS)[0], lambda: point(OURS, c), s.profile_seconds)
        result["profile"] = {"model": OURS, "concurrency": c, **prof}
    return result


def median_point(points: list[dict]) -> dict:
    """Repeats of one point -> one point whose every figure is the median of the repeats' (with ``repeats``)."""
    if len(points) == 1:
        return {**points[0], "repeats": 1}
    med = lambda xs: round(statistics.median(xs), 2)
    out = dict(points[0])
    for k, v in points[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "concurrency" \
                and k != "images_per_request":
            out[k] = med([p[k] for p in points])
    out["cpu_pct"] = {k: med([p["cpu_pct"].get(k, 0) for p in points]) for k in points[0]["cpu_pct"]}
    out["repeats"] = len(points)
    return out


def worker_ms(r: dict, per: str = "req_per_s") -> float:
    """The worker's CPU milliseconds per request (or per image): what the handler costs, whatever else the
    machine is doing."""
    return 10 * r["cpu_pct"].get("worker", 0) / r[per]


def _row(r: dict) -> str:
    cpu = r["cpu_pct"]
    return (f"{r['req_per_s']:,.1f} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {cpu.get('worker', 0):.0f} | "
            f"{worker_ms(r):.3f} | {cpu.get('frontend', 0):.0f} | {cpu.get('client', 0):.0f}")


def markdown(result: dict) -> str:
    cfg, m = result["config"], result["machine"]
    single = result["single_image"]
    lines = [
        "One TorchServe, one worker per model"
        + (f" (and a third archive of ours with {cfg['sized_workers']} workers, one per core)"
           if cfg.get("sized_workers") else "")
        + f", {_threads_text(cfg)}, batch "
        f"{cfg['batch_size']} / {cfg['max_batch_delay_ms']} ms, {cfg['seconds_per_point']:g} s per point (short on "
        f"purpose: the machine is shared; {m['cores']} cores, load average {m['load_average_before'][0]:.1f} before "
        f"the run), plain and ours alternating point by point"
        + (f", every point measured {cfg['repeats']} times and each figure the median of its repeats (the single "
           f"repeats are in the JSON)" if cfg.get("repeats", 1) > 1 else "")
        + f". Load generator: hey (closed loop), the same 28 x 28 PNG with the token. Classifier: "
          f"{cfg['classifier']}. CPU in % of one core.",
        "",
        "| handler | concurrency | req/s | p50 ms | p99 ms | errors | worker CPU % | worker CPU ms/request | "
        "frontend CPU % | hey CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    sized = single.get(OURS_SIZED)
    variants = [(PLAIN, "plain"), (OURS, "robustserve")]
    if sized:
        variants.append((OURS_SIZED, f"robustserve, {cfg['sized_workers']} workers"))
    for i in range(len(single[PLAIN])):
        for key, name in variants:
            lines.append(f"| {name} | {single[key][i]['concurrency']} | {_row(single[key][i])} |")
    ratio = lambda a, b: (f"{a['req_per_s'] / b['req_per_s']:.2f} | {a['p50_ms'] / b['p50_ms']:.2f} | "
                          f"{a['p99_ms'] / b['p99_ms']:.2f}")
    head = "| concurrency | req/s ours / plain | p50 ours / plain | p99 ours / plain | " \
           "worker CPU per request ours / plain |"
    if sized:
        head += f" req/s {cfg['sized_workers']} workers / plain | p50 | p99 |"
    lines += ["", head, "|---" * (5 + 3 * bool(sized)) + "|"]
    for i, plain in enumerate(single[PLAIN]):
        ours = single[OURS][i]
        row = f"| {plain['concurrency']} | {ratio(ours, plain)} | {worker_ms(ours) / worker_ms(plain):.2f} |"
        if sized:
            row += f" {ratio(sized[i], plain)} |"
        lines.append(row)
    multi = result.get("multi_image") or []
    if multi:
        c = multi[0]["concurrency"]
        lines += ["", f"Multi-image KServe v2 requests (binary tensor data, as tritonclient sends them), "
                      f"concurrency {c}, against the same archive's single-image PNG requests at that concurrency:",
                  "", "| archive | images per request | req/s | images/s | p50 ms | p99 ms | errors | "
                      "x single-image rate | worker CPU ms/image |", "|---|---|---|---|---|---|---|---|---|"]
        for key, name in variants[1:]:
            ref = next((r for r in single.get(key, []) if r["concurrency"] == c), None)
            for r in multi:
                if r.get("model", OURS) != key:
                    continue
                x = f"{r['images_per_s'] / ref['req_per_s']:.1f}" if ref else "-"
                lines.append(f"| {name} | {r['images_per_request']} | {r['req_per_s']:,.1f} | "
                             f"{r['images_per_s']:,.0f} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {x} | "
                             f"{worker_ms(r, 'images_per_s'):.3f} |")
            if ref:
                lines.append(f"| {name} | 1 (PNG body) | {ref['req_per_s']:,.1f} | {ref['req_per_s']:,.0f} | "
                             f"{ref['p50_ms']} | {ref['p99_ms']} | {ref['errors']} | 1.0 | {worker_ms(ref):.3f} |")
    prof = result.get("profile")
    if prof:
        lines += ["", f"Where robustserve's worker spends its busy time at concurrency {prof['concurrency']} (py-spy, "
                      f"{prof['samples']:,} samples; inclusive: the function and everything it calls):", "",
                  "| function | inclusive % | | function | self % |", "|---|---|---|---|---|"]
        for (fi, pi), (fs, ps) in list(zip(prof["inclusive_pct"], prof["self_pct"]))[:15]:
            lines.append(f"| `{fi}` | {pi} | | `{fs}` | {ps} |")
    ret = result.get("retrieval") or []
    if ret:
        lines += ["", f"Retrieval handler ({cfg['embedder']}; exact search, k = 10), PNG bodies:", "",
                  "| concurrency | req/s | p50 ms | p99 ms | errors | worker CPU % | worker CPU ms/request | "
                  "frontend CPU % | hey CPU % |", "|---|---|---|---|---|---|---|---|---|"]
        for r in ret:
            lines.append(f"| {r['concurrency']} | {_row(r)} |")
    return "\n".join(lines) + "\n"

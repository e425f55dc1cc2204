"""``robustserve tune``: batch size, max batch delay and workers chosen by measurement on the machine at hand.

Every point of a small grid (batch sizes x delays x workers) is served on its own real TorchServe (loopback, free
ports, its own work and temp folders, always stopped), from a copy of the archive whose ``model-config.yaml``
holds that point, and driven with the compiled load generator ``hey`` (closed loop, a fixed concurrency, one
PNG of the model's input size, the inference token; with ``sweep.images_per_request`` N > 1, a KServe v2 request of N
such PNGs in binary tensor data instead, as multi-image clients send them): req/s, p50, p99, non-200 answers and
worker CPU per point, and images/s.

The rule (:func:`choose`): among the points with no errors, those whose p99 is within ``p99_tolerance`` of the
lowest such p99; of those, the highest req/s (ties: fewer workers, then smaller batch, then shorter delay).

The winner is written into the archive's ``model-config.yaml``: an export folder is re-archived with it by
:func:`serving.archive.archive`; an existing ``.mar`` is rewritten (config and its entry in ``archive-files.json``)
to a temporary file beside it and renamed over it. Either way a failed tune leaves the archive as it was.
The results JSON lists every point measured and the choice; :func:`markdown` renders it (suite ``tune``).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import Field

from serving.archive import ArchiveConfig
from serving.runtime.artifacts import ARCHIVE_FILES, MANIFEST_NAME, ExportManifest
from serving.runtime.spec import Frozen
from serving.runtime.v2binary import binary_request

log = logging.getLogger(__name__)

CONFIG_MEMBER = "model-config.yaml"
# Result keys -> model-config.yaml keys.
YAML_KEYS = {"batch_size": ("batchSize",), "max_batch_delay_ms": ("maxBatchDelay",),
             "workers": ("minWorkers", "maxWorkers")}


class Sweep(Frozen):
    """The grid, the load and the selection rule."""

    batch_sizes: tuple[int, ...] = (1, 8, 16)
    max_batch_delays_ms: tuple[int, ...] = (2, 10)
    workers: tuple[int, ...] = (1, 2)
    concurrency: int = Field(16, ge=1)  # hey's connections, closed loop
    images_per_request: int = Field(1, ge=1, le=64)  # 1: a PNG body; N > 1: a v2 binary request of N PNGs
    seconds: float = Field(5.0, gt=0)  # measured per point; short, since every point is a fresh server
    warmup_s: float = Field(1.0, ge=0)  # load before measuring: first requests, lazy initialisation
    p99_tolerance: float = Field(0.25, ge=0)  # candidates: p99 <= (1 + this) x the lowest error-free p99
    ready_timeout_s: float = Field(300.0, gt=0)
    seed: int = 0  # of the request image


class TuneConfig(Frozen):
    archive: ArchiveConfig = ArchiveConfig()  # the export to archive (archive.export_dir) and how; unused with mar
    mar: Optional[str] = None  # tune this existing archive in place instead
    sweep: Sweep = Sweep()
    results: Optional[str] = None  # None: <archive without .mar>.tune.json beside it


class TuneBenchConfig(Frozen):
    """``robustserve bench tune``: the same on an export (default: an untrained SmallCNN; speed does not depend on
    the weights), recorded in ``benchmarks/results/tune.json``."""

    export_dir: Optional[str] = None
    model_store: str = "runs/tune/model_store"
    sweep: Sweep = Sweep()
    results: str = "benchmarks/results/tune.json"


def grid(s: Sweep) -> list[dict[str, int]]:
    return [{"batch_size": b, "max_batch_delay_ms": d, "workers": w}
            for b in s.batch_sizes for d in s.max_batch_delays_ms for w in s.workers]


def rule(tolerance: float) -> str:
    return (f"among points with no errors, those with p99 <= {1 + tolerance:g} x the lowest such p99; of those, the "
            f"highest req/s (ties: fewer workers, smaller batch, shorter delay)")


def choose(points: list[dict[str, Any]], tolerance: float) -> Optional[dict[str, Any]]:
    """The winning point (see :func:`rule`), or None when every point had errors. A point: the settings of
    :func:`grid` plus ``req_per_s``, ``p99_ms`` and ``errors``, or ``failed`` (why it could not be measured)."""
    clean = [p for p in points if not p.get("failed") and p["errors"] == 0]
    if not clean:
        return None
    limit = (1 + tolerance) * min(p["p99_ms"] for p in clean)
    fast = [p for p in clean if p["p99_ms"] <= limit]
    return max(fast, key=lambda p: (p["req_per_s"], -p["workers"], -p["batch_size"], -p["max_batch_delay_ms"]))


def read_manifest(mar: Path) -> ExportManifest:
    with zipfile.ZipFile(mar) as z:
        if MANIFEST_NAME not in z.namelist():
            raise ValueError(f"{mar} holds no {MANIFEST_NAME}: not an archive built by `robustserve archive`")
        return ExportManifest.model_validate_json(z.read(MANIFEST_NAME))


def with_settings(mar: Path, dest: Path, settings: dict[str, int]) -> Path:
    """A copy of ``mar`` at ``dest`` whose model-config.yaml holds ``settings`` (:func:`grid`'s keys), with the
    file's entry in archive-files.json updated so the handler's integrity check still passes. Written to a
    temporary file beside ``dest`` and renamed: ``dest`` is either the old file or the complete new one."""
    with zipfile.ZipFile(mar) as z:
        names = z.namelist()
        if CONFIG_MEMBER not in names or ARCHIVE_FILES not in names:
            raise ValueError(f"{mar} lacks {CONFIG_MEMBER} or {ARCHIVE_FILES}: rebuild it with `robustserve archive`")
        doc = yaml.safe_load(z.read(CONFIG_MEMBER)) or {}
        for key, value in settings.items():
            for ykey in YAML_KEYS[key]:
                doc[ykey] = int(value)
        config = yaml.safe_dump(doc, sort_keys=False).encode()
        listing = json.loads(z.read(ARCHIVE_FILES))
        listing[CONFIG_MEMBER] = {"file": CONFIG_MEMBER, "sha256": hashlib.sha256(config).hexdigest(),
                                  "bytes": len(config)}
        replaced = {CONFIG_MEMBER: config, ARCHIVE_FILES: json.dumps(listing, indent=1).encode()}
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        os.close(fd)
        try:
            with zipfile.ZipFile(partial, "w") as out:
                for info in z.infolist():
                    out.writestr(info, replaced.get(info.filename) or z.read(info))
            with zipfile.ZipFile(partial) as check:
                bad = check.testzip()
                if bad is not None:
                    raise RuntimeError(f"{partial}: corrupt member {bad}")
            os.chmod(partial, 0o644)
            os.replace(partial, dest)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
    return dest


def archive_settings(mar: Path) -> dict[str, int]:
    """The batching and worker settings in an archive's model-config.yaml, in :func:`grid`'s keys."""
    with zipfile.ZipFile(mar) as z:
        doc = yaml.safe_load(z.read(CONFIG_MEMBER)) or {}
    if doc.get("minWorkers") != doc.get("maxWorkers"):
        raise ValueError(f"{mar}: minWorkers {doc.get('minWorkers')} != maxWorkers {doc.get('maxWorkers')}")
    return {"batch_size": doc.get("batchSize"), "max_batch_delay_ms": doc.get("maxBatchDelay"),
            "workers": doc.get("minWorkers")}


def sample_png(manifest: ExportManifest, seed: int) -> bytes:
    """One PNG of the model's input size and channels (random pixels: serving cost does not depend on them)."""
    import numpy as np
    from PIL import Image

    spec = manifest.model
    h, w = spec.input_size
    shape = (h, w) if spec.channels == 1 else (h, w, 3)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class Load:
    """What every point is driven with: the request body (a file for hey), its content type, the endpoint after
    the inference address (``{name}`` filled in per archive), extra headers, and the images per request."""

    def __init__(self, manifest: ExportManifest, s: Sweep, work: Path):
        png = sample_png(manifest, s.seed)
        self.images = s.images_per_request
        self.body = work / "request.bin"
        if self.images == 1:
            self.body.write_bytes(png)
            self.content_type, self.path, self.headers = "image/png", "/predictions/{name}", {}
            self.what = f"one {manifest.model.input_size[0]} x {manifest.model.input_size[1]} PNG"
        else:
            body, length = binary_request([png] * self.images)
            self.body.write_bytes(body)
            self.content_type, self.path = "application/octet-stream", "/v2/models/{name}/infer"
            self.headers = {"Inference-Header-Content-Length": str(length)}
            self.what = (f"a KServe v2 request of {self.images} {manifest.model.input_size[0]} x "
                         f"{manifest.model.input_size[1]} PNGs in binary tensor data")


def ready_workers(inst, name: str, n: int, timeout: float) -> list[int]:
    """The pids of ``name``'s workers once ``n`` are READY (start() returns at the first)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = inst.get("management", f"/models/{name}")
        ready = [int(w["pid"]) for m in (body if status == 200 else []) for w in m.get("workers", [])
                 if w.get("status") == "READY" and w.get("pid")]
        if len(ready) >= n:
            return ready
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: {len(ready)} of {n} worker(s) READY after {timeout:.0f} s")
        time.sleep(0.5)


def measure(base: Path, name: str, point: dict[str, int], load: Load, s: Sweep, work: Path) -> dict[str, Any]:
    """Serves ``base`` with ``point``'s settings on a fresh TorchServe and drives it with hey."""
    from serving.bench.load import free_ports, hey
    from serving.serve import ServeConfig, start, stop

    store = work / "store"
    with_settings(base, store / f"{name}.mar", point)
    ports = dict(zip(("inference", "management", "metrics", "grpc_inference", "grpc_management"), free_ports(5)))
    cfg = ServeConfig(model_store=str(store), models=(name,), workdir=str(work / "serve"),
                      ready_timeout_s=s.ready_timeout_s, ports=ports)
    inst = start(cfg)
    try:
        url = inst.url("inference") + load.path.format(name=name)
        headers = {**inst.headers("inference"), **load.headers}
        workers = ready_workers(inst, name, point["workers"], s.ready_timeout_s)
        if s.warmup_s:
            hey(url, load.body, load.content_type, headers, s.concurrency, s.warmup_s, {})
        load_before = os.getloadavg()[0]
        r = hey(url, load.body, load.content_type, headers, s.concurrency, s.seconds,
                {"worker": workers, "frontend": [inst.pid()] if inst.pid() else []})
    finally:
        stop(cfg)
    r.update(point, workers_ready=len(workers), load_average=round(load_before, 2),
             images_per_s=round(r["req_per_s"] * load.images, 1))
    log.info("batch %d, delay %d ms, %d worker(s): %.1f req/s, p50 %.2f ms, p99 %.2f ms, %d errors",
             point["batch_size"], point["max_batch_delay_ms"], point["workers"], r["req_per_s"], r["p50_ms"],
             r["p99_ms"], r["errors"])
    return r


def tune(cfg: TuneConfig, command: str = "robustserve tune") -> dict[str, Any]:
    """Sweeps, chooses, writes the winner into the archive and the results JSON; returns the results. Raises
    RuntimeError (archive untouched, results still written) when every point had errors."""
    import torch

    from serving.archive import archive
    from serving.bench import write
    from serving.bench.load import hey_exe

    hey_exe()
    s = cfg.sweep
    if cfg.mar is not None:
        target = Path(cfg.mar)
        if not target.is_file():
            raise FileNotFoundError(f"mar: {target} not found")
    else:
        from serving.runtime.artifacts import load_manifest

        if not Path(cfg.archive.export_dir).is_dir():
            raise FileNotFoundError(f"archive.export_dir: {cfg.archive.export_dir} not found (or pass --set mar=...)")
        name = cfg.archive.name or load_manifest(cfg.archive.export_dir).name
        target = Path(cfg.archive.model_store) / f"{name}.mar"
        if target.exists() and not cfg.archive.overwrite:
            raise FileExistsError(f"{target} exists; pass --set archive.overwrite=true to tune and replace it, or "
                                  f"--set mar={target} to tune it in place")
    points = grid(s)
    with tempfile.TemporaryDirectory(prefix="robustserve-tune-") as work:
        work = Path(work)
        if cfg.mar is not None:
            base = target
        else:
            base = archive(cfg.archive.model_copy(update={"model_store": str(work / "base"), "overwrite": True}))
        manifest = read_manifest(base)
        name = base.stem
        load = Load(manifest, s, work)
        load_before = list(os.getloadavg())
        measured = []
        for i, p in enumerate(points):
            try:
                measured.append(measure(base, name, p, load, s, work / f"point-{i}"))
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as e:
                # One point that cannot run here (a server that does not start, workers that do not come up)
                # is a result of the sweep, not the end of it.
                why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                log.warning("batch %d, delay %d ms, %d worker(s): failed: %s", p["batch_size"],
                            p["max_batch_delay_ms"], p["workers"], why)
                measured.append({**p, "failed": why, "errors": None})
        chosen = choose(measured, s.p99_tolerance)
        result: dict[str, Any] = {
            "suite": "tune", "command": command, "model": name, "task": manifest.model.task,
            "archive": str(target), "rule": rule(s.p99_tolerance), "points": measured,
            "chosen": {k: chosen[k] for k in (*points[0], "req_per_s", "p50_ms", "p99_ms")} if chosen else None,
            "config": {**s.model_dump(mode="json"), "request": load.what},
            "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__,
                        "load_average_before": load_before}}
        results = Path(cfg.results) if cfg.results else target.with_name(f"{target.stem}.tune.json")
        if chosen is not None:
            settings = {k: chosen[k] for k in points[0]}
            if cfg.mar is not None:
                with_settings(base, target, settings)
            else:
                archive(cfg.archive.model_copy(update={
                    "batch_size": settings["batch_size"], "max_batch_delay_ms": settings["max_batch_delay_ms"],
                    "min_workers": settings["workers"], "max_workers": settings["workers"], "overwrite": True}))
        write(result, results)
        result["results"] = str(results)
    if chosen is None:
        raise RuntimeError(f"every point answered errors or failed; {target} left as it was (see {results})")
    return result


def run(cfg: TuneConfig) -> int:
    result = tune(cfg)
    print(markdown(result), end="")
    c = result["chosen"]
    print(f"written to {result['archive']}: batchSize {c['batch_size']}, maxBatchDelay {c['max_batch_delay_ms']}, "
          f"minWorkers = maxWorkers = {c['workers']}")
    print(f"results: {result['results']}")
    return 0


def run_bench(cfg: TuneBenchConfig) -> int:
    import sys

    with tempfile.TemporaryDirectory(prefix="bench-tune-") as work:
        if cfg.export_dir:
            export = cfg.export_dir
        else:
            from serving.bench.load import untrained_export

            export = str(untrained_export(Path(work), "smallcnn"))
        tcfg = TuneConfig(archive=ArchiveConfig(export_dir=export, model_store=cfg.model_store, overwrite=True),
                          sweep=cfg.sweep, results=cfg.results)
        command = "robustserve " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "robustserve bench tune"
        result = tune(tcfg, command=command)
    print(markdown(result), end="")
    print(f"results: {result['results']}")
    return 0


def markdown(result: dict) -> str:
    cfg, m, c = result["config"], result["machine"], result["chosen"]
    lines = [
        f"Model `{result['model']}` ({result['task']}); every point a fresh TorchServe on loopback, driven by hey "
        f"(closed loop, concurrency {cfg['concurrency']}, {cfg['request']} with the token), {cfg['warmup_s']:g} s "
        f"warm-up then {cfg['seconds']:g} s measured. {m['cores']} cores, shared and noisy (load average "
        f"{m['load_average_before'][0]:.1f} before the run; per point in the last column): points a few per cent "
        f"apart are not told apart by one run. Worker CPU in % of one core, all workers together.",
        "",
        f"Rule: {result['rule']}.",
        "",
    ]
    multi = cfg.get("images_per_request", 1) > 1
    images = " images/s |" if multi else ""
    lines += [f"| batch size | max delay ms | workers | req/s |{images} p50 ms | p99 ms | errors | worker CPU % | "
              f"load average | |",
              "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if multi else "")]
    for p in result["points"]:
        if p.get("failed"):
            lines.append(f"| {p['batch_size']} | {p['max_batch_delay_ms']} | {p['workers']} | failed: "
                         f"{p['failed']} |{' |' if multi else ''} | | | | | |")
            continue
        won = c is not None and all(p[k] == c[k] for k in ("batch_size", "max_batch_delay_ms", "workers"))
        per_image = f" {p['images_per_s']:,.1f} |" if multi else ""
        lines.append(f"| {p['batch_size']} | {p['max_batch_delay_ms']} | {p['workers']} | {p['req_per_s']:,.1f} |"
                     f"{per_image} {p['p50_ms']} | {p['p99_ms']} | {p['errors']} | "
                     f"{p['cpu_pct'].get('worker', 0):.0f} | {p.get('load_average', '-')} | "
                     f"{'**chosen**' if won else ''} |")
    lines.append("")
    if c is None:
        lines.append("No point was free of errors: nothing was written.")
    else:
        lines.append(f"Written into the archive's model-config.yaml: batchSize {c['batch_size']}, maxBatchDelay "
                     f"{c['max_batch_delay_ms']}, minWorkers = maxWorkers = {c['workers']}.")
    return "\n".join(lines) + "\n"

"""``robustserve archive``: TorchServe ``.mar`` files from an export folder, through torch-model-archiver.

The classifier archive holds the TorchScript and ONNX artifacts, ``spec.json``, the label names and the probe set;
the retrieval archive holds the embedder's artifacts, ``spec.json``, a FAISS index of the gallery with its
metadata, and the probe set. Both carry ``model-config.yaml`` (batching, workers, and the handler's settings under
``handler:``), the handler and the engine-agnostic runtime it imports, so an archive runs on any TorchServe with
the serving dependencies installed.

The archive is written under a temporary name inside the model store and renamed when complete: a failed build
never replaces a good archive, and a server never sees a half-written one.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import yaml
from pydantic import Field

from serving.runtime.artifacts import (
    ARCHIVE_FILES,
    MANIFEST_NAME,
    ExportManifest,
    load_manifest,
    verify_all,
    write_archive_files,
)
from serving.runtime.index import RetrievalIndex
from serving.runtime.schemas import ServiceSettings
from serving.runtime.spec import Frozen
from serving.runtime.tasks import get_task

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class GalleryConfig(Frozen):
    """The retrieval gallery: a dataset split embedded by the exported artifact itself."""

    data: Optional[str] = None  # None: the dataset the embedder was trained on
    root: Optional[str] = None
    split: Literal["train", "test"] = "test"  # robrank's in-distribution protocol: test set as gallery
    subset: Optional[int] = Field(None, ge=1)  # first N of a seeded permutation; None: the whole split
    seed: int = 0
    index: Literal["flat", "hnsw"] = "flat"  # flat: exact; hnsw for large galleries
    hnsw_m: int = Field(32, ge=4)
    ef_construction: int = Field(80, ge=8)
    ef_search: int = Field(64, ge=1)
    batch_size: int = Field(256, ge=1)


class ArchiveConfig(Frozen):
    export_dir: str = "runs/train/export"
    name: Optional[str] = None  # None: the name in spec.json
    version: str = "1.0"
    model_store: str = "model_store"
    overwrite: bool = False
    batch_size: int = Field(16, ge=1)
    max_batch_delay_ms: int = Field(5, ge=0)
    min_workers: int = Field(1, ge=1)
    max_workers: int = Field(1, ge=1)
    response_timeout_s: int = Field(30, ge=1)
    startup_timeout_s: int = Field(120, ge=1)
    service: ServiceSettings = ServiceSettings()
    gallery: GalleryConfig = GalleryConfig()


def archive(cfg: ArchiveConfig) -> Path:
    """Builds ``<model_store>/<name>.mar`` and returns its path."""
    src = Path(cfg.export_dir)
    manifest = load_manifest(src)
    verify_all(src, manifest)
    name = cfg.name or manifest.name
    if not NAME_RE.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '-', '_' or '.', starting with a letter or digit")
    if cfg.max_workers < cfg.min_workers:
        raise ValueError(f"max_workers ({cfg.max_workers}) is below min_workers ({cfg.min_workers})")
    store = Path(cfg.model_store)
    store.mkdir(parents=True, exist_ok=True)
    dest = store / f"{name}.mar"
    if dest.exists() and not cfg.overwrite:
        raise FileExistsError(f"{dest} exists; pass --set overwrite=true to replace it")

    with tempfile.TemporaryDirectory(prefix="robustserve-archive-") as work:
        work = Path(work)
        stage = work / "stage"
        stage.mkdir()
        for art in manifest.artifacts.values():
            shutil.copy2(src / art.file, stage / art.file)
        shutil.copy2(src / MANIFEST_NAME, stage / MANIFEST_NAME)
        task = get_task(manifest.model.task)
        task.stage_archive(stage, ArchiveBuild(src, manifest, cfg))
        _copy_code(stage)
        config_file = work / "model-config.yaml"
        config_file.write_text(model_config_yaml(cfg))
        handler = task.handler
        # The archiver adds the handler and the config at the archive's root: listed under those names.
        write_archive_files(stage, {"model-config.yaml": config_file, Path(handler).name: REPO / handler})
        _run_archiver(name, cfg.version, REPO / handler, stage, config_file, work)
        built = work / f"{name}.mar"
        _check_archive(built)
        # Same filesystem as the destination, so the final rename is atomic.
        fd, partial = tempfile.mkstemp(prefix=f".{name}.mar.", suffix=".partial", dir=store)
        os.close(fd)
        try:
            shutil.copyfile(built, partial)
            os.chmod(partial, 0o644)
            os.replace(partial, dest)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
    log.info("archived %s (%s) to %s", name, manifest.model.task, dest)
    return dest


class ArchiveBuild:
    """What a task's :meth:`~serving.runtime.tasks.ServedTask.stage_archive` may use: the export folder ``src``,
    its ``manifest``, the archive's ``cfg``, and :meth:`gallery`."""

    def __init__(self, src: Path, manifest: ExportManifest, cfg: ArchiveConfig):
        self.src, self.manifest, self.cfg = src, manifest, cfg

    def gallery(self) -> RetrievalIndex:
        """The retrieval gallery of ``cfg.gallery``, embedded by the exported artifact (:func:`build_gallery`)."""
        return build_gallery(self.src, self.manifest, self.cfg.gallery, self.cfg.service)


def model_config_yaml(cfg: ArchiveConfig) -> str:
    doc = {
        "minWorkers": cfg.min_workers,
        "maxWorkers": cfg.max_workers,
        "batchSize": cfg.batch_size,
        "maxBatchDelay": cfg.max_batch_delay_ms,
        "responseTimeout": cfg.response_timeout_s,
        "startupTimeout": cfg.startup_timeout_s,
        "handler": cfg.service.model_dump(mode="json"),
    }
    return yaml.safe_dump(doc, sort_keys=False)


def build_gallery(src: Path, manifest: ExportManifest, g: GalleryConfig, settings: ServiceSettings
                  ) -> RetrievalIndex:
    """Embeds the gallery with the exported artifact the server will run, so queries and gallery match."""
    import torch

    from serving.runtime.session import open_session
    from training.data import load_dataset

    data_cfg = (manifest.training_config or {}).get("data", {})
    data = g.data or data_cfg.get("name")
    if not data:
        raise ValueError("the export records no training dataset; pass --set gallery.data=<dataset>")
    same = g.data is None or g.data == data_cfg.get("name")
    ds = load_dataset(data, g.split, g.root or (data_cfg.get("root") if same else None),
                      **(data_cfg.get("options") or {} if same else {}))
    spec = manifest.model
    if (ds.channels, *ds.input_size) != (spec.channels, *spec.input_size):
        raise ValueError(f"gallery images are {(ds.channels, *ds.input_size)}; the model takes "
                         f"{(spec.channels, *spec.input_size)}")
    idx = torch.arange(len(ds))
    if g.subset is not None and g.subset < len(ds):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(g.seed))[:g.subset].sort().values
    session = open_session(src, manifest, engine=settings.engine, fallback=settings.fallback_to_torchscript,
                           threads=max(1, torch.get_num_threads()), device="cpu")
    chunks = []
    for s in range(0, len(idx), g.batch_size):
        x, _ = ds.get(idx[s:s + g.batch_size])
        chunks.append(session.run(x.numpy()))
    emb = np.concatenate(chunks)
    labels = ds.labels[idx].numpy()
    ids = [f"{data}/{g.split}/{int(i)}" for i in idx]
    log.info("gallery: %d %s/%s images embedded with %s, %s index", len(ids), data, g.split, session.engine,
             g.index)
    return RetrievalIndex.build(emb, ids, labels, ds.class_names, kind=g.index, hnsw_m=g.hnsw_m,
                                ef_construction=g.ef_construction, ef_search=g.ef_search,
                                model_sha256=manifest.artifacts["onnx"].sha256 if "onnx" in manifest.artifacts
                                else None)


def _copy_code(stage: Path) -> None:
    """The handler's imports: the ``handlers`` package and the runtime (``serving/__init__`` + ``runtime``)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "handlers", stage / "handlers", ignore=ignore)
    (stage / "serving").mkdir()
    shutil.copy2(REPO / "serving" / "__init__.py", stage / "serving" / "__init__.py")
    shutil.copytree(REPO / "serving" / "runtime", stage / "serving" / "runtime", ignore=ignore)


def _run_archiver(name: str, version: str, handler: Path, stage: Path, config_file: Path, work: Path) -> None:
    tmp = work / "tmp"
    tmp.mkdir()
    # torch-model-archiver stages files in <tempdir>/<model name>: a private TMPDIR keeps concurrent builds apart.
    env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "TMP": str(tmp)}
    exe = Path(sys.executable).with_name("torch-model-archiver")
    cmd = [str(exe) if exe.exists() else "torch-model-archiver", "--model-name", name, "--version", version,
           "--handler", str(handler), "--extra-files", str(stage), "--config-file", str(config_file),
           "--export-path", str(work), "--archive-format", "default"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed ({proc.returncode}):\n{proc.stderr or proc.stdout}")


def _check_archive(path: Path) -> None:
    if not path.is_file():
        raise RuntimeError(f"torch-model-archiver wrote no {path.name}")
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        if bad is not None:
            raise RuntimeError(f"{path.name}: corrupt member {bad}")
        names = set(z.namelist())
    missing = {"MAR-INF/MANIFEST.json", MANIFEST_NAME, "model-config.yaml", ARCHIVE_FILES} - names
    if missing:
        raise RuntimeError(f"{path.name} lacks {sorted(missing)}")


class ExtractLimits(Frozen):
    """Bounds on unpacking an archive that may not be ours (a candidate handed to ``probe`` or ``gate``)."""

    max_entries: int = Field(10_000, ge=1)
    max_bytes: int = Field(8 << 30, ge=1)  # uncompressed, all entries together


def extract_archive(path: str | Path, dest: str | Path, limits: ExtractLimits = ExtractLimits()) -> Path:
    """Unpacks a .mar into ``dest`` with the checks ``ZipFile.extractall`` lacks: entry count and declared total
    size before anything is written, no absolute paths, no ``..``, no links or devices, no duplicates, and the
    bytes actually written held to the declared sizes (a lying header cannot inflate past them)."""
    import stat

    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        if len(infos) > limits.max_entries:
            raise ValueError(f"{path}: {len(infos)} entries; the limit is {limits.max_entries}")
        total = sum(i.file_size for i in infos)
        if total > limits.max_bytes:
            raise ValueError(f"{path}: {total} bytes unpacked; the limit is {limits.max_bytes}")
        seen = set()
        for info in infos:
            name = info.filename
            parts = Path(name).parts
            mode = info.external_attr >> 16
            if name.startswith(("/", "\\")) or ".." in parts or ":" in name or "\\" in name:
                raise ValueError(f"{path}: entry {name!r} points outside the archive")
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no type recorded
                raise ValueError(f"{path}: entry {name!r} is not a regular file or folder (a link or device)")
            target = (dest / name).resolve()
            if target != dest and dest not in target.parents:
                raise ValueError(f"{path}: entry {name!r} points outside the archive")
            if target in seen:
                raise ValueError(f"{path}: entry {name!r} appears twice")
            seen.add(target)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            left = info.file_size
            with z.open(info) as src, open(target, "wb") as out:
                while True:
                    block = src.read(min(1 << 20, left + 1))
                    if not block:
                        break
                    left -= len(block)
                    if left < 0:
                        raise ValueError(f"{path}: entry {name!r} unpacks past its declared size")
                    out.write(block)
    return dest


def archive_contents(path: str | Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return sorted(z.namelist())

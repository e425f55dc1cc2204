"""``spec.json``: what an export folder holds and why it can be trusted.

An export folder (written by ``robustserve export``) holds the TorchScript and ONNX artifacts, a probe set and
``spec.json``, which records the model spec, the input contract, the measured evaluation figures, the resolved
training config, the parity measurements and the SHA-256 of every other file. Everything that serves the model
reads its preprocessing and identity from this file only.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from serving.runtime.errors import ArtifactError
from serving.runtime.spec import Frozen, ModelSpec
from serving.runtime.tasks import TaskName, get_task

MANIFEST_NAME = "spec.json"
FORMAT_VERSION = 1
# Written by the archive step: the SHA-256 of every file an archive carries (gallery index, labels, code and
# config included), so a served or probed archive is checked whole, not only the artifacts spec.json lists.
ARCHIVE_FILES = "archive-files.json"
# What is not listed: the archiver's own manifest (written after), the list itself, bytecode caches Python writes,
# and the probe state a handler keeps beside the model when no other folder is configured.
_UNLISTED_DIRS = {"MAR-INF", "__pycache__", "probes"}


class InputSpec(Frozen):
    """The tensor an artifact takes: N x C x H x W float32 images in [lo, hi], batch axis dynamic."""

    name: str = "x"
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    channels: int = Field(ge=1)
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    range: tuple[float, float] = (0.0, 1.0)
    color: Literal["grayscale", "rgb", "multichannel"]

    @classmethod
    def from_spec(cls, spec: ModelSpec, name: str = "x") -> "InputSpec":
        color = {1: "grayscale", 3: "rgb"}.get(spec.channels, "multichannel")
        return cls(name=name, channels=spec.channels, height=spec.input_size[0], width=spec.input_size[1],
                   color=color)


class ArtifactFile(Frozen):
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class ParityCheck(Frozen):
    """One artifact against the eager model on one input set."""

    inputs: Literal["clean", "adversarial"]
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    top1_equal: bool
    topk_equal: bool
    k: int


class ParityReport(Frozen):
    tolerance: float
    attack: dict[str, Any]
    checks: dict[str, tuple[ParityCheck, ...]]  # artifact name -> checks


class EvaluationSummary(Frozen):
    """The figures measured by ``robustserve evaluate``. Classifiers: accuracy in [0, 1], robust = worst case per
    point for each eps. Embedders: benign retrieval metrics (R@k, mAP, in %) and the ranking-attack ERS terms."""

    source: str
    task: TaskName = "classification"
    n: Optional[int] = None
    points: Optional[str] = None
    clean_accuracy: Optional[float] = None
    robust: tuple[dict[str, Any], ...] = ()  # [{eps, worst_case, attacks: {name: accuracy}}]
    benign: Optional[dict[str, float]] = None
    ers: Optional[float] = None
    ers_terms: Optional[dict[str, float]] = None
    threat: Optional[dict[str, Any]] = None  # the embedder attack profile (eps, steps)


class ProbeCheck(Frozen):
    """The bar a served model must clear at start-up: its clean score on the probe set, measured through the
    serving path (image bytes decoded as requests are), at or above ``min_value``. metric: ``accuracy``
    (classifiers) or ``recall_at_1`` (embedders: leave-one-out within the probe set), in [0, 1]."""

    metric: str  # the task's clean_metric
    n: int = Field(ge=1)
    measured: float  # the exported artifact on the probe set, at export time, from the training data pipeline
    reference: float  # what the model is known to score: the evaluation, the trainer's test accuracy, or measured
    reference_source: str
    min_value: float


class ExportManifest(Frozen):
    format_version: int = FORMAT_VERSION
    name: str
    model: ModelSpec
    input: InputSpec
    output: str  # the artifact's output name: logits or embedding
    evaluation: Optional[EvaluationSummary] = None
    training_config: Optional[dict[str, Any]] = None
    parity: Optional[ParityReport] = None
    probe_check: Optional[ProbeCheck] = None
    artifacts: dict[str, ArtifactFile]  # torchscript, onnx, probes, labels
    exported: dict[str, Any] = Field(default_factory=dict)  # versions, source checkpoint and its hash, time

    @model_validator(mode="after")
    def _check_metric(self) -> "ExportManifest":
        want = get_task(self.model.task).clean_metric
        if self.probe_check is not None and self.probe_check.metric != want:
            raise ValueError(f"probe_check measures {self.probe_check.metric!r}; a {self.model.task} model's "
                             f"self-check measures {want!r}")
        return self

    def path_of(self, root: str | Path, artifact: str) -> Path:
        if artifact not in self.artifacts:
            raise ArtifactError(f"{root}: spec.json lists no {artifact!r} artifact (has {sorted(self.artifacts)})")
        return Path(root) / self.artifacts[artifact].file


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def describe_file(root: str | Path, name: str) -> ArtifactFile:
    path = Path(root) / name
    return ArtifactFile(file=name, sha256=sha256_file(path), bytes=path.stat().st_size)


def load_manifest(root: str | Path) -> ExportManifest:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{path} not found: export the model first with `robustserve export`")
    try:
        return ExportManifest.model_validate(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"{path} is not a valid export manifest: {e}") from None


def verify_artifact(root: str | Path, manifest: ExportManifest, artifact: str) -> Path:
    """The path of ``artifact`` after checking its size and SHA-256 against the manifest."""
    info = manifest.artifacts.get(artifact)
    if info is None:
        raise ArtifactError(f"{root}: spec.json lists no {artifact!r} artifact")
    return _check_file(Path(root) / info.file, info, MANIFEST_NAME, "the file was changed after export; "
                                                                     "re-export the model")


def _check_file(path: Path, info: ArtifactFile, listing: str, fix: str) -> Path:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing (listed in {listing})")
    if path.stat().st_size != info.bytes or sha256_file(path) != info.sha256:
        raise ArtifactError(f"{path} does not match the SHA-256 recorded in {listing}: {fix}")
    return path


def verify_all(root: str | Path, manifest: ExportManifest) -> None:
    for name in manifest.artifacts:
        verify_artifact(root, manifest, name)


def _archive_members(root: Path) -> list[str]:
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_dir() or rel.as_posix() == ARCHIVE_FILES or _UNLISTED_DIRS & set(rel.parts) or p.suffix == ".pyc":
            continue
        out.append(rel.as_posix())
    return out


def write_archive_files(root: str | Path, extra: dict[str, Path] | None = None) -> dict[str, ArtifactFile]:
    """Lists every file under ``root`` (and ``extra``: {name in the archive: source file}, for files the archiver
    adds itself) with its SHA-256 in ``root/archive-files.json``."""
    root = Path(root)
    files = {name: describe_file(root, name) for name in _archive_members(root)}
    for name, src in (extra or {}).items():
        files[name] = ArtifactFile(file=name, sha256=sha256_file(src), bytes=Path(src).stat().st_size)
    (root / ARCHIVE_FILES).write_text(json.dumps({k: v.model_dump() for k, v in sorted(files.items())}, indent=1))
    return files


def verify_archive_files(root: str | Path) -> bool:
    """Checks every file of an unpacked archive against ``archive-files.json``: none changed, none missing, none
    added. False when the folder has no such list (an export folder, whose spec.json covers it); raises
    ArtifactError on any difference."""
    root = Path(root)
    listing = root / ARCHIVE_FILES
    if not listing.is_file():
        return False
    try:
        files = {k: ArtifactFile.model_validate(v) for k, v in json.loads(listing.read_text()).items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{listing} is not a valid file list: {e}") from None
    present = set(_archive_members(root))
    added = sorted(present - set(files))
    if added:
        raise ArtifactError(f"{root}: file(s) not listed in {ARCHIVE_FILES}: {added[:5]}; the archive was changed "
                            f"after it was built")
    for name, info in files.items():
        _check_file(root / name, info, ARCHIVE_FILES, "the archive was changed after it was built; rebuild it "
                                                      "with `robustserve archive`")
    return True

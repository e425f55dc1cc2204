"""``robustserve export``: TorchScript and ONNX artifacts from a checkpoint, checked for parity before anything is
written.

Parity is measured against the eager model on held-out clean test images and on adversarial versions of them
(PGD inside the model's threat model; for an embedder, PGD that pushes each embedding away from its clean one),
at the full parity batch and at batch 1, since adversarial points sit near decision boundaries where small
numerical differences between engines show up first. Every check must hold: max |difference| of logits or
embeddings <= tolerance, identical top-1 and identical top-k sets (for an embedder: of nearest neighbours in the
clean parity set). On failure a :class:`ParityError` names each failing check and its figures, and nothing is
written: the artifacts are built in a temporary folder beside the destination, which replaces the destination
(and a previous export there) only once everything has passed.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field

from serving.runtime.artifacts import (
    MANIFEST_NAME,
    EvaluationSummary,
    ExportManifest,
    InputSpec,
    ParityCheck,
    ParityReport,
    ProbeCheck,
    describe_file,
    sha256_file,
)
from serving.runtime.probe_set import PROBES_FILE, ProbeSet
from serving.runtime.session import OnnxSession, TorchScriptSession
from serving.runtime.spec import Frozen, ModelSpec, ThreatModel
from serving.runtime.tasks import get_task

log = logging.getLogger(__name__)

TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"


class ParityError(ValueError):
    """An exported artifact disagrees with the eager model; nothing was written."""


class ExportConfig(Frozen):
    checkpoint: str = "runs/train/model.pt"
    out_dir: Optional[str] = None  # None: <checkpoint folder>/export
    name: Optional[str] = None  # the served model's name; None: <arch>-<method>
    opset: int = Field(18, ge=13)
    tolerance: float = Field(1e-4, gt=0)
    topk: int = Field(5, ge=1)
    parity_points: int = Field(32, ge=2)
    attack: Literal["pgd", "fgsm"] = "pgd"
    attack_steps: int = Field(10, ge=1)
    # None: the threat model the model was trained for, else an L-inf ball of 0.1 (Fashion-MNIST scale).
    threat: Optional[ThreatModel] = None
    probe_points: int = Field(256, ge=1)
    data: Optional[str] = None  # dataset for parity and probes; None: the one the model was trained on
    data_root: Optional[str] = None
    evaluation: Optional[str] = None  # None: evaluation.json beside the checkpoint, when it is current
    seed: int = 0
    num_threads: Optional[int] = Field(None, ge=1)
    # The served model's start-up bar on the probe set (accuracy, or Recall@1 for an embedder). None: the known
    # score (evaluation, else the trainer's test accuracy, else what the export measures) minus a chance margin.
    min_probe_score: Optional[float] = Field(None, ge=0.0, le=1.0)


def default_name(spec: ModelSpec) -> str:
    return f"{spec.arch}-{spec.method or 'untrained'}".replace("_", "-")


def export(cfg: ExportConfig) -> Path:
    """Writes the export folder and returns it; raises ParityError (nothing written) when a check fails."""
    from training.checkpoint import load_model

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    ckpt_path = Path(cfg.checkpoint)
    model, spec, ckpt = load_model(ckpt_path, map_location="cpu")
    model.eval()
    out = Path(cfg.out_dir) if cfg.out_dir else ckpt_path.parent / "export"
    name = cfg.name or default_name(spec)
    train_cfg = ckpt.get("config") or {}
    x_parity, y_parity, x_probe, y_probe, probe_ids = _held_out_points(cfg, spec, train_cfg)
    threat = cfg.threat or spec.threat_model or ThreatModel(norm="linf", eps=0.1, step=0.025)
    x_adv = _adversarial(model, spec, x_parity, y_parity, threat, cfg)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _chmod_like_mkdir(tmp)
        _write_torchscript(model, tmp / TORCHSCRIPT_FILE)
        with _quiet_exporter():
            _write_onnx(model, spec, tmp / ONNX_FILE, cfg.opset)
        # Parity through the sessions that serve (CPU here), with this process's thread count left as it is.
        threads = torch.get_num_threads()
        engines = {"torchscript": TorchScriptSession(tmp / TORCHSCRIPT_FILE, threads=threads, device="cpu").run,
                   "onnx": OnnxSession(tmp / ONNX_FILE, threads=threads, device="cpu").run}
        report = check_parity(model, spec, engines, x_parity, x_adv, cfg.tolerance, cfg.topk)
        report = report.model_copy(update={"attack": {"name": cfg.attack, "steps": cfg.attack_steps,
                                                      **threat.model_dump()}})
        with torch.no_grad():
            expected = engines["torchscript"](x_probe.numpy())
        ProbeSet(x=(x_probe * 255).round().to(torch.uint8).numpy(), y=y_probe.numpy(),
                 expected=expected, ids=probe_ids).save(tmp / PROBES_FILE)
        evaluation = _evaluation_summary(cfg, ckpt_path)
        files = {"torchscript": TORCHSCRIPT_FILE, "onnx": ONNX_FILE, "probes": PROBES_FILE,
                 **get_task(spec.task).export_files(spec, tmp)}
        manifest = ExportManifest(
            name=name,
            model=spec,
            input=InputSpec.from_spec(spec),
            output=get_task(spec.task).output,
            evaluation=evaluation,
            training_config=train_cfg or None,
            parity=report,
            probe_check=_probe_check(cfg, spec, expected, y_probe.numpy(), ckpt, evaluation),
            artifacts={key: describe_file(tmp, f) for key, f in files.items()},
            exported={"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                      "torch": torch.__version__, "onnx_opset": cfg.opset, "onnxruntime": _ort_version(),
                      "checkpoint": str(ckpt_path), "checkpoint_sha256": sha256_file(ckpt_path),
                      "epoch": ckpt.get("epoch")},
        )
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s", name, out)
    return out


# --- points --------------------------------------------------------------------------------------------------


def _held_out_points(cfg: ExportConfig, spec: ModelSpec, train_cfg: dict):
    """Parity and probe points from the test split: the tail of the evaluation's seeded permutation, so they are
    disjoint from any evaluation subset that leaves them out, and never training images."""
    from training.data import load_dataset

    data_cfg = train_cfg.get("data", {}) if isinstance(train_cfg, dict) else {}
    name = cfg.data or data_cfg.get("name")
    if not name:
        raise ValueError("the checkpoint records no dataset; pass --set data=<dataset>")
    same = cfg.data is None or cfg.data == data_cfg.get("name")
    test = load_dataset(name, "test", cfg.data_root or (data_cfg.get("root") if same else None),
                        **(data_cfg.get("options") or {} if same else {}))
    if (test.channels, *test.input_size) != (spec.channels, *spec.input_size):
        raise ValueError(f"dataset {name} holds {(test.channels, *test.input_size)} images; the model takes "
                         f"{(spec.channels, *spec.input_size)}")
    need = cfg.parity_points + cfg.probe_points
    if need > len(test):
        raise ValueError(f"parity_points + probe_points = {need} exceeds the {len(test)} test images")
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))
    tail = perm[len(test) - need:]
    x_par, y_par = test.get(tail[:cfg.parity_points])
    x_pro, y_pro = test.get(tail[cfg.parity_points:])
    ids = tuple(f"{name}/test/{int(i)}" for i in tail[cfg.parity_points:])
    return x_par, y_par, x_pro, y_pro, ids


def _adversarial(model: torch.nn.Module, spec: ModelSpec, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                 cfg: ExportConfig) -> torch.Tensor:
    return get_task(spec.task).parity_adversarial(model, x, y, threat, cfg.attack, cfg.attack_steps, cfg.seed)


# --- artifacts -----------------------------------------------------------------------------------------------


def _write_torchscript(model: torch.nn.Module, path: Path) -> None:
    # torch 2.13 marks TorchScript deprecated; it is still the differentiable twin the handlers need for
    # gradient-based probes (ONNX has no gradients), so the warning is acknowledged here, once.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        torch.jit.save(torch.jit.script(model), str(path))


def _write_onnx(model: torch.nn.Module, spec: ModelSpec, path: Path, opset: int) -> None:
    example = torch.rand(2, spec.channels, *spec.input_size)
    torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False, opset_version=opset,
                      input_names=["x"], output_names=[get_task(spec.task).output], verbose=False,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    if any(p.name.startswith(path.name) and p != path for p in path.parent.iterdir()):
        raise RuntimeError(f"the ONNX exporter wrote side files beside {path}; expected a single file")


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter logs every optimisation pass at INFO and warns about torchvision ops this project never
    uses; keep the export's own log readable."""
    names = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir", "torch._dynamo")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _chmod_like_mkdir(path: Path) -> None:
    # mkdtemp creates 0700 folders; the export should get the permissions a plain mkdir would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# --- parity --------------------------------------------------------------------------------------------------


def compare(ref: np.ndarray, got: np.ndarray, task: str, k: int, gallery: Optional[np.ndarray] = None
            ) -> tuple[float, bool, bool, int]:
    """(max |ref - got|, top-1 identical, top-k sets identical, k used) over rows [N, K or D]. The order that
    defines top-1/top-k is the task's :meth:`~serving.runtime.tasks.ServedTask.parity_scores` against
    ``gallery`` (the eager model's outputs on the clean parity points)."""
    if ref.shape != got.shape:
        return float("inf"), False, False, k
    diff = float(np.abs(ref.astype(np.float64) - got.astype(np.float64)).max()) if ref.size else 0.0
    t = get_task(task)
    s_ref, s_got = t.parity_scores(ref, gallery), t.parity_scores(got, gallery)
    k = min(k, s_ref.shape[1])
    top_ref = np.argsort(-s_ref, axis=1, kind="stable")[:, :k]
    top_got = np.argsort(-s_got, axis=1, kind="stable")[:, :k]
    top1 = bool((top_ref[:, 0] == top_got[:, 0]).all())
    topk = all(set(a) == set(b) for a, b in zip(top_ref.tolist(), top_got.tolist()))
    return diff, top1, topk, k


def check_parity(model: torch.nn.Module, spec: ModelSpec, engines: dict, x_clean: torch.Tensor,
                 x_adv: torch.Tensor, tolerance: float, k: int) -> ParityReport:
    """Runs every engine on clean and adversarial inputs at the full batch and at batch 1; raises ParityError
    listing each failed check."""
    with torch.no_grad():
        ref_clean = model(x_clean).numpy()
        ref_adv = model(x_adv).numpy()
    checks: dict[str, tuple[ParityCheck, ...]] = {}
    failures = []
    n = len(x_clean)
    singles = min(n, 4)
    for eng_name, run in engines.items():
        results = []
        for kind, x, ref in (("clean", x_clean, ref_clean), ("adversarial", x_adv, ref_adv)):
            xn = x.numpy()
            full = run(xn)
            one = np.concatenate([run(xn[i:i + 1]) for i in range(singles)])
            d1, t1, tk, kk = compare(ref, full, spec.task, k, ref_clean)
            d2, u1, uk, _ = compare(ref[:singles], one, spec.task, k, ref_clean)
            c = ParityCheck(inputs=kind, batch_sizes=(n, 1), max_abs_diff=max(d1, d2), top1_equal=t1 and u1,
                            topk_equal=tk and uk, k=kk)
            results.append(c)
            if not c.max_abs_diff <= tolerance:
                failures.append(f"{eng_name} on {kind} inputs: max |difference| {c.max_abs_diff:.3g} exceeds "
                                f"the tolerance {tolerance:g}")
            if not c.top1_equal:
                failures.append(f"{eng_name} on {kind} inputs: top-1 differs from the eager model")
            if not c.topk_equal:
                failures.append(f"{eng_name} on {kind} inputs: top-{kk} differs from the eager model")
        checks[eng_name] = tuple(results)
    if failures:
        raise ParityError("parity check failed, nothing written:\n  " + "\n  ".join(failures))
    return ParityReport(tolerance=tolerance, attack={}, checks=checks)


def _probe_check(cfg: ExportConfig, spec: ModelSpec, outputs: np.ndarray, y: np.ndarray, ckpt: dict,
                 ev: Optional[EvaluationSummary]) -> ProbeCheck:
    from serving.runtime.probe_set import clean_score, self_check_margin

    task = get_task(spec.task)
    measured = clean_score(outputs, y, spec.task)
    metric = task.clean_metric
    reference, source = task.probe_reference(ev, ckpt) or (measured, "measured at export")
    n = len(y)
    floor = cfg.min_probe_score if cfg.min_probe_score is not None else max(
        0.0, reference - self_check_margin(reference, n))
    if measured < floor:
        log.warning("the exported model scores %s %.3f on its %d probe images, below the start-up bar %.3f "
                    "(reference %.3f from %s): a server will refuse to load it", metric, measured, n, floor,
                    reference, source)
    return ProbeCheck(metric=metric, n=n, measured=measured, reference=reference, reference_source=source,
                      min_value=round(floor, 6))


# --- evaluation figures ------------------------------------------------------------------------------------------


def _evaluation_summary(cfg: ExportConfig, ckpt_path: Path) -> Optional[EvaluationSummary]:
    path = Path(cfg.evaluation) if cfg.evaluation else ckpt_path.parent / "evaluation.json"
    if not path.is_file():
        if cfg.evaluation:
            raise FileNotFoundError(f"evaluation report not found: {path}")
        log.warning("no evaluation.json beside %s: spec.json will carry no measured figures "
                    "(run `robustserve evaluate` first)", ckpt_path)
        return None
    report = json.loads(path.read_text())
    src = report.get("checkpoint")
    # A report may name its checkpoint relative to itself (a zoo entry does, so the entry can move).
    if src and ckpt_path.resolve() not in (Path(src).resolve(), (path.parent / src).resolve()):
        raise ValueError(f"{path} evaluates {src}, not {ckpt_path}")
    if not cfg.evaluation and path.stat().st_mtime < ckpt_path.stat().st_mtime:
        log.warning("%s is older than the checkpoint; leaving its figures out of spec.json", path)
        return None
    return get_task(report.get("task", "classification")).evaluation_summary(report, str(path))


# --- writing -----------------------------------------------------------------------------------------------------


def _replace_dir(new: Path, dest: Path) -> None:
    """Moves ``new`` to ``dest``; a previous ``dest`` is kept aside until the move has succeeded."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    try:
        os.replace(new, dest)
    except BaseException:
        if old is not None:
            os.replace(old / dest.name, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def summary(out: Path) -> dict[str, Any]:
    m = json.loads((out / MANIFEST_NAME).read_text())
    return {"dir": str(out), "name": m["name"], "files": {k: v["file"] for k, v in m["artifacts"].items()},
            "parity": {eng: {c["inputs"]: c["max_abs_diff"] for c in checks}
                       for eng, checks in m["parity"]["checks"].items()}}

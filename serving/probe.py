"""``robustserve probe``: one robustness probe, against a served model or offline against an archive.

Served (``model=<name>``): the probe runs inside the server (TorchServe's worker for that model) and this command
starts it with the inference token and the probe key from the server's work folder, polls its status and prints
the report. Offline (``archive=<.mar or export folder>``): the same measurement runs in this process on the
archive's own artifacts, probe set and gallery: what ``robustserve gate`` compares, and what a served probe must
equal.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml
from pydantic import Field, model_validator

from serving.runtime.probing.params import ProbeRequest, ProbeSettings
from serving.runtime.spec import Frozen
from serving.runtime.tasks import get_task
from serving.client import DEFAULT_WORKDIR, Instance

log = logging.getLogger(__name__)


class ProbeParams(Frozen):
    """What to attack with (see :class:`serving.runtime.probing.params.ProbeRequest`); None: the server's
    defaults (PGD, CW, APGD-CE at the model's eps, 20 steps, every probe image up to the cap; ES, QA-, GTT for a
    retrieval model)."""

    attacks: Optional[tuple[str, ...]] = None
    eps: Optional[tuple[float, ...]] = None
    steps: Optional[int] = Field(None, ge=1)
    step: Optional[float] = Field(None, gt=0)
    n: Optional[int] = Field(None, ge=1)
    seed: int = Field(0, ge=0)

    def request(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.model_dump().items() if v is not None}


class ProbeCommand(Frozen):
    workdir: str = DEFAULT_WORKDIR  # the served model's server: its work folder (addresses and keys are read there)
    model: Optional[str] = None  # a served model's name
    archive: Optional[str] = None  # offline: a .mar or an export folder
    probe: ProbeParams = ProbeParams()
    wait_s: float = Field(900.0, gt=0)  # how long to wait for a served probe's report
    poll_s: float = Field(0.5, gt=0)
    out: Optional[str] = None  # also write the report (JSON) here

    @model_validator(mode="after")
    def _one_target(self):
        if self.model is not None and self.archive is not None:
            raise ValueError("give one of model=<served model> or archive=<.mar or export folder>, not both")
        return self


class ProbeFailed(RuntimeError):
    def __init__(self, status: int, body: Any):
        msg = body.get("error", {}).get("message") if isinstance(body, dict) and isinstance(
            body.get("error"), dict) else body
        super().__init__(f"HTTP {status}: {msg}")
        self.status = status
        self.body = body


# --- served ------------------------------------------------------------------------------------------------------


def probe_headers(inst: Instance) -> dict[str, str]:
    key = inst.probe_key()
    if key is None:
        raise RuntimeError(f"no probe key in {inst.probe_key_file}: is the server running from {inst.work}, "
                           f"started by `robustserve serve` with probe_key on?")
    return {"X-Probe-Key": key, "Content-Type": "application/json"}


def start_served(client, model: str, params: ProbeParams) -> dict:
    """Starts a probe of a served model; returns the 202 answer's ``probe`` object (id, config)."""
    r = client.request("POST", f"/predictions/{model}", json.dumps({"probe": params.request()}).encode(),
                       probe_headers(client.inst))
    if r.status != 202:
        raise ProbeFailed(r.status, r.body)
    return r.body["probe"]


def poll_served(client, model: str, probe_id: str, wait_s: float, poll_s: float = 0.5) -> dict:
    """The finished report of probe ``probe_id`` (status ok, failed or timeout)."""
    deadline = time.monotonic() + wait_s
    body = json.dumps({"probe": {"action": "status", "id": probe_id}}).encode()
    while True:
        r = client.request("POST", f"/predictions/{model}", body, probe_headers(client.inst))
        if r.status == 200:
            return r.body["probe"]
        if r.status != 202:
            raise ProbeFailed(r.status, r.body)
        if time.monotonic() > deadline:
            raise TimeoutError(f"probe {probe_id} of {model} still running after {wait_s:g} s")
        time.sleep(poll_s)


def probe_served(inst: Instance, model: str, params: ProbeParams, wait_s: float = 900.0,
                 poll_s: float = 0.5) -> dict:
    from serving.client import Client

    client = Client(inst)
    try:
        started = start_served(client, model, params)
        return poll_served(client, model, started["id"], wait_s, poll_s)
    finally:
        client.close()


# --- offline -----------------------------------------------------------------------------------------------------


@contextmanager
def opened_archive(path: str | Path) -> Iterator[Path]:
    """An export folder as it is, or a .mar unpacked into a temporary folder (as TorchServe does)."""
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise FileNotFoundError(f"archive not found: {path} (a .mar or an export folder)")
    from serving.archive import extract_archive

    with tempfile.TemporaryDirectory(prefix="robustserve-probe-") as tmp:
        yield extract_archive(path, tmp)


def load_archive_service(root: Path, **kwargs: Any):
    """The runtime service of an unpacked archive or export folder, with the handler settings of its
    model-config.yaml when it has one."""
    from serving.runtime.schemas import ServiceSettings
    from serving.runtime.service import load_service

    cfg_file = root / "model-config.yaml"
    handler = (yaml.safe_load(cfg_file.read_text()) or {}).get("handler") if cfg_file.is_file() else None
    return load_service(root, ServiceSettings.model_validate(handler or {}), device="cpu", **kwargs)


def probe_offline(archive: str | Path, params: ProbeParams) -> dict:
    """A full probe report of an archive (.mar or export folder), measured in this process."""
    with opened_archive(archive) as root:
        return probe_service(load_archive_service(root), params, str(archive))


def probe_service(svc, params: ProbeParams, archive: str) -> dict:
    """A full probe report of a loaded service, measured in this process, on ``svc.probes``."""
    from serving.runtime.errors import RequestError
    from serving.runtime.probing.params import resolve
    from serving.runtime.probing.runner import identity, run_probe

    limits = svc.settings.probe
    # Offline there is no traffic to protect: the archive's caps on n and steps still apply, its clock
    # limits do not.
    tm = svc.spec.threat_model
    try:
        cfg = resolve(ProbeRequest.model_validate(params.request()), svc.spec.task, tm.eps if tm else None,
                      tuple(svc.spec.input_size), len(svc.probes) if svc.probes is not None else 0,
                      ProbeSettings(**{**limits.model_dump(), "timeout_s": 1e9}))
    except RequestError as e:
        raise ValueError(e.message) from None
    t0 = time.monotonic()
    started = time.time()
    report = {"id": "offline", "status": "ok", "error": None, "host": "offline", "archive": archive}
    report.update(run_probe(svc, svc.gradient_module(), cfg))
    report.update(identity(svc, cfg))
    report.update(started_unix=round(started, 3), duration_s=round(time.monotonic() - t0, 3))
    return report


# --- printing ----------------------------------------------------------------------------------------------------


def summarize(report: dict) -> str:
    """A few lines a person reads: the headline figures of a report."""
    res = report.get("results") or {}
    cfg = report.get("config") or {}
    head = (f"probe {report.get('id')} of {report.get('model')}: {report.get('status')} in "
            f"{report.get('duration_s', 0):.1f} s; attacks {cfg.get('attacks')} x {cfg.get('steps')} steps, "
            f"n {cfg.get('n')}, seed {cfg.get('seed')}")
    lines = [head]
    if report.get("error"):
        lines.append(f"  error: {report['error']}")
    if not res:
        return "\n".join(lines)
    lines += get_task(report.get("task")).summary_lines(res)
    lines.append(f"  model {report.get('artifacts')}, probe set {str(report.get('probe_set_sha256'))[:16]}..., "
                 f"versions {report.get('versions')}")
    return "\n".join(lines)


def run(cfg: ProbeCommand) -> int:
    if cfg.model is None and cfg.archive is None:
        raise ValueError("say what to probe: --set model=<served model> or --set archive=<.mar or export folder>")
    if cfg.archive is not None:
        report = probe_offline(cfg.archive, cfg.probe)
    else:
        report = probe_served(Instance.at(cfg.workdir), cfg.model, cfg.probe, cfg.wait_s, cfg.poll_s)
    print(summarize(report))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=1))
        print(f"report: {cfg.out}")
    return 0 if report.get("status") == "ok" else 1

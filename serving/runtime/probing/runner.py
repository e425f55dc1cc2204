"""The probe API of a served model: authenticate, validate, start the probe in a background thread, answer at
once, and keep the report.

A probe never runs in the thread that answers requests: ``start`` answers 202 with the probe's id while the
attack runs beside regular traffic (its own torch threads; the serving session keeps its own), and ``status``
answers the report once it is written. One probe per model runs at a time (across worker processes), starts are
rate-limited, every probe has a timeout, and every report (also failed and timed-out ones) is appended to the
model's history.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import logging
import platform
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import ValidationError

from serving.runtime.errors import InvalidInput, RequestError
from serving.runtime.probing.history import Busy, ProbeGate, ProbeHistory, RateLimited
from serving.runtime.probing.params import ProbeConfig, ProbeRequest, ProbeSettings, resolve

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
# How a server hands its workers the probe key's file and the folder of the probe gate and history (shared by a
# model's workers): set by `robustserve serve`, read by the handlers.
PROBE_KEY_ENV = "ROBUSTSERVE_PROBE_KEY_FILE"
PROBE_DIR_ENV = "ROBUSTSERVE_PROBE_DIR"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "numpy", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # an engine that is not installed is reported as such
            out[mod] = "absent"
    try:
        from importlib.metadata import version

        out["robustserve"] = version("robustserve")
    except Exception:
        out["robustserve"] = "unknown"
    return out


class ProbeRunner:
    """Probes of one service. ``key_sha256``: SHA-256 of the probe key (None: probes refused); ``state_dir``:
    where the gate and the history live (shared by the model's workers); ``on_report``: called in the probe's
    thread with every finished report (metrics)."""

    def __init__(self, service: Any, settings: ProbeSettings, state_dir: str | Path,
                 key_sha256: Optional[str], on_report: Optional[Callable[[dict], None]] = None):
        self.service = service
        self.settings = settings
        self.state_dir = Path(state_dir)
        self.key_sha256 = key_sha256
        self.on_report = on_report
        self.gate = ProbeGate(self.state_dir, service.name)
        self.history = ProbeHistory(self.state_dir / service.name / HISTORY_FILE)
        self._thread: Optional[threading.Thread] = None
        # Reports the history could not take (a full disk): kept so their status still answers, saying so.
        self._unrecorded: dict[str, dict] = {}
        self._module = None
        self._module_lock = threading.Lock()

    # --- requests ----------------------------------------------------------------------------------------------

    def handle(self, body: Any, key: Optional[str]) -> tuple[int, dict]:
        """A probe request's answer: (HTTP status, JSON body)."""
        try:
            self._authorize(key)
            if not isinstance(body, dict):
                raise InvalidInput("'probe' must be a JSON object, e.g. {\"probe\": {\"attacks\": [\"pgd\"]}}")
            try:
                req = ProbeRequest.model_validate(body)
            except ValidationError as e:
                raise InvalidInput("probe: " + "; ".join(
                    f"{'.'.join(map(str, err['loc'])) or '<probe>'}: {err['msg']}" for err in e.errors())) from None
            if req.action == "start":
                return self.start(req)
            if req.action == "last":
                rep = self.history.last()
                if rep is None:
                    raise RequestError(f"no probe of {self.service.name} has finished yet", status=404,
                                       code="not_found")
                return 200, {"probe": rep}
            if req.id is None:
                raise InvalidInput("probe action 'status' needs the probe's 'id'")
            return self.status(req.id)
        except RequestError as e:
            return e.status, e.to_dict()

    def _authorize(self, key: Optional[str]) -> None:
        if not self.settings.enabled:
            raise RequestError(f"probes of {self.service.name} are disabled in its model-config.yaml",
                               status=403, code="probes_disabled")
        if self.key_sha256 is None:
            raise RequestError("probes are disabled on this server: no probe key was issued (start the server "
                               "with `robustserve serve`, which writes probe_key.json)", status=403,
                               code="probes_disabled")
        if not key:
            raise RequestError("a probe needs the probe key in the X-Probe-Key header", status=401,
                               code="probe_key_missing")
        if not hmac.compare_digest(key_digest(key), self.key_sha256):
            raise RequestError("the probe key is wrong", status=403, code="probe_key_wrong")

    def start(self, req: ProbeRequest) -> tuple[int, dict]:
        svc = self.service
        probes = svc.probes
        tm = svc.spec.threat_model
        cfg = resolve(req, svc.spec.task, tm.eps if tm else None, tuple(svc.spec.input_size),
                      len(probes) if probes is not None else 0, self.settings)
        probe_id = uuid.uuid4().hex[:16]
        self._mark_lost()
        try:
            fd = self.gate.acquire(probe_id, self.settings.min_interval_s)
        except OSError as e:
            raise RequestError(f"cannot start a probe of {svc.name}: its state folder {self.state_dir} is not "
                               f"writable ({e.strerror or e}); free space there and retry", status=507,
                               code="insufficient_storage") from None
        except Busy as e:
            raise RequestError(f"a probe of {svc.name} is already running (id {e.running.get('id')}); one runs at "
                               f"a time: ask for its status or try again when it has finished", status=409,
                               code="probe_running") from None
        except RateLimited as e:
            err = RequestError(f"probes of {svc.name} are rate-limited to one start every "
                               f"{self.settings.min_interval_s:g} s; retry in {e.retry_after_s:.1f} s",
                               status=429, code="rate_limited")
            raise err from None
        t = threading.Thread(target=self._run, args=(probe_id, cfg, fd), name=f"probe-{probe_id}", daemon=True)
        try:
            t.start()
        except BaseException:
            ProbeGate.release(fd)
            raise
        self._thread = t
        return 202, {"probe": {"id": probe_id, "status": "running", "model": svc.name,
                               "config": cfg.model_dump(mode="json"), "timeout_s": self.settings.timeout_s,
                               "poll": {"probe": {"action": "status", "id": probe_id}}}}

    def status(self, probe_id: str) -> tuple[int, dict]:
        # Clients poll this while a probe runs: answer from the small state file before reading the history (the
        # gate marks a probe finished only after its report is appended).
        running = self.gate.running()
        if running and running.get("id") == probe_id:
            return 202, {"probe": {"id": probe_id, "status": "running", "model": self.service.name,
                                   "running_s": round(time.time() - float(running.get("started_unix", 0)), 1)}}
        self._mark_lost()
        rep = self.history.find(probe_id) or self._unrecorded.get(probe_id)
        if rep is not None:
            return 200, {"probe": rep}
        raise RequestError(f"no probe {probe_id} of {self.service.name} (running or in its history)", status=404,
                           code="not_found")

    def _mark_lost(self) -> None:
        """A probe whose worker died mid-run ends in the history as ``lost``, once (under the gate's lock, so two
        workers noticing it together record it once)."""
        state = self.gate.lost()
        if state is None or self.history.find(state["id"]) is not None:
            return
        try:
            fd = self.gate.acquire_for_cleanup()
        except (Busy, OSError):
            return
        try:
            state = self.gate.lost()
            if state is None or self.history.find(state["id"]) is not None:
                return
            started = float(state.get("started_unix", 0.0))
            self.history.append({"id": state["id"], "status": "lost", "model": self.service.name, "results": None,
                                 "error": f"the worker (pid {state.get('pid')}) running this probe died before it "
                                          f"finished", "started": _iso(started), "started_unix": round(started, 3),
                                 "duration_s": None})
            log.warning("probe %s of %s was lost with its worker (pid %s)", state["id"], self.service.name,
                        state.get("pid"))
        except OSError:
            log.exception("could not record the lost probe %s", state.get("id") if state else None)
        finally:
            ProbeGate.release(fd)

    def wait(self, timeout: Optional[float] = None) -> None:
        """Blocks until the probe started last has finished (tests, in-process hosts)."""
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the probe ---------------------------------------------------------------------------------------------

    def _run(self, probe_id: str, cfg: ProbeConfig, fd: int) -> None:
        started = time.time()
        t0 = time.monotonic()
        report: dict[str, Any] = {"id": probe_id, "status": "failed", "results": None, "error": None}
        try:
            import torch

            torch.set_num_threads(self.settings.threads)
            report.update(run_probe(self.service, self._twin(), cfg, deadline=t0 + self.settings.timeout_s))
            report["status"] = "ok"
        except TimeoutError as e:
            report.update(status="timeout", error=f"stopped after {self.settings.timeout_s:g} s: {e}")
        except Exception as e:  # a failed probe is reported, never fatal to the worker
            log.exception("probe %s of %s failed", probe_id, self.service.name)
            report["error"] = f"{type(e).__name__}: {e}"
        finally:
            report.update(identity(self.service, cfg))
            report.update(started=_iso(started), finished=_iso(time.time()), started_unix=round(started, 3),
                          duration_s=round(time.monotonic() - t0, 3))
            try:
                self.history.append(report)
            except Exception as e:
                log.exception("probe %s: could not append the report to %s", probe_id, self.history.path)
                report["history_error"] = (f"the report could not be written to the probe history ({e}); it is "
                                           f"kept in this worker's memory only")
                self._unrecorded[probe_id] = report
                while len(self._unrecorded) > 16:  # a disk that stays full must not grow this without bound
                    self._unrecorded.pop(next(iter(self._unrecorded)))
            finally:
                try:
                    ProbeGate.release(fd)
                except Exception:  # the lock itself is released even when the state file cannot be written
                    log.exception("probe %s: could not mark the probe finished in %s", probe_id,
                                  self.gate.state_path)
        log.info("probe %s of %s: %s in %.1f s", probe_id, self.service.name, report["status"],
                 report["duration_s"])
        if self.on_report is not None:
            try:
                self.on_report(report)
            except Exception:
                log.exception("probe %s: publishing its metrics failed", probe_id)

    def _twin(self):
        with self._module_lock:
            if self._module is None:
                self._module = self.service.gradient_module()
            return self._module


def run_probe(service: Any, module: Any, cfg: ProbeConfig, deadline: Optional[float] = None) -> dict:
    """The measurement part of a report, for ``service`` (a ModelService) with gradients from ``module``."""
    from serving.runtime.tasks import get_task

    if service.probes is None:
        raise InvalidInput("this model's archive holds no probe set")
    device = str(next(iter(module.parameters())).device)
    return {"results": get_task(cfg.task).measure(service, module, cfg, deadline, device)}


def identity(service: Any, cfg: ProbeConfig) -> dict:
    """What makes a report repeatable: the model and probe-set hashes, the attack config and seed, versions."""
    arts = service.manifest.artifacts
    return {"model": service.name, "version": service.version, "task": cfg.task,
            "config": cfg.model_dump(mode="json"), "seed": cfg.seed,
            "artifacts": {k: arts[k].sha256 for k in ("torchscript", "onnx") if k in arts},
            "probe_set_sha256": service.probes.sha256() if service.probes is not None else None,
            "engines": {"gradients": "torchscript", "scoring": service.engine},
            "versions": versions()}


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")

"""``robustserve monitor``: robustness probes of served models on a schedule, with metrics, an SLO and an alert.

Every ``interval_s`` each model is probed inside the server (as ``robustserve probe model=...`` does). The
server is found over HTTP from its work folder (``workdir``: addresses and keys), so the monitor also runs as a
sidecar in another container; while the server does not answer, it looks again every ``retry_s``. A model's
headline figure (worst-case robust accuracy at the smallest eps for a classifier, Recall@1 under the
embedding-shift attack for a retrieval model) is held against the model's floor: below it ``alert_after``
probes in a row, the model's alert is raised; one probe back at or above the floor clears it. A probe that
fails, times out or is refused counts in ``robustserve_monitor_probes_total`` and leaves the last figures as they
were.

The monitor listens on loopback (``host``/``port``) with prometheus-client's registry:
- ``/metrics``: the ``robustserve_monitor_*`` metrics (see ``deploy/monitoring/`` for the dashboard and rules);
- ``/ready``: 200 while the server answers and every model has a successful probe and no alert, else 503, with a
  JSON body saying why: a robustness-aware readiness signal (a Kubernetes ``readinessProbe`` on it);
- ``/healthz``: 200 while the monitor runs; ``/status``: the state as JSON.
Each probe's report and the SLO state after it are appended to ``history`` (crash-safe JSON lines).
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import Field, model_validator

from serving.probe import ProbeFailed, ProbeParams, probe_served
from serving.runtime.probing.history import ProbeHistory
from serving.runtime.probing.metrics import PROBE_METRICS, report_samples
from serving.runtime.spec import Frozen
from serving.runtime.tasks import get_task
from serving.client import DEFAULT_WORKDIR, Instance, workdir_args
from serving.serve import is_loopback, status

log = logging.getLogger(__name__)

PREFIX = "robustserve_monitor_"
# The server's probe metric names, renamed for the monitor where a name alone would be ambiguous here.
RENAME = {"duration_seconds": "probe_duration_seconds", "runs_total": "probes_total"}


class MonitorConfig(Frozen):
    workdir: str = DEFAULT_WORKDIR  # the server's work folder (addresses and keys are read there)
    models: tuple[str, ...] = ()  # empty: every model the server serves
    interval_s: float = Field(600.0, gt=0)
    floor: float = Field(0.5, ge=0.0, le=1.0)  # worst-case robust accuracy, or Recall@1 under attack
    floors: dict[str, float] = Field(default_factory=dict)  # per model, over ``floor``
    alert_after: int = Field(1, ge=1)  # consecutive probes below the floor that raise the alert
    probe: ProbeParams = ProbeParams()
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535)  # 0: any free port (printed)
    allow_non_loopback: bool = False
    history: Optional[str] = None  # None: <workdir>/monitor/history.jsonl
    rounds: Optional[int] = Field(None, ge=1)  # stop after this many rounds; None: until SIGTERM/SIGINT
    wait_s: float = Field(900.0, gt=0)  # longest wait for one probe's report
    retry_s: float = Field(10.0, gt=0)  # while the server does not answer: how often to look again
    # A model whose last successful probe is older than this is stale: /ready answers 503 and the stale gauge
    # is 1. None: two intervals plus one probe's longest wait (one missed round is tolerated, two are not).
    max_age_s: Optional[float] = Field(None, gt=0)

    @property
    def stale_after_s(self) -> float:
        return self.max_age_s if self.max_age_s is not None else 2 * self.interval_s + self.wait_s

    @model_validator(mode="after")
    def _check(self):
        if not self.allow_non_loopback and not is_loopback(self.host):
            raise ValueError(f"host {self.host!r} is not a loopback address; set allow_non_loopback=true to expose "
                             f"the monitor's endpoints beyond this machine")
        bad = {m: f for m, f in self.floors.items() if not 0.0 <= f <= 1.0}
        if bad:
            raise ValueError(f"floors must lie in [0, 1], got {bad}")
        return self


def headline(report: dict) -> Optional[float]:
    """The SLO figure of a successful report (its task's :meth:`~serving.runtime.tasks.ServedTask.headline`:
    worst case for a classifier, attacked Recall@1 for a retrieval model, at the smallest eps)."""
    res = report.get("results")
    if report.get("status") != "ok" or not res:
        return None
    return get_task(report.get("task")).headline(res)


class Monitor:
    def __init__(self, cfg: MonitorConfig):
        self.cfg = cfg
        self.inst = Instance.at(cfg.workdir)
        self.registry = CollectorRegistry()
        self.history = ProbeHistory(Path(cfg.history) if cfg.history else
                                    self.inst.work / "monitor" / "history.jsonl")
        self._gauges: dict[str, Gauge] = {}
        self._series: dict[str, set[tuple[str, tuple[str, ...]]]] = {}  # model -> its probe gauges' label values
        self._counter = Counter(PREFIX + "probes", "Probes by outcome: ok, failed, timeout, refused",
                                ["model", "status"], registry=self.registry)
        for suffix, (kind, unit, labels) in PROBE_METRICS.items():
            if kind == "gauge":
                name = PREFIX + RENAME.get(suffix, suffix)
                self._gauges[suffix] = Gauge(name, f"Latest successful probe: {suffix.replace('_', ' ')} ({unit})",
                                             ["model", *labels], registry=self.registry)
        self.floor_g = Gauge(PREFIX + "robust_accuracy_floor_ratio", "The configured floor of the SLO figure",
                             ["model"], registry=self.registry)
        self.slo_g = Gauge(PREFIX + "slo_ok", "1 while the latest SLO figure is at or above the floor",
                           ["model"], registry=self.registry)
        self.alert_g = Gauge(PREFIX + "alert", "1 while the robustness alert is raised", ["model"],
                             registry=self.registry)
        self.interval_g = Gauge(PREFIX + "probe_interval_seconds", "Seconds between scheduled probes", ["model"],
                                registry=self.registry)
        self.ready_g = Gauge(PREFIX + "ready", "1 when every monitored model meets its floor",
                             registry=self.registry)
        self.up_g = Gauge(PREFIX + "server_up", "1 while the server of the work folder answers with its keys",
                          registry=self.registry)
        self.server_down: Optional[str] = None  # why the server is not reachable, None while it is
        self.stale_g = Gauge(PREFIX + "stale", "1 while the model's latest successful probe is older than "
                             "max_age_s (or there has been none for that long)", ["model"], registry=self.registry)
        self.max_age_g = Gauge(PREFIX + "max_age_seconds", "Age past which a model's robustness figure is stale",
                               registry=self.registry)
        self.max_age_g.set(cfg.stale_after_s)
        self.started = time.time()
        self.state: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.httpd: Optional[ThreadingHTTPServer] = None

    def floor(self, model: str) -> float:
        return self.cfg.floors.get(model, self.cfg.floor)

    def models(self) -> Optional[list[str]]:
        """The models to probe this round; None while the server of the work folder does not answer."""
        st = status(self.inst)
        up = st["running"] and "error" not in st
        self.up_g.set(1.0 if up else 0.0)
        if not up:
            why = st.get("error") or f"no TorchServe answers from {st['workdir']}"
            if self.server_down != why:
                log.warning("%s; looking again every %g s (start it with: robustserve serve%s)", why,
                            self.cfg.retry_s, workdir_args(self.inst.work))
            self.server_down = why
            return None
        if self.server_down is not None:
            log.info("the server of %s answers again", self.inst.work)
        self.server_down = None
        return list(self.cfg.models) if self.cfg.models else sorted(st["models"])

    # --- one round ---------------------------------------------------------------------------------------------

    def probe_model(self, model: str) -> dict[str, Any]:
        try:
            report = probe_served(self.inst, model, self.cfg.probe, self.cfg.wait_s)
            outcome = str(report.get("status"))
        except ProbeFailed as e:
            report, outcome = {"status": "refused", "error": str(e)}, "refused" if e.status in (409, 429) else "failed"
        except Exception as e:  # an unreachable server is an outcome to count, not a reason to stop monitoring
            log.warning("probe of %s failed: %s", model, e)
            report, outcome = {"status": "failed", "error": f"{type(e).__name__}: {e}"}, "failed"
        self.record(model, report, outcome)
        return report

    def record(self, model: str, report: dict, outcome: str) -> None:
        with self.lock:
            if model not in self.state:
                # Every outcome's series exists from the first probe on, so rate() and increase() see a first
                # failure as a change from 0.
                for outcome_ in ("ok", "failed", "timeout", "refused"):
                    self._counter.labels(model, outcome_)
            st = self.state.setdefault(model, {"below": 0, "alert": False, "figure": None, "probes": 0})
            st["probes"] += 1
            st["last_outcome"] = outcome
            self._counter.labels(model, outcome).inc()
            self.floor_g.labels(model).set(self.floor(model))
            self.interval_g.labels(model).set(self.cfg.interval_s)
            fig = headline(report) if outcome == "ok" else None
            if fig is not None:
                self._replace_series(model, report)
                st["figure"] = fig
                st["last_success"] = report.get("started_unix") or time.time()
                st["below"] = st["below"] + 1 if fig < self.floor(model) else 0
                if st["below"] >= self.cfg.alert_after:
                    if not st["alert"]:
                        log.warning("ALERT %s: robustness %.3f below the floor %.3f (%d probe(s) in a row)", model,
                                    fig, self.floor(model), st["below"])
                    st["alert"] = True
                elif st["below"] == 0:
                    st["alert"] = False
                self.slo_g.labels(model).set(1.0 if fig >= self.floor(model) else 0.0)
            self.alert_g.labels(model).set(1.0 if st["alert"] else 0.0)
            ready, _ = self._readiness()
            self.ready_g.set(1.0 if ready else 0.0)
            slo = {k: st[k] for k in ("figure", "below", "alert")}
        self.history.append({"model": model, "outcome": outcome, "floor": self.floor(model), "slo": slo,
                             "time": time.time(), "report": report})

    def _replace_series(self, model: str, report: dict) -> None:
        """The model's probe gauges become exactly this report's: a series an earlier probe set and this one does
        not measure (another eps or attack, a check not made) is removed, not left with an old value."""
        now = {}
        for suffix, labels, value in report_samples(report):
            if suffix in self._gauges:
                now[(suffix, tuple(labels.values()))] = value
        for suffix, labels in self._series.get(model, set()) - now.keys():
            self._gauges[suffix].remove(model, *labels)
        for (suffix, labels), value in now.items():
            self._gauges[suffix].labels(model, *labels).set(value)
        self._series[model] = set(now)

    def round(self) -> bool:
        """Probes every model once; False when the server did not answer (nothing was probed)."""
        models = self.models()
        with self.lock:
            self.ready_g.set(1.0 if self._readiness()[0] else 0.0)
        if models is None:
            return False
        for model in models:
            if self.stop.is_set():
                break
            self.probe_model(model)
        return True

    # --- readiness ---------------------------------------------------------------------------------------------

    def refresh_staleness(self) -> None:
        with self.lock:
            self._readiness()

    def _readiness(self) -> tuple[bool, dict[str, Any]]:
        """Also sets the stale and ready gauges, so a scrape between rounds sees figures age."""
        models = {}
        now = time.time()
        max_age = self.cfg.stale_after_s
        for model in (self.cfg.models or sorted(self.state)):
            st = self.state.get(model)
            last = (st or {}).get("last_success")
            age = now - (last if last is not None else self.started)
            stale = age > max_age
            self.stale_g.labels(model).set(1.0 if stale else 0.0)
            if self.server_down is not None:
                models[model] = {"ready": False, "why": f"server not reachable: {self.server_down}",
                                 "stale": stale}
            elif st is None or st.get("figure") is None:
                models[model] = {"ready": False, "why": "no successful probe yet", "stale": stale}
            elif stale:
                models[model] = {"ready": False, "why": f"no successful probe for {age:.0f} s (max_age_s "
                                                        f"{max_age:g}); last outcome {st.get('last_outcome')}",
                                 "figure": st["figure"], "stale": True}
            elif st["alert"]:
                models[model] = {"ready": False, "why": f"robustness {st['figure']:.3f} below the floor "
                                                        f"{self.floor(model):.3f}", "figure": st["figure"]}
            else:
                models[model] = {"ready": True, "figure": st["figure"], "floor": self.floor(model)}
        ready = bool(models) and all(m["ready"] for m in models.values())
        self.ready_g.set(1.0 if ready else 0.0)
        return ready, models

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        with self.lock:
            return self._readiness()

    # --- HTTP --------------------------------------------------------------------------------------------------

    def serve_http(self) -> int:
        monitor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the http.server hook name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    monitor.refresh_staleness()
                    self._send(200, generate_latest(monitor.registry), CONTENT_TYPE_LATEST)
                elif path == "/ready":
                    ready, models = monitor.readiness()
                    doc = {"ready": ready, "models": models}
                    if monitor.server_down is not None:
                        doc["server"] = monitor.server_down
                    self._json(200 if ready else 503, doc)
                elif path == "/healthz":
                    self._json(200, {"alive": True})
                elif path == "/status":
                    with monitor.lock:
                        self._json(200, {"models": monitor.state, "interval_s": monitor.cfg.interval_s})
                else:
                    self._json(404, {"error": f"no {path}; try /metrics, /ready, /healthz or /status"})

            def _json(self, code: int, doc: Any) -> None:
                self._send(code, json.dumps(doc).encode(), "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):  # keep access logs out of the monitor's log
                log.debug(fmt, *args)

        self.httpd = ThreadingHTTPServer((self.cfg.host, self.cfg.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, name="monitor-http", daemon=True).start()
        return self.httpd.server_address[1]

    def close(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


def run(cfg: MonitorConfig) -> int:
    mon = Monitor(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: mon.stop.set())
    port = mon.serve_http()
    print(f"monitor: http://{cfg.host}:{port}/metrics, /ready, /status; probing every {cfg.interval_s:g} s; "
          f"history {mon.history.path}", flush=True)
    rounds = 0
    try:
        while not mon.stop.is_set():
            before = mon.server_down
            try:
                answered = mon.round()
            except Exception:  # noqa: BLE001 - e.g. the history's disk is full: keep serving /ready and metrics
                log.exception("monitor round failed; trying again in %g s", cfg.retry_s)
                answered = False
            if not answered:
                if mon.server_down != before:
                    print(f"waiting for the server: {mon.server_down}", flush=True)
                mon.stop.wait(cfg.retry_s)
                continue
            rounds += 1
            ready, models = mon.readiness()
            print(f"round {rounds}: " + ", ".join(
                f"{m}: {'ok' if s['ready'] else s['why']}" for m, s in models.items()), flush=True)
            if cfg.rounds is not None and rounds >= cfg.rounds:
                break
            mon.stop.wait(cfg.interval_s)
    finally:
        mon.close()
    ready, _ = mon.readiness()
    return 0 if ready else 1

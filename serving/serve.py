"""``robustserve serve [--foreground] | stop | status | health``: run TorchServe on a model store with safe defaults.

``serve`` writes ``config.properties`` and ``metrics.yaml`` from a :class:`ServeConfig` into the work folder and
starts TorchServe there, with its own temp folder (pid file, worker sockets, unpacked archives), so instances with
different work folders and ports run side by side. Defaults: every listener (HTTP and gRPC) on 127.0.0.1, token
authorization on, the model registration API off, ``allowed_urls`` limited to the local model store, Prometheus
metrics, request and response size limits. ``serve`` returns once every model has a READY worker.

Token authorization: TorchServe writes ``key_file.json`` into the work folder; every inference and management call
(``/ping`` included) needs ``Authorization: Bearer <key>`` with the inference or management key. The metrics port
needs none.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, model_validator

from serving.client import DEFAULT_WORKDIR, Instance, workdir_args
from serving.runtime.probing.runner import PROBE_DIR_ENV, PROBE_KEY_ENV
from serving.runtime.spec import Frozen

log = logging.getLogger(__name__)



class Ports(Frozen):
    inference: int = Field(8080, ge=1, le=65535)
    management: int = Field(8081, ge=1, le=65535)
    metrics: int = Field(8082, ge=1, le=65535)
    grpc_inference: int = Field(7070, ge=1, le=65535)
    grpc_management: int = Field(7071, ge=1, le=65535)

    @model_validator(mode="after")
    def _distinct(self):
        values = list(self.model_dump().values())
        if len(set(values)) != len(values):
            raise ValueError(f"ports must be distinct, got {self.model_dump()}")
        return self


class ServeConfig(Frozen):
    model_store: str = "model_store"
    models: tuple[str, ...] = ()  # archive names in the store (with or without .mar); empty: every archive
    workdir: str = DEFAULT_WORKDIR  # config, logs, key file and temp folder of this instance
    host: str = "127.0.0.1"  # inference, metrics and gRPC inference listeners
    management_host: Optional[str] = None  # management and gRPC management; None: host
    allow_non_loopback: bool = False  # binding beyond loopback (e.g. inside a container) must be asked for
    ports: Ports = Ports()
    token_auth: bool = True
    token_expiration_min: int = Field(60, ge=1)
    # On-demand robustness probes need a key of their own (X-Probe-Key), besides the inference token; serve
    # writes a fresh one to <workdir>/probe_key.json (mode 0600). false: every probe is refused.
    probe_key: bool = True
    model_api: bool = False  # register/unregister over HTTP; off: only the archives named here are served
    metrics_mode: Literal["prometheus", "log"] = "prometheus"
    max_request_size: int = Field(6 << 20, ge=1024)  # bytes; the handler's own image limits are tighter
    max_response_size: int = Field(6 << 20, ge=1024)
    job_queue_size: int = Field(256, ge=1)
    default_workers_per_model: int = Field(1, ge=1)
    netty_threads: int = Field(0, ge=0)  # 0: TorchServe's default (one per core)
    response_timeout_s: int = Field(120, ge=1)
    ready_timeout_s: float = Field(180.0, gt=0)
    java_heap: Optional[str] = None  # e.g. "1g": -Xmx for the frontend
    stop_timeout_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _check(self):
        for h in (self.host, self.management_host or self.host):
            if not self.allow_non_loopback and not is_loopback(h):
                raise ValueError(f"host {h!r} is not a loopback address; set allow_non_loopback=true to expose "
                                 f"the listeners beyond this machine (and keep token_auth on)")
        if self.java_heap is not None and not re.fullmatch(r"\d+[kKmMgG]?", self.java_heap):
            raise ValueError(f"java_heap must look like 512m or 2g, got {self.java_heap!r}")
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- files ---------------------------------------------------------------------------------------------------------


def _listen(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listen_address(cfg: ServeConfig, api: str) -> str:
    """The ``inference``, ``management`` or ``metrics`` listener address that ``cfg`` configures."""
    host = (cfg.management_host or cfg.host) if api == "management" else cfg.host
    return _listen(host, getattr(cfg.ports, api))


def archives(cfg: ServeConfig) -> list[Path]:
    store = Path(cfg.model_store)
    if not store.is_dir():
        raise FileNotFoundError(f"model store not found: {store} (build archives with `robustserve archive`)")
    if cfg.models:
        paths = [store / (m if m.endswith(".mar") else f"{m}.mar") for m in cfg.models]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"archive(s) not found: {', '.join(missing)}")
        return paths
    paths = sorted(store.glob("*.mar"))
    if not paths:
        raise FileNotFoundError(f"no .mar archives in {store} (build them with `robustserve archive`)")
    return paths


def config_properties(cfg: ServeConfig) -> str:
    store = Path(cfg.model_store).resolve()
    work = Path(cfg.workdir).resolve()
    p = cfg.ports
    mhost = cfg.management_host or cfg.host
    props: dict[str, Any] = {
        **{f"{api}_address": listen_address(cfg, api) for api in ("inference", "management", "metrics")},
        # gRPC listeners start whether or not they are configured: pin them to the same hosts.
        "grpc_inference_address": cfg.host,
        "grpc_inference_port": p.grpc_inference,
        "grpc_management_address": mhost,
        "grpc_management_port": p.grpc_management,
        "model_store": store,
        "workflow_store": store,
        "load_models": ",".join(a.name for a in archives(cfg)),
        "disable_token_authorization": str(not cfg.token_auth).lower(),
        "token_expiration_min": cfg.token_expiration_min,
        "enable_model_api": str(cfg.model_api).lower(),
        # Only archives from the local store; never a remote URL.
        "allowed_urls": "file://" + re.escape(str(store)) + "/[^/]+\\.mar",
        "metrics_mode": cfg.metrics_mode,
        "metrics_config": work / "metrics.yaml",
        "max_request_size": cfg.max_request_size,
        "max_response_size": cfg.max_response_size,
        "job_queue_size": cfg.job_queue_size,
        "default_workers_per_model": cfg.default_workers_per_model,
        "default_response_timeout": cfg.response_timeout_s,
        "install_py_dep_per_model": "false",
        "enable_envvars_config": "false",
        # Workers hand JSON and text bodies to the handler as bytes: it parses them itself, with its size,
        # value-count, depth and number limits (TorchServe's own json.loads has none and runs before any check).
        "decode_input_request": "false",
    }
    if cfg.netty_threads:
        props["number_of_netty_threads"] = cfg.netty_threads
    if cfg.java_heap:
        props["vmargs"] = f"-Xmx{cfg.java_heap} -XX:+ExitOnOutOfMemoryError"
    lines = ["# Written by `robustserve serve` from its ServeConfig; edit the config, not this file."]
    lines += [f"{k}={_escape(str(v))}" for k, v in props.items()]
    return "\n".join(lines) + "\n"


def _escape(v: str) -> str:
    # Java properties treat a backslash as an escape: double it so regexes survive.
    return v.replace("\\", "\\\\")


# Custom metrics the handlers emit; TorchServe drops model metrics that metrics.yaml does not declare.
HANDLER_METRICS = {
    "counter": [{"name": "InvalidRequests", "unit": "Count"}, {"name": "InferredImages", "unit": "Count"}],
    "gauge": [{"name": "HandlerTime", "unit": "ms"}, {"name": "PredictionTime", "unit": "ms"},
              {"name": "DecodeTime", "unit": "ms"}, {"name": "InferenceTime", "unit": "ms"}],
}


def _probe_metric_decls() -> dict[str, list[dict]]:
    from serving.runtime.probing.metrics import CONFIG_LABEL, PROBE_METRICS, SERVER_PREFIX

    out: dict[str, list[dict]] = {}
    for suffix, (kind, unit, labels) in PROBE_METRICS.items():
        extra = [CONFIG_LABEL] if kind == "gauge" else []
        out.setdefault(kind, []).append({"name": SERVER_PREFIX + suffix, "unit": unit,
                                         "dimensions": ["ModelName", "Level", *labels, *extra]})
    return out


def metrics_yaml() -> str:
    host = ["Level", "Hostname"]
    model = ["model_name", "model_version", "hostname"]
    doc = {
        "dimensions": ["ModelName", "WorkerName", "Level", "DeviceId", "Hostname"],
        "ts_metrics": {
            "counter": [{"name": n, "unit": "Count", "dimensions": host}
                        for n in ("Requests2XX", "Requests4XX", "Requests5XX")]
            + [{"name": "ts_inference_requests_total", "unit": "Count", "dimensions": model},
               {"name": "ts_inference_latency_microseconds", "unit": "Microseconds", "dimensions": model},
               {"name": "ts_queue_latency_microseconds", "unit": "Microseconds", "dimensions": model}],
            "gauge": [{"name": "QueueTime", "unit": "Milliseconds", "dimensions": host},
                      {"name": "WorkerThreadTime", "unit": "Milliseconds", "dimensions": host},
                      {"name": "WorkerLoadTime", "unit": "Milliseconds", "dimensions": ["WorkerName", *host]},
                      {"name": "CPUUtilization", "unit": "Percent", "dimensions": host},
                      {"name": "MemoryUsed", "unit": "Megabytes", "dimensions": host},
                      {"name": "MemoryAvailable", "unit": "Megabytes", "dimensions": host},
                      {"name": "MemoryUtilization", "unit": "Percent", "dimensions": host},
                      {"name": "DiskUsage", "unit": "Gigabytes", "dimensions": host},
                      {"name": "DiskUtilization", "unit": "Percent", "dimensions": host},
                      {"name": "DiskAvailable", "unit": "Gigabytes", "dimensions": host},
                      {"name": "GPUMemoryUtilization", "unit": "Percent", "dimensions": ["Level", "DeviceId", "Hostname"]},
                      {"name": "GPUMemoryUsed", "unit": "Megabytes", "dimensions": ["Level", "DeviceId", "Hostname"]},
                      {"name": "GPUUtilization", "unit": "Percent", "dimensions": ["Level", "DeviceId", "Hostname"]}],
        },
        "model_metrics": {kind: [{**m, "dimensions": ["ModelName", "Level"]} for m in ms]
                          for kind, ms in HANDLER_METRICS.items()},
    }
    for kind, decls in _probe_metric_decls().items():
        doc["model_metrics"].setdefault(kind, []).extend(decls)
    return yaml.safe_dump(doc, sort_keys=False)


# --- process -------------------------------------------------------------------------------------------------------


def _port_free(host: str, port: int) -> bool:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _torchserve_exe() -> str:
    exe = Path(sys.executable).with_name("torchserve")
    return str(exe) if exe.exists() else "torchserve"


def start(cfg: ServeConfig) -> Instance:
    """Starts TorchServe and waits until every model has a READY worker; stops it again on failure."""
    inst = Instance(cfg)
    if not cfg.token_auth and not is_loopback(cfg.host):
        log.warning("token authorization is off and %s is not loopback: anyone who reaches it can call it", cfg.host)
    if inst.pid() is not None or inst.answers():
        raise RuntimeError(f"TorchServe already runs from {inst.work}; stop it first with: "
                           f"robustserve stop{workdir_args(inst.work)}")
    mars = archives(cfg)
    mhost = cfg.management_host or cfg.host
    busy = [f"{n}={p}" for n, p in cfg.ports.model_dump().items()
            if not _port_free(mhost if n.endswith("management") else cfg.host, p)]
    if busy:
        raise RuntimeError(f"port(s) in use on {cfg.host}: {', '.join(busy)}; choose others with --set ports.<name>=")
    for d in (inst.work, inst.tmp, inst.logs):
        d.mkdir(parents=True, exist_ok=True)
    inst.key_file.unlink(missing_ok=True)
    (inst.work / "config.properties").write_text(config_properties(cfg))
    (inst.work / "metrics.yaml").write_text(metrics_yaml())
    env = {**os.environ, "TMPDIR": str(inst.tmp), "TEMP": str(inst.tmp), "TMP": str(inst.tmp),
           "LOG_LOCATION": str(inst.logs), "METRICS_LOCATION": str(inst.logs)}
    env.pop(PROBE_KEY_ENV, None)
    inst.probe_dir.mkdir(parents=True, exist_ok=True)
    env[PROBE_DIR_ENV] = str(inst.probe_dir)
    if cfg.probe_key:
        write_probe_key(inst.probe_key_file)
        env[PROBE_KEY_ENV] = str(inst.probe_key_file)
    # TorchServe would take its config from TS_CONFIG_FILE over --ts-config: the file written here must win.
    env.pop("TS_CONFIG_FILE", None)
    cmd = [_torchserve_exe(), "--start", "--ncs", "--ts-config", str(inst.work / "config.properties"),
           "--model-store", str(Path(cfg.model_store).resolve())]
    with open(inst.logs / "console.log", "ab") as out:
        # Its own session: the server outlives this command and a Ctrl-C here does not reach it.
        proc = subprocess.Popen(cmd, cwd=inst.work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        proc.wait(timeout=60)
    try:
        wait_ready(inst, [m.stem for m in mars], cfg.ready_timeout_s)
    except BaseException:
        stop(cfg)
        raise
    return inst


def write_probe_key(path: Path) -> str:
    """A fresh random probe key, readable by this user only."""
    import secrets

    key = secrets.token_urlsafe(32)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"key": key, "header": "X-Probe-Key"}, f)
    os.replace(tmp, path)
    return key


def wait_ready(inst: Instance, models: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(models)
    last = ""
    while time.monotonic() < deadline:
        if inst.pid() is None and time.monotonic() > deadline - timeout + 5:
            raise RuntimeError(f"TorchServe exited during start-up; see {inst.logs}/console.log and "
                               f"{inst.logs}/model_log.log\n{_tail(inst.logs / 'console.log')}")
        if inst.cfg.token_auth and not inst.keys():
            time.sleep(0.3)
            continue
        still = []
        for m in pending:
            try:
                status, body = inst.get("management", f"/models/{m}")
            except OSError as e:
                still.append(m)
                last = str(e)
                continue
            if status == 200 and any(w.get("status") == "READY" for d in body for w in d.get("workers", [])):
                continue
            last = f"{m}: HTTP {status} {str(body)[:200]}"
            still.append(m)
        pending = still
        if not pending:
            return
        time.sleep(0.5)
    raise TimeoutError(f"models not ready after {timeout:.0f} s: {pending} ({last}); see "
                       f"{inst.logs}/model_log.log\n{_tail(inst.logs / 'model_log.log')}")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(cfg: ServeConfig) -> bool:
    """Stops the instance of ``cfg.workdir`` and waits until the frontend and its workers are gone.
    Returns False when none was running."""
    inst = Instance(cfg)
    pid = inst.pid()
    if pid is None:
        inst.pid_file.unlink(missing_ok=True)
        return False
    children = _children(pid)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + cfg.stop_timeout_s
    while time.monotonic() < deadline and _alive([pid, *children]):
        time.sleep(0.2)
    left = _alive([pid, *children])
    for p in left:
        log.warning("pid %d did not exit after %.0f s; killing it", p, cfg.stop_timeout_s)
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    while _alive(left):
        time.sleep(0.1)
    inst.pid_file.unlink(missing_ok=True)
    inst.key_file.unlink(missing_ok=True)
    inst.probe_key_file.unlink(missing_ok=True)
    return True


def _children(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # psutil missing or the process just went: nothing more to wait for
        return []


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(p)
        except OSError:
            try:
                os.kill(p, 0)
                alive.append(p)
            except OSError:
                pass
    return alive


def status(target: ServeConfig | Instance) -> dict[str, Any]:
    """{"running": bool, "pid", "models": {name: {"version", "ready", "workers": [...]}}} of the server of a work
    folder, found over HTTP (pid: None when it runs in another PID namespace)."""
    inst = target if isinstance(target, Instance) else Instance(target)
    pid = inst.pid()
    if pid is None and not inst.answers():
        return {"running": False, "workdir": str(inst.work), "models": {}}
    try:
        code, listing = inst.get("management", "/models")
    except OSError as e:  # the process is there, its listener not (yet)
        code, listing = 0, f"management listener {inst.url('management')} not answering ({e})"
    if code != 200:
        return {"running": True, "pid": pid, "workdir": str(inst.work), "error": f"HTTP {code}: {listing}",
                "models": {}}
    models = {}
    for entry in listing.get("models", []):
        name = entry["modelName"]
        code, desc = inst.get("management", f"/models/{name}")
        if code != 200:
            models[name] = {"ready": False, "error": f"HTTP {code}"}
            continue
        for d in desc:
            workers = [{"id": w.get("id"), "status": w.get("status"), "pid": w.get("pid"), "gpu": w.get("gpu")}
                       for w in d.get("workers", [])]
            models[name] = {"version": d.get("modelVersion"), "batch_size": d.get("batchSize"),
                            "max_batch_delay_ms": d.get("maxBatchDelay"),
                            "min_workers": d.get("minWorkers"), "max_workers": d.get("maxWorkers"),
                            "workers": workers, "ready": any(w["status"] == "READY" for w in workers),
                            "last_probe": last_probe(inst, name)}
    return {"running": True, "pid": pid, "workdir": str(inst.work), "models": models}


def last_probe(inst: Instance, model: str) -> Optional[dict[str, Any]]:
    """The newest probe of ``model`` in this work folder's history: {"id", "status" (ok, failed, timeout or
    lost), "started", "error"}, or running when the gate says one runs now; None when it was never probed."""
    from serving.runtime.probing.history import ProbeGate, ProbeHistory
    from serving.runtime.probing.runner import HISTORY_FILE

    gate = ProbeGate(inst.probe_dir, model)
    running = gate.running()
    if running is not None:
        return {"id": running.get("id"), "status": "running", "started_unix": running.get("started_unix")}
    lost = gate.lost()
    rep = ProbeHistory(inst.probe_dir / model / HISTORY_FILE).last()
    if lost is not None and (rep is None or rep.get("id") != lost.get("id")):
        # Its worker died and no request has settled it in the history yet: it is lost all the same.
        return {"id": lost.get("id"), "status": "lost", "started_unix": lost.get("started_unix")}
    if rep is None:
        return None
    return {k: rep.get(k) for k in ("id", "status", "started", "error")}


def describe_access(inst: Instance) -> str:
    """Where the listeners are and where the keys lie, as the work folder says (what the server was given)."""
    props = inst.properties()
    inf = inst.url("inference")
    lines = [f"inference:  {inf}   management: {inst.url('management')}   "
             f"metrics: {inst.url('metrics')}/metrics (no token)",
             f"gRPC:       {props.get('grpc_inference_address')}:{props.get('grpc_inference_port')} (inference), "
             f"{props.get('grpc_management_address')}:{props.get('grpc_management_port')} (management)",
             f"logs:       {inst.logs}"]
    if props.get("disable_token_authorization") == "false":
        lines += [f"keys:       {inst.key_file} (inference and management keys; they expire after "
                  f"{props.get('token_expiration_min')} min; robustserve renews them through the API key in that "
                  f"file, so read the file again when a key is refused)",
                  "send:       -H \"Authorization: Bearer $(jq -r .inference.key " + str(inst.key_file) + ")\"",
                  f"example:    curl -H \"Authorization: Bearer <inference key>\" -H \"Content-Type: image/png\" "
                  f"--data-binary @image.png "
                  f"{inf}/predictions/<model>"]
    else:
        lines.append("token authorization is OFF: anyone who reaches these ports can call them")
    if inst.probe_key() is not None:
        lines.append(f"probe key:  {inst.probe_key_file} (send it as X-Probe-Key with a probe request; "
                     f"robustserve probe reads it from there)")
    else:
        lines.append("probes:     off (no probe key; serve with probe_key=true to allow them)")
    return "\n".join(lines)


# --- container entry point ---------------------------------------------------------------------------------------


def run_foreground(cfg: ServeConfig) -> int:
    """Starts the server and stays until it exits or this process is asked to stop (SIGTERM/SIGINT), then stops
    it: the shape a container's main process needs."""
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)

    # Installed before the server starts: an orchestrator may send SIGTERM as soon as the server answers, which
    # can be before start() returns; the default action would kill this process and leave TorchServe running.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    inst = start(cfg)
    try:
        log.info("serving %s\n%s", [m for m in status(cfg)["models"]], describe_access(inst))
        while not stopping and inst.pid() is not None:
            time.sleep(1.0)
    finally:
        stop(cfg)
    return 0 if stopping else 1


def healthy(target: ServeConfig | Instance) -> bool:
    """Every model has a READY worker and /ping answers with the inference key."""
    inst = target if isinstance(target, Instance) else Instance(target)
    try:
        st = status(inst)
        if not st["running"] or not st["models"] or not all(m.get("ready") for m in st["models"].values()):
            return False
        code, _ = inst.get("inference", "/ping")
    except OSError:  # not listening yet, or gone
        return False
    return code == 200

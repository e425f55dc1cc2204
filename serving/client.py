"""Reaching a running robustserve TorchServe from what its work folder holds: the addresses from the
``config.properties`` that ``robustserve serve`` wrote there, the keys from ``key_file.json`` (inference and
management) and ``probe_key.json``. Every command that talks to a server (status, stop, health, probe, monitor)
goes through :class:`Instance`, so addresses and keys are read in one place.

Discovery is over HTTP: a server counts as running when its inference listener answers ``/ping`` with the key
from the work folder. The pid file is used only to stop it, so a sidecar in another PID namespace (another
container of the pod, sharing the work folder and the network) finds the server too.

:class:`Client` keeps one keep-alive connection per listener (use one client per thread).
"""
from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from serving.tokens import is_invalid_key

KEY_FILE = "key_file.json"
PROBE_KEY_FILE = "probe_key.json"
PROBE_DIR = "probes"
PID_FILE = ".model_server.pid"
PROPERTIES_FILE = "config.properties"
DEFAULT_WORKDIR = "runs/serve"
# TorchServe's own defaults, for a work folder whose config.properties is not written yet.
DEFAULT_ADDRESSES = {"inference": "http://127.0.0.1:8080", "management": "http://127.0.0.1:8081",
                     "metrics": "http://127.0.0.1:8082"}
APIS = tuple(DEFAULT_ADDRESSES)


def read_properties(path: Path) -> dict[str, str]:
    """A Java properties file's ``key=value`` lines (the subset ``robustserve serve`` writes); {} when absent."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#!" or "=" not in line:
            continue
        k, v = line.split("=", 1)
        out[k.strip()] = v.strip().replace("\\\\", "\\")
    return out


def reachable_url(address: str) -> str:
    """A listener's address as this machine reaches it: a wildcard host (0.0.0.0, ::) through loopback."""
    parts = urlsplit(address)
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme or 'http'}://{host}:{parts.port}"


class Instance:
    """One TorchServe instance, as its work folder describes it.

    ``Instance(cfg)`` takes a :class:`serving.serve.ServeConfig` (``serve`` itself, before the folder is written);
    ``Instance.at(workdir)`` only the folder. Either way addresses and keys are read from the folder's files
    when they are there: the folder is the truth about the server that runs from it.
    """

    def __init__(self, cfg: Any = None, workdir: Optional[str | Path] = None):
        self.cfg = cfg
        self.work = Path(workdir if workdir is not None else getattr(cfg, "workdir", DEFAULT_WORKDIR)).resolve()
        self.tmp = self.work / "tmp"
        self.logs = self.work / "logs"
        self.key_file = self.work / KEY_FILE
        self.probe_key_file = self.work / PROBE_KEY_FILE
        self.probe_dir = self.work / PROBE_DIR
        self.pid_file = self.tmp / PID_FILE
        self.properties_file = self.work / PROPERTIES_FILE

    @classmethod
    def at(cls, workdir: str | Path) -> "Instance":
        return cls(None, workdir)

    # --- what the folder holds ---------------------------------------------------------------------------------

    def properties(self) -> dict[str, str]:
        return read_properties(self.properties_file)

    def address(self, api: str) -> str:
        """The listener address as configured (``http://host:port``, host possibly a wildcard)."""
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        written = self.properties().get(f"{api}_address")
        if written:
            return written
        if self.cfg is not None:
            from serving.serve import listen_address

            return listen_address(self.cfg, api)
        return DEFAULT_ADDRESSES[api]

    def url(self, api: str) -> str:
        """Where this machine reaches the ``inference``, ``management`` or ``metrics`` listener."""
        return reachable_url(self.address(api))

    def keys(self, refused: Optional[dict[str, str]] = None) -> dict[str, str]:
        """{"inference": key, "management": key} or {} when token auth is off or the file is not there yet.
        The one place keys are read: everything that sends one calls this (or :meth:`headers`). A key close to
        its expiry, or one in ``refused`` ({api: key} the server refused), is renewed first through the server's
        token API, so callers keep working for as long as the server runs."""
        from serving.tokens import current_keys

        return current_keys(self.key_file, self.url("management"), self.renew_margin_s(), refused)

    def renew_margin_s(self) -> float:
        """Renew with a third of the keys' lifetime left (at most 5 min before expiry): early enough that a call
        made just before renewal still lands in time, late enough that renewals stay rare."""
        try:
            minutes = float(self.properties().get("token_expiration_min")
                            or getattr(self.cfg, "token_expiration_min", None) or 60)
        except ValueError:
            minutes = 60.0
        return min(300.0, minutes * 60 / 3)

    def probe_key(self) -> Optional[str]:
        try:
            return json.loads(self.probe_key_file.read_text())["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def headers(self, api: str, refused: Optional[dict[str, str]] = None) -> dict[str, str]:
        key = self.keys(refused).get(api)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def pid(self) -> Optional[int]:
        """The frontend's pid when it is alive and visible from here (same PID namespace), else None."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if is_torchserve(pid, self.properties_file) else None

    # --- over HTTP ---------------------------------------------------------------------------------------------

    def get(self, api: str, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        headers = self.headers(api)
        for attempt in (0, 1):
            req = urllib.request.Request(self.url(api) + path, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    body = r.read()
                    status = r.status
            except urllib.error.HTTPError as e:
                body, status = e.read(), e.code
            if attempt or not is_invalid_key(status, body) or "Authorization" not in headers:
                break
            # Renewed by another process since it was read, or expired early: renew if still the same, retry once.
            headers = self.headers(api, refused={api: headers["Authorization"].split(" ", 1)[1]})
        try:
            return status, json.loads(body or b"null")
        except ValueError:
            return status, body.decode("utf-8", "replace")

    def answers(self, timeout: float = 5.0) -> bool:
        """The server of this folder answers: ``/ping`` on its inference listener, with the folder's key, is 200.
        Another server on the same port answers 400 to a key it did not issue."""
        if not self.properties_file.is_file():
            return False
        try:
            code, _ = self.get("inference", "/ping", timeout)
        except OSError:  # not listening (yet), or gone
            return False
        return code == 200


def workdir_args(work: str | Path) -> str:
    """`` --set workdir=<folder>`` for a hint a user pastes; empty for the default folder seen from here."""
    import shlex

    work = Path(work).resolve()
    return "" if work == Path(DEFAULT_WORKDIR).resolve() else f" --set workdir={shlex.quote(str(work))}"


def is_torchserve(pid: int, config: Optional[Path] = None) -> bool:
    """Whether ``pid`` is a TorchServe frontend, and (given ``config``) the one started with that config file (a
    work folder's): a stale pid file whose number now belongs to another process, or to another TorchServe, is
    not ours to stop."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the pid file
    return b"org.pytorch.serve.ModelServer" in cmdline and (config is None or os.fsencode(str(config)) in cmdline)


@dataclass
class Response:
    status: int
    body: Any
    headers: dict[str, str]


class Client:
    def __init__(self, inst: Instance, timeout: float = 60.0, token: bool = True):
        self.inst = inst
        self.timeout = timeout
        self.token = token
        self._conns: dict[int, http.client.HTTPConnection] = {}


    def request(self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None,
                api: str = "inference") -> Response:
        h = dict(headers or {})
        if self.token and api != "metrics":
            h.update(self.inst.headers(api))
        r, raw = self._send(method, path, body, h, api)
        if "Authorization" in h and is_invalid_key(r.status, raw):
            # The key was renewed by another process after it was read (or expired early): renew, retry once.
            h.update(self.inst.headers(api, refused={api: h["Authorization"].split(" ", 1)[1]}))
            r, raw = self._send(method, path, body, h, api)
        ctype = r.getheader("content-type", "")
        parsed: Any = raw.decode("utf-8", "replace")
        if "json" in ctype or raw[:1] in (b"{", b"["):
            try:
                parsed = json.loads(raw)
            except ValueError:
                pass
        return Response(r.status, parsed, {k.lower(): v for k, v in r.getheaders()})

    def _send(self, method: str, path: str, body: Optional[bytes], h: dict, api: str):
        parts = urlsplit(self.inst.url(api))
        port = parts.port
        for attempt in (0, 1):
            conn = self._conns.get(port)
            if conn is None:
                conn = self._conns[port] = http.client.HTTPConnection(parts.hostname, port, timeout=self.timeout)
            try:
                conn.request(method, path, body=body, headers=h)
                r = conn.getresponse()
                raw = r.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The server closes a keep-alive connection after an error reply: reconnect once.
                conn.close()
                self._conns.pop(port, None)
                if attempt:
                    raise
        if r.getheader("connection", "").lower() == "close":
            conn.close()
            self._conns.pop(port, None)
        return r, raw

    def predict(self, model: str, image: bytes, content_type: str = "image/png",
                headers: Optional[dict] = None) -> Response:
        """Raw image bytes. TorchServe needs a non-form content type here: a POST sent as
        application/x-www-form-urlencoded (curl -d, urllib's default) is parsed as a form and never reaches the
        handler as an image."""
        return self.request("POST", f"/predictions/{model}", image, {"Content-Type": content_type, **(headers or {})})

    def post_json(self, path: str, doc: Any) -> Response:
        return self.request("POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    def metrics(self) -> str:
        return self.request("GET", "/metrics", api="metrics").body

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()

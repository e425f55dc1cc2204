"""A small HTTP client for a running robustserve TorchServe: the token from the instance's key file, one
keep-alive connection per client (use one client per thread)."""
from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit

from serving.serve import Instance


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
        ctype = r.getheader("content-type", "")
        parsed: Any = raw.decode("utf-8", "replace")
        if "json" in ctype or raw[:1] in (b"{", b"["):
            try:
                parsed = json.loads(raw)
            except ValueError:
                pass
        return Response(r.status, parsed, {k.lower(): v for k, v in r.getheaders()})

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

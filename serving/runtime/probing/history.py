"""Probe reports on disk, and the gate that lets one probe of a model run at a time.

History: one JSON line per report, ``{"report": {...}, "sha256": <of the report's canonical JSON>}``, appended
with a single ``write`` under an exclusive lock and fsynced. A crash can leave at most a torn last line: readers
skip any line that does not parse or whose hash does not match, and the next append starts on a fresh line, so
no earlier report is ever lost or changed.

Gate: an ``flock`` on ``<model>.lock`` held for the whole probe (across the worker processes of one model, and
released by the kernel if a worker dies), and the time of the last start in ``<model>.state.json`` for the rate
limit.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator, Optional

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _canonical(report: dict) -> bytes:
    return json.dumps(report, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


class ProbeHistory:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, report: dict) -> None:
        body = _canonical(report)
        # The line keeps the report's own key order (a cascade's columns are in attack order); only the hash is
        # taken over the canonical, key-sorted form.
        line = json.dumps({"report": report, "sha256": hashlib.sha256(body).hexdigest()},
                          allow_nan=False).encode() + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size:
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        line = b"\n" + line  # seal a torn line left by a crash: it stays unreadable, alone
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def __iter__(self) -> Iterator[dict]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            for raw in f:
                rec = _parse(raw)
                if rec is not None:
                    yield rec

    def reports(self) -> list[dict]:
        return list(self)

    def find(self, probe_id: str) -> Optional[dict]:
        found = None
        for rec in self:
            if rec.get("id") == probe_id:
                found = rec
        return found

    def last(self) -> Optional[dict]:
        out = None
        for out in self:
            pass
        return out


def _parse(raw: bytes) -> Optional[dict]:
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("report"), dict):
        return None
    if hashlib.sha256(_canonical(rec["report"])).hexdigest() != rec.get("sha256"):
        return None
    return rec["report"]


class Busy(Exception):
    def __init__(self, running: Optional[dict]):
        super().__init__("a probe is running")
        self.running = running or {}


class RateLimited(Exception):
    def __init__(self, retry_after_s: float):
        super().__init__(f"retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class ProbeGate:
    """One probe at a time per model, and at least ``min_interval_s`` between two starts."""

    def __init__(self, root: str | Path, model: str):
        self.root = Path(root)
        name = _SAFE.sub("_", model)
        self.lock_path = self.root / f"{name}.lock"
        self.state_path = self.root / f"{name}.state.json"

    def acquire(self, probe_id: str, min_interval_s: float, now: Optional[float] = None) -> int:
        """Returns the held lock's fd (pass it to :meth:`release`); raises Busy or RateLimited."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(self.state()) from None
        now = time.time() if now is None else now
        last = float(self.state().get("started_unix", 0.0))
        wait = last + min_interval_s - now
        if wait > 0:
            self.release(fd)
            raise RateLimited(wait)
        tmp = self.state_path.with_name(self.state_path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"id": probe_id, "started_unix": now, "pid": os.getpid()}))
        os.replace(tmp, self.state_path)
        return fd

    @staticmethod
    def release(fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def running(self) -> Optional[dict]:
        """The state of the probe holding the lock, or None when none runs."""
        if not self.lock_path.exists():
            return None
        fd = os.open(self.lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.state()
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

"""Probe reports on disk, and the gate that lets one probe of a model run at a time.

History: one JSON line per report, ``{"report": {...}, "sha256": <of the report's canonical JSON>}``, appended
with a single ``write`` under an exclusive lock and fsynced. A crash can leave at most a torn last line: readers
skip any line that does not parse or whose hash does not match, and the next append starts on a fresh line, so
no earlier report is ever lost or changed.

Gate: an ``flock`` on ``<model>.lock`` held for the whole probe (across the worker processes of one model, and
released by the kernel if a worker dies), and ``<model>.state.json``: the running probe's id, its start (for the
rate limit), its worker's pid and whether it still runs. Asking whether a probe runs reads only the state file
(never the lock, so a status poll cannot make a concurrent start fail); a probe whose worker died counts as
finished.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
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
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
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

    _held: dict[int, Path] = {}  # lock fd -> its state file, so release() can mark the probe finished

    def __init__(self, root: str | Path, model: str):
        self.root = Path(root)
        name = _SAFE.sub("_", model)
        self.lock_path = self.root / f"{name}.lock"
        self.state_path = self.root / f"{name}.state.json"

    def _lock(self) -> int:
        """The gate's lock, taken without waiting: its fd, or Busy with the running probe's state."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(self.state()) from None
        return fd

    def acquire(self, probe_id: str, min_interval_s: float, now: Optional[float] = None) -> int:
        """Returns the held lock's fd (pass it to :meth:`release`); raises Busy or RateLimited."""
        fd = self._lock()
        now = time.time() if now is None else now
        last = float(self.state().get("started_unix", 0.0))
        wait = last + min_interval_s - now
        if wait > 0:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise RateLimited(wait)
        try:
            _write_state(self.state_path, {"id": probe_id, "started_unix": now, "pid": os.getpid(),
                                           "running": True})
        except BaseException:  # e.g. a full disk: the lock must not outlive the failed start
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        ProbeGate._held[fd] = self.state_path
        return fd

    def acquire_for_cleanup(self) -> int:
        """The lock without the rate limit or a new state (to settle a lost probe); raises Busy when held."""
        fd = self._lock()
        ProbeGate._held[fd] = self.state_path
        return fd

    @staticmethod
    def release(fd: int) -> None:
        path = ProbeGate._held.pop(fd, None)
        try:
            if path is not None:
                state = _read_state(path)
                _write_state(path, {**state, "running": False})
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def state(self) -> dict[str, Any]:
        return _read_state(self.state_path)

    def running(self) -> Optional[dict]:
        """The state of the running probe, or None when none runs."""
        state = self.state()
        if state.get("running") and _alive(state.get("pid")):
            return state
        return None

    def lost(self) -> Optional[dict]:
        """The state of a probe whose worker died while it ran (it never finished), else None."""
        state = self.state()
        if state.get("running") and state.get("id") and not _alive(state.get("pid")):
            return state
        return None


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, under another user
        return True
    return True

"""TorchServe's token keys, kept valid for as long as the server runs.

TorchServe writes ``key_file.json`` (inference and management keys that expire after ``token_expiration_min``,
and an ``API`` key that does not) into the folder it runs from. ``POST /token?type=inference|management`` on the
management listener, authorised with the API key, replaces that key (the old one stops working at once) and
rewrites the file. Every caller here reads the file before each call and renews a key that is close to its
expiry, under a file lock so that processes sharing the work folder (CLI, monitor, container health check) renew
it once, not once each.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

log = logging.getLogger(__name__)

APIS = ("inference", "management")
INVALID_KEY = "InvalidKeyException"


def expiry(entry: Any) -> Optional[float]:
    """Unix time of a key entry's ``expiration time`` (ISO 8601 with up to nanoseconds), None when absent."""
    text = entry.get("expiration time") if isinstance(entry, dict) else None
    if not isinstance(text, str) or len(text) < 19:
        return None
    try:
        base = dt.datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None
    frac = text[19:].rstrip("Z")
    extra = float("0" + frac) if frac.startswith(".") and frac[1:].isdigit() else 0.0
    return base.timestamp() + extra


def read_key_file(path: Path, attempts: int = 5) -> dict[str, Any]:
    """The parsed key file, {} when there is none. TorchServe rewrites it in place, so a read that lands mid-write
    is retried."""
    for i in range(attempts):
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            if i + 1 == attempts:
                return {}
            time.sleep(0.05)
    return {}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        fd = open(path.with_name(path.name + ".lock"), "a")
    except OSError:  # a read-only work folder: renew without the lock (worst case twice)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fd.close()  # releases the lock


def renew(path: Path, management_url: str, api: str, timeout: float = 5.0) -> bool:
    """Asks the server for a fresh ``api`` key with the file's API key; True when it answered 200 (the server
    rewrites the file itself)."""
    data = read_key_file(path)
    api_key = (data.get("API") or {}).get("key") if isinstance(data.get("API"), dict) else None
    if not api_key:
        return False
    req = urllib.request.Request(f"{management_url}/token?type={api}", data=b"", method="POST",
                                 headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            ok = r.status == 200
    except (urllib.error.URLError, OSError) as e:
        log.warning("cannot renew the %s key at %s: %s", api, management_url, e)
        return False
    if ok:
        log.info("renewed the %s key of %s", api, path.parent)
    return ok


def current_keys(path: Path, management_url: str, margin_s: float,
                 refused: Optional[dict[str, str]] = None) -> dict[str, str]:
    """{"inference": key, "management": key} from the key file, renewing first any key that expires within
    ``margin_s`` and any key in ``refused`` ({api: key} the caller saw the server refuse) that the file still
    holds. {} when there is no key file."""
    data = read_key_file(path)
    if not data:
        return {}
    if _due(data, margin_s, refused):
        with _locked(path):
            data = read_key_file(path)  # another process may have renewed while this one waited
            for api in _due(data, margin_s, refused):
                renew(path, management_url, api)
            data = read_key_file(path)
    return {api: data[api]["key"] for api in APIS if isinstance(data.get(api), dict) and "key" in data[api]}


def _due(data: dict[str, Any], margin_s: float, refused: Optional[dict[str, str]]) -> list[str]:
    now = time.time()
    out = []
    for api in APIS:
        entry = data.get(api) if isinstance(data.get(api), dict) else {}
        exp = expiry(entry)
        if (refused and refused.get(api) == entry.get("key")) or (exp is not None and exp - now < margin_s):
            out.append(api)
    return out


def is_invalid_key(status: int, body: Any) -> bool:
    """Whether an answer is TorchServe refusing the key (it answers 400, not 401)."""
    if status != 400:
        return False
    text = body if isinstance(body, (str, bytes)) else json.dumps(body) if body is not None else ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return INVALID_KEY in text

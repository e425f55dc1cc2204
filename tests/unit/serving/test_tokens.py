import json
import time

from serving.tokens import _due, current_keys, expiry, is_invalid_key, read_key_file


def test_expiry_reads_torchserves_nanosecond_timestamps():
    assert expiry({"expiration time": "1970-01-01T00:01:00.500000000Z"}) == 60.5
    assert expiry({"expiration time": "2026-12-03T09:30:30Z"}) == 1796290230.0
    assert expiry({}) is None and expiry(None) is None and expiry({"expiration time": "soon"}) is None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".123456789Z"


def test_due_within_margin_or_refused():
    now = time.time()
    data = {"inference": {"key": "i1", "expiration time": _iso(now + 600)},
            "management": {"key": "m1", "expiration time": _iso(now + 30)}, "API": {"key": "a"}}
    assert _due(data, 60, None) == ["management"]
    assert _due(data, 5, None) == []
    assert _due(data, 5, {"inference": "i1"}) == ["inference"]
    assert _due(data, 5, {"inference": "i0"}) == []  # already replaced by another process: nothing to do


def test_keys_read_without_renewal_when_fresh(tmp_path):
    now = time.time()
    path = tmp_path / "key_file.json"
    assert current_keys(path, "http://127.0.0.1:1", 60) == {} and read_key_file(path) == {}
    path.write_text(json.dumps({"inference": {"key": "i", "expiration time": _iso(now + 3600)},
                                "management": {"key": "m", "expiration time": _iso(now + 3600)},
                                "API": {"key": "a"}}))
    assert current_keys(path, "http://127.0.0.1:1", 60) == {"inference": "i", "management": "m"}
    # Due but the server is unreachable: the current keys are still returned (the call will say what failed).
    assert current_keys(path, "http://127.0.0.1:1", 7200) == {"inference": "i", "management": "m"}


def test_invalid_key_answer_is_recognised():
    body = {"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed."}
    assert is_invalid_key(400, body) and is_invalid_key(400, json.dumps(body).encode())
    assert not is_invalid_key(400, {"error": "bad image"}) and not is_invalid_key(200, body)

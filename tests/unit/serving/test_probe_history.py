"""The probe report history and the probe gate (serving.runtime.probing.history)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving.runtime.probing.history import Busy, ProbeGate, ProbeHistory, RateLimited

REPO = Path(__file__).resolve().parents[3]


def history_line(report: dict) -> bytes:
    body = json.dumps(report, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps({"report": report, "sha256": hashlib.sha256(body).hexdigest()}).encode() + b"\n"



def _report(i: int) -> dict:
    # Attack columns deliberately out of alphabetical order: a report keeps its own key order.
    return {"id": f"{i:016x}", "status": "ok", "results": {"attacks": {"PGD-20": 0.5 / i, "CW-20": 0.25 / i}},
            "duration_s": 1.5 * i}


def test_history_round_trip_keeps_reports_and_their_key_order(tmp_path):
    h = ProbeHistory(tmp_path / "m" / "history.jsonl")
    assert h.reports() == [] and h.last() is None and h.find("0" * 16) is None  # no file yet
    reports = [_report(i) for i in (1, 2, 3)]
    for r in reports:
        h.append(r)
    assert h.reports() == reports
    assert list(h.reports()[0]["results"]["attacks"]) == ["PGD-20", "CW-20"]
    assert ProbeHistory(h.path).reports() == reports  # another reader (another worker) sees the same


def test_history_survives_a_torn_last_line(tmp_path):
    h = ProbeHistory(tmp_path / "history.jsonl")
    r1, r2, r3 = _report(1), _report(2), _report(3)
    h.append(r1)
    h.append(r2)
    torn = history_line(_report(99))
    with open(h.path, "ab") as f:  # a worker killed in the middle of its write
        f.write(torn[: len(torn) // 2])
    assert h.reports() == [r1, r2]
    h.append(r3)
    assert h.reports() == [r1, r2, r3]
    # The fragment is sealed on a line of its own, so it did not swallow the next report.
    lines = h.path.read_bytes().split(b"\n")
    assert lines[2] == torn[: len(torn) // 2] and lines[-1] == b""


def test_history_torn_first_write(tmp_path):
    h = ProbeHistory(tmp_path / "history.jsonl")
    h.path.write_bytes(b'{"report": {"id": "ab')  # the very first write was cut short
    h.append(_report(1))
    assert h.reports() == [_report(1)]


def test_history_skips_altered_and_foreign_lines(tmp_path):
    h = ProbeHistory(tmp_path / "history.jsonl")
    r1, r2 = _report(1), _report(2)
    h.append(r1)
    good = json.loads(history_line(_report(5)))
    altered = {"report": {**good["report"], "status": "failed"}, "sha256": good["sha256"]}
    with open(h.path, "ab") as f:
        f.write(json.dumps(altered).encode() + b"\n")  # parses, but the report is not the one that was hashed
        f.write(b"\n[1, 2]\nnot json\n" + json.dumps({"report": 1, "sha256": "x"}).encode() + b"\n")
        f.write(json.dumps({"sha256": good["sha256"]}).encode() + b"\n")
    h.append(r2)
    assert h.reports() == [r1, r2]
    # The hash is over the canonical (key-sorted) form: the same report with its keys in another order verifies.
    reordered = {"sha256": good["sha256"], "report": dict(reversed(list(good["report"].items())))}
    with open(h.path, "ab") as f:
        f.write(json.dumps(reordered).encode() + b"\n")
    assert h.reports() == [r1, r2, _report(5)]


def test_history_refuses_a_report_it_could_not_read_back(tmp_path):
    h = ProbeHistory(tmp_path / "history.jsonl")
    h.append(_report(1))
    with pytest.raises(ValueError):  # NaN is not JSON; it is refused before anything is written
        h.append({"id": "nan", "value": float("nan")})
    assert h.reports() == [_report(1)]
    assert h.path.read_bytes().endswith(b"\n")


def test_history_find_and_last(tmp_path):
    h = ProbeHistory(tmp_path / "history.jsonl")
    a, b = _report(1), _report(2)
    h.append(a)
    h.append(b)
    assert h.find(a["id"]) == a and h.find(b["id"]) == b
    assert h.find("f" * 16) is None
    assert h.last() == b
    newer = {**a, "status": "timeout"}
    h.append(newer)
    assert h.find(a["id"]) == newer and h.last() == newer  # the newest record of an id wins


# --- 3. gate -------------------------------------------------------------------------------------------------------


def test_gate_lets_one_probe_run(tmp_path):
    gate, other = ProbeGate(tmp_path, "m"), ProbeGate(tmp_path, "m")  # other: a second worker of the same model
    assert gate.running() is None
    fd = gate.acquire("a" * 16, 0.0)
    try:
        with pytest.raises(Busy) as e:
            gate.acquire("b" * 16, 0.0)
        assert e.value.running["id"] == "a" * 16
        # flock locks an open file: a second gate opens its own, as another process would, and is refused too.
        with pytest.raises(Busy) as e:
            other.acquire("c" * 16, 0.0)
        assert e.value.running["id"] == "a" * 16
        assert gate.running()["id"] == "a" * 16 and other.running()["id"] == "a" * 16
        assert gate.running()["pid"] > 0 and gate.running()["started_unix"] > 0
        fd2 = ProbeGate(tmp_path, "another-model").acquire("d" * 16, 0.0)  # models do not block each other
        ProbeGate.release(fd2)
    finally:
        ProbeGate.release(fd)
    assert gate.running() is None and other.running() is None
    ProbeGate.release(other.acquire("e" * 16, 0.0))


def test_gate_is_held_across_processes_and_freed_when_the_holder_dies(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, sys.argv[1]);"
         "from serving.runtime.probing.history import ProbeGate;"
         "ProbeGate(sys.argv[2], 'm').acquire('c' * 16, 0.0); print('held', flush=True); sys.stdin.read()",
         str(REPO), str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        gate = ProbeGate(tmp_path, "m")
        with pytest.raises(Busy) as e:
            gate.acquire("a" * 16, 0.0)
        assert e.value.running["id"] == "c" * 16 and e.value.running["pid"] == child.pid
        assert gate.running()["id"] == "c" * 16
    finally:
        child.kill()  # a worker that dies mid-probe: the kernel drops its lock
        child.wait(10)
    assert gate.running() is None
    ProbeGate.release(gate.acquire("a" * 16, 0.0))


def test_asking_whether_a_probe_runs_never_blocks_a_start(tmp_path):
    """A status poll reads the state only: polling in a tight loop must never make a concurrent start fail."""
    import threading

    gate, poller = ProbeGate(tmp_path, "m"), ProbeGate(tmp_path, "m")
    stop = threading.Event()
    t = threading.Thread(target=lambda: [poller.running() for _ in iter(stop.is_set, True)])
    t.start()
    try:
        for i in range(300):
            ProbeGate.release(gate.acquire(f"{i:016x}", 0.0))
    finally:
        stop.set()
        t.join()


def test_gate_rate_limit(tmp_path):
    gate = ProbeGate(tmp_path, "m")
    ProbeGate.release(gate.acquire("a" * 16, 60.0))  # no earlier start: not limited
    with pytest.raises(RateLimited) as e:
        gate.acquire("b" * 16, 60.0)
    assert e.value.retry_after_s == pytest.approx(60.0, abs=5.0)
    assert "retry after" in str(e.value)
    # A refused start must not keep the lock, nor count as a start.
    assert gate.running() is None and gate.state()["id"] == "a" * 16
    with pytest.raises(RateLimited):
        ProbeGate(tmp_path, "m").acquire("c" * 16, 60.0)  # the limit holds across workers
    ProbeGate.release(gate.acquire("d" * 16, 0.0))
    assert gate.state()["id"] == "d" * 16


def test_gate_rate_limit_counts_from_the_last_start(tmp_path):
    gate = ProbeGate(tmp_path, "m")
    ProbeGate.release(gate.acquire("a" * 16, 10.0, now=1000.0))
    with pytest.raises(RateLimited) as e:
        gate.acquire("b" * 16, 10.0, now=1004.0)
    assert e.value.retry_after_s == pytest.approx(6.0)
    ProbeGate.release(gate.acquire("b" * 16, 10.0, now=1010.5))
    assert gate.state()["started_unix"] == 1010.5


def test_gate_files_stay_in_their_folder(tmp_path):
    gate = ProbeGate(tmp_path / "state", "../evil/name")
    assert gate.lock_path.parent == tmp_path / "state" and gate.state_path.parent == tmp_path / "state"
    ProbeGate.release(gate.acquire("a" * 16, 0.0))
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == sorted([gate.lock_path.name,
                                                                            gate.state_path.name])

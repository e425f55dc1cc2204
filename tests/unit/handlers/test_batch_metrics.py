"""The handler's metrics are published at most once per interval: counters summed, gauges at their latest value,
and a timer publishes what is pending when no batch follows."""
import time

import pytest

from handlers.base import BatchMetrics
from tests.unit.serving.builders import MockMetrics


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def published(m: MockMetrics) -> list[dict]:
    """The publications in order, each as {name: value}."""
    out, cur = [], {}
    for _, name, value in m.calls:
        cur[name] = value
        if name == "InferenceTime":
            out.append(cur)
            cur = {}
    return out


def test_interval_zero_publishes_every_batch():
    m = MockMetrics()
    b = BatchMetrics(0.0)
    b.record(m, 1, 3, 0.002, 0.004)
    b.record(m, 0, 5, 0.001, 0.003)
    assert published(m) == [{"InvalidRequests": 1, "InferredImages": 3, "DecodeTime": 2.0, "InferenceTime": 4.0},
                            {"InvalidRequests": 0, "InferredImages": 5, "DecodeTime": 1.0, "InferenceTime": 3.0}]


def test_counters_sum_and_gauges_keep_the_latest_within_an_interval():
    clock, m = Clock(), MockMetrics()
    b = BatchMetrics(3600.0, clock)  # the timer cannot fire during the test
    b.record(m, 1, 2, 0.001, 0.001)  # the first batch goes out at once
    for i in range(10):
        clock.t += 1
        b.record(m, i % 2, 4, 0.001 * (i + 2), 0.002)
    assert len(published(m)) == 1
    b.flush()
    assert published(m)[1] == {"InvalidRequests": 5, "InferredImages": 40, "DecodeTime": 11.0,
                               "InferenceTime": 2.0}
    b.flush()  # nothing pending: nothing published
    assert len(published(m)) == 2
    clock.t += 3600
    b.record(m, 0, 1, 0.001, 0.001)  # an interval later: out at once
    assert len(published(m)) == 3 and published(m)[2]["InferredImages"] == 1


def test_a_timer_publishes_what_is_pending_when_no_batch_follows():
    m = MockMetrics()
    b = BatchMetrics(0.2)
    b.record(m, 0, 1, 0.001, 0.001)
    b.record(m, 2, 7, 0.001, 0.001)
    assert len(published(m)) == 1
    deadline = time.monotonic() + 5
    while len(published(m)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert published(m)[1]["InferredImages"] == 7 and published(m)[1]["InvalidRequests"] == 2
    assert sum(p["InferredImages"] for p in published(m)) == 8


def test_a_failing_metrics_object_costs_nothing(caplog):
    class Broken:
        def add_counter(self, *a, **k):
            raise RuntimeError("backend gone")

    b = BatchMetrics(0.0)
    b.record(Broken(), 0, 1, 0.001, 0.001)  # logged, not raised
    assert "cannot publish" in caplog.text
    b.record(None, 0, 1, 0.001, 0.001)  # no metrics object: nothing to do


@pytest.mark.parametrize("bad", [-1, 61])
def test_interval_is_validated(bad):
    from pydantic import ValidationError

    from serving.runtime.schemas import ServiceSettings

    with pytest.raises(ValidationError):
        ServiceSettings(metrics_interval_s=bad)

"""The TorchServe adapter's part of probes (handlers/base.py): the probe key header, probe bodies, a round trip
through a handler started the way `robustserve serve` starts workers, and its metrics."""
from __future__ import annotations

import copy
import json

import pytest
import yaml

from handlers.base import PROBE_DIR_ENV, PROBE_KEY_ENV
from handlers.classification import ClassificationHandler
from tests.unit.serving.builders import KEY, MockContext, MockMetrics, archive_small, encode, sample_images, unpack


class RecordingMetrics(MockMetrics):
    def add_metric(self, name, value, unit, idx=None, dimensions=None, metric_type=None):
        self.calls.append(("metric", name, value, unit, [(d.name, d.value) for d in dimensions or []],
                           metric_type))


@pytest.fixture(scope="module")
def model_dir(classifier_export, tmp_path_factory):
    """An unpacked classifier archive, as TorchServe lays it out before calling the handler."""
    root = tmp_path_factory.mktemp("probe-handler")
    return unpack(archive_small(classifier_export, root / "store", "clf"), root / "unpacked")


@pytest.fixture
def handler(model_dir, tmp_path, monkeypatch):
    """A handler started the way `robustserve serve` starts workers: the probe key file and the state folder in the
    environment; no rate limit, so each test may start probes at once."""
    (tmp_path / "probe_key.json").write_text(json.dumps({"key": KEY}))
    monkeypatch.setenv(PROBE_KEY_ENV, str(tmp_path / "probe_key.json"))
    monkeypatch.setenv(PROBE_DIR_ENV, str(tmp_path / "probes"))
    cfg = copy.deepcopy(yaml.safe_load((model_dir / "model-config.yaml").read_text()))
    cfg["handler"]["probe"]["min_interval_s"] = 0.0
    ctx = MockContext(model_dir, "clf", yaml_config=cfg)
    ctx.metrics = RecordingMetrics()
    h = ClassificationHandler()
    h.initialize(ctx)
    h.init_context = ctx
    return h


def test_to_raw_reads_the_probe_key_header(handler):
    raw = handler.to_raw({"body": {"probe": {}}}, {"X-Probe-Key": b"abc"})
    assert (raw.body, raw.params, raw.probe_key) == ({"probe": {}}, {}, "abc")
    assert handler.to_raw({"body": {"probe": {}}}, {"x-probe-key": "abc"}).probe_key == "abc"
    assert handler.to_raw({"body": {"probe": {}}}, {}).probe_key is None
    assert handler.to_raw(b'{"probe": {}}', {"X-PROBE-KEY": bytearray(b"abc")}).probe_key == "abc"


def test_to_raw_rebuilds_a_probe_body_from_separate_keys(handler):
    raw = handler.to_raw({"probe": {"action": "last"}}, {"X-Probe-Key": b"abc"})
    assert (raw.body, raw.params, raw.probe_key) == ({"probe": {"action": "last"}}, {}, "abc")
    # Anything beside "probe" stays in the body, where the service refuses it.
    raw = handler.to_raw({"probe": {}, "image": "aGVsbG8="}, {})
    assert raw.body == {"probe": {}, "image": "aGVsbG8="}
    (reply,), _ = handler.service.decode_all([raw])
    assert reply.status == 400
    # Inference options sent as headers (X-Top-K) are not the probe's: they must not end up in its body.
    raw = handler.to_raw({"probe": {"action": "last"}}, {"X-Probe-Key": b"abc", "X-Top-K": "3"})
    assert (raw.body, raw.params) == ({"probe": {"action": "last"}}, {})


def test_handler_probe_round_trip(handler, model_dir):
    x, _ = sample_images(1)
    ctx = MockContext(model_dir, "clf", headers=[{"X-Probe-Key": KEY.encode()}, {}])
    out = [json.loads(s) for s in handler.handle(
        [{"body": {"probe": {"attacks": ["pgd"], "steps": 2, "n": 4}}}, {"body": encode(x[0])}], ctx)]
    assert ctx.statuses[0] == (202, "Accepted") and ctx.status(1) == 200
    assert ctx.response_headers[0]["content-type"] == "application/json"
    assert len(out[1]["predictions"]) == 5
    pid = out[0]["probe"]["id"]
    handler.service.probe_runner.wait(60)
    ctx = MockContext(model_dir, "clf", headers=[{"x-probe-key": KEY}])
    (rep,) = [json.loads(s) for s in handler.handle([{"probe": {"action": "status", "id": pid}}], ctx)]
    assert ctx.status(0) == 200
    assert rep["probe"]["status"] == "ok" and rep["probe"]["model"] == "clf" and rep["probe"]["version"] == "1.0"
    # The finished probe was published as model metrics through the context the worker was started with.
    published = [c for c in handler.init_context.metrics.calls if c[0] == "metric"]
    names = {c[1] for c in published}
    assert {"robustserve_probe_runs_total", "robustserve_probe_clean_accuracy_ratio",
            "robustserve_probe_robust_accuracy_ratio"} <= names
    runs = [c for c in published if c[1] == "robustserve_probe_runs_total"]
    assert len(runs) == 1
    _, _, value, unit, dims, kind = runs[0]
    assert (value, unit, dims) == (1.0, "count", [("ModelName", "clf"), ("Level", "Model"), ("status", "ok")])
    assert kind.name == "COUNTER"
    worst = [c for c in published if c[1] == "robustserve_probe_robust_accuracy_ratio" and ("attack", "worst") in c[4]]
    from serving.runtime.probing.metrics import CONFIG_LABEL, config_id

    assert [c[4] for c in worst] == [[("ModelName", "clf"), ("Level", "Model"), ("attack", "worst"), ("eps", "0.1"),
                                      (CONFIG_LABEL, config_id(rep["probe"]))]]
    assert worst[0][2] == rep["probe"]["results"]["robust"][0]["worst_case"]


def test_handler_without_a_usable_probe_key_refuses_probes(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(PROBE_DIR_ENV, str(tmp_path / "probes"))
    for key_file in (None, {"key": "short"}):
        if key_file is None:
            monkeypatch.delenv(PROBE_KEY_ENV, raising=False)
        else:
            (tmp_path / "k.json").write_text(json.dumps(key_file))
            monkeypatch.setenv(PROBE_KEY_ENV, str(tmp_path / "k.json"))
        h = ClassificationHandler()
        h.initialize(MockContext(model_dir, "clf"))
        ctx = MockContext(model_dir, "clf", headers=[{"X-Probe-Key": b"short"}])
        (out,) = h.handle([{"body": {"probe": {}}}], ctx)
        assert ctx.status(0) == 403 and json.loads(out)["error"]["code"] == "probes_disabled"

import base64
import json

import numpy as np
import pytest

from handlers.base import BATCH_HEADER, BatchMetrics
from handlers.classification import ClassificationHandler
from serving.runtime.artifacts import load_manifest
from serving.runtime.service import softmax
from serving.runtime.session import open_session
from tests.unit.serving.builders import MockContext, encode, sample_images


@pytest.fixture(scope="module")
def handler(classifier_model_dir):
    h = ClassificationHandler()
    h.initialize(MockContext(classifier_model_dir, "clf"))
    assert h.batch_metrics.interval_s == 1.0  # the default
    h.batch_metrics = BatchMetrics(0.0)  # every batch's metrics go to its own context (tests/unit/handlers/
    return h                             # test_batch_metrics.py covers the interval)


@pytest.fixture(scope="module")
def reference(classifier_model_dir):
    sess = open_session(classifier_model_dir, load_manifest(classifier_model_dir), engine="torchscript")
    return lambda x_uint8: softmax(sess.run(x_uint8[:, None].astype(np.float32) / 255))


def test_initialize_reads_settings_from_model_config(handler):
    assert handler.initialized
    assert handler.service.settings.top_k == 3
    assert handler.service.engine == "onnx"
    assert handler.service.name == "clf" and handler.service.version == "1.0"


def test_batch_of_raw_form_and_json_requests(handler, reference):
    x, _ = sample_images(3)
    ctx = MockContext(handler.service.root, "clf", headers=[{}, {"X-Top-K": "2"}, {}])
    data = [{"body": bytearray(encode(x[0]))},
            {"body": encode(x[1], "PNG")},
            {"data": encode(x[2]), "top_k": b"4"}]
    out = [json.loads(s) for s in handler.handle(data, ctx)]
    assert [ctx.status(i) for i in range(3)] == [200, 200, 200]
    assert [len(o["predictions"]) for o in out] == [3, 2, 4]
    p = reference(x)
    for i, o in enumerate(out):
        assert o["predictions"][0]["index"] == int(p[i].argmax())
        assert o["predictions"][0]["probability"] == pytest.approx(float(p[i].max()), abs=1e-5)
        assert ctx.response_headers[i]["content-type"] == "application/json"
        assert ctx.response_headers[i][BATCH_HEADER] == "3"
    metrics = {(kind, name): v for kind, name, v in ctx.metrics.calls}
    assert metrics[("counter", "InferredImages")] == 3 and metrics[("counter", "InvalidRequests")] == 0


def test_every_option_as_json_key_header_query_parameter_or_form_field(handler):
    """top_k reaches the model however it is sent: in the JSON body, as a header beside a JSON body, as a request
    parameter (an item key, as TorchServe hands over form fields) beside JSON or raw bytes; the same key twice with
    two values is refused, and an unknown JSON key is answered with the valid ones."""
    x, _ = sample_images(1)
    png = encode(x[0])
    b64 = base64.b64encode(png).decode()
    as_json = json.dumps({"image": b64}).encode()
    heads = [{}, {"X-Top-K": "2"}, {}, {}, {}, {"X-Top-K": "2"}, {}]
    ctx = MockContext(handler.service.root, "clf", headers=heads)
    data = [{"body": json.dumps({"image": b64, "top_k": 1}).encode()},  # JSON key
            {"body": as_json},  # header beside JSON
            {"body": as_json, "top_k": b"4"},  # a parameter beside JSON
            {"body": png, "top_k": b"5"},  # a parameter beside raw bytes
            {"data": png, "top_k": b"6"},  # multipart form field
            {"body": json.dumps({"image": b64, "top_k": 1}).encode()},  # JSON 1, header 2: which one?
            {"body": json.dumps({"data": b64}).encode()}]
    out = [json.loads(r) for r in handler.handle(data, ctx)]
    assert [ctx.status(i) for i in range(7)] == [200] * 5 + [400, 400]
    assert [len(o["predictions"]) for o in out[:5]] == [1, 2, 4, 5, 6]
    assert "top_k is given twice" in out[5]["error"]["message"]
    assert "valid keys: image, tensor, top_k" in out[6]["error"]["message"]


def test_one_bad_item_answers_its_own_400(handler, reference):
    x, _ = sample_images(4)
    ctx = MockContext(handler.service.root, "clf")
    data = [{"body": encode(x[0])}, {"body": b"\x89PNG\r\n\x1a\nnot really"}, {"body": encode(x[2])},
            {"body": {"tensor": {"shape": [28, 28], "data": [5.0] * 784}}}, {}, {"body": encode(x[3])}]
    out = [json.loads(s) for s in handler.handle(data, ctx)]
    assert [ctx.status(i) for i in range(6)] == [200, 400, 200, 400, 400, 200]
    assert ctx.statuses[1] == (400, "Bad Request")
    assert "cannot decode" in out[1]["error"]["message"]
    assert "[0, 1]" in out[3]["error"]["message"]
    p = reference(x)
    assert [out[i]["predictions"][0]["index"] for i in (0, 2, 5)] == [int(p[i].argmax()) for i in (0, 2, 3)]
    assert dict((n, v) for k, n, v in ctx.metrics.calls if k == "counter")["InvalidRequests"] == 3


def test_payload_limits_answer_413_and_415(handler):
    ctx = MockContext(handler.service.root, "clf")
    big = encode(np.zeros((5000, 5000), np.uint8))  # compresses small; refused on its pixel count
    data = [{"body": big}, {"body": b"GIF89a......"}]
    out = handler.handle(data, ctx)
    assert ctx.status(0) == 413 and "pixels" in json.loads(out[0])["error"]["message"]
    assert ctx.status(1) == 415


def test_kserve_v2_batch_safe(handler, reference):
    x, _ = sample_images(5)
    req = lambda ids, rid: {"id": rid, "inputs": [{"name": "input-0", "shape": [len(ids), 1, 28, 28],
                                                  "datatype": "UINT8", "data": x[ids].ravel().tolist()}]}
    bad = {"id": "bad", "inputs": [{"name": "input-0", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                    "data": [0.0] * 10}]}
    b64 = {"id": "b64", "inputs": [{"name": "img", "shape": [1], "datatype": "BYTES",
                                    "data": [base64.b64encode(encode(x[4])).decode()]}]}
    ctx = MockContext(handler.service.root, "clf")
    data = [{"body": req([0, 1], "r1")}, {"body": bad}, {"body": req([2, 3], "r2")}, {"body": json.dumps(b64).encode()}]
    out = [json.loads(s) for s in handler.handle(data, ctx)]
    assert [ctx.status(i) for i in range(4)] == [200, 400, 200, 200]
    assert isinstance(out[1]["error"], str)
    assert [o["id"] for o in (out[0], out[2], out[3])] == ["r1", "r2", "b64"]
    p = reference(x)
    for o, ids in ((out[0], [0, 1]), (out[2], [2, 3]), (out[3], [4])):
        outputs = {t["name"]: t for t in o["outputs"]}
        assert outputs["top_k_indices"]["shape"] == [len(ids), 3]
        top1 = np.array(outputs["top_k_indices"]["data"]).reshape(len(ids), 3)[:, 0]
        np.testing.assert_array_equal(top1, p[ids].argmax(1))
        probs = np.array(outputs["top_k_probabilities"]["data"]).reshape(len(ids), 3)[:, 0]
        np.testing.assert_allclose(probs, p[ids].max(1), atol=1e-6)


def test_handle_never_raises_and_encodes_standard_json(handler, monkeypatch):
    x, _ = sample_images(2)
    ctx = MockContext(handler.service.root, "clf")
    real = handler.to_raw

    def to_raw(item, headers=None):
        if item.get("body") == b"boom":
            raise RuntimeError("adapter bug")
        return real(item, headers)

    monkeypatch.setattr(handler, "to_raw", to_raw)
    out = handler.handle([{"body": encode(x[0])}, {"body": b"boom"}, {"body": b'{"a": NaN}'},
                          {"body": encode(x[1])}], ctx)
    assert [ctx.status(i) for i in range(4)] == [200, 500, 400, 200]
    assert all(json.loads(o) for o in out)

    monkeypatch.setattr(handler.service, "answer", lambda items, outs: [{"p": float("nan")} for _ in items])
    ctx = MockContext(handler.service.root, "clf")
    out = handler.handle([{"body": encode(x[0])}], ctx)
    assert ctx.status(0) == 500 and json.loads(out[0])["error"]["code"] == "internal_error"

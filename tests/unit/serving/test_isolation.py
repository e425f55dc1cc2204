"""Per-item isolation: whatever one request does, it gets its own JSON answer and its batch-mates get theirs."""
import json
import logging

import numpy as np
import pytest

from serving.runtime.schemas import ServiceSettings
from serving.runtime.service import ClassifierService, RawRequest
from tests.unit.serving.builders import encode, sample_images

HOSTILE = [
    b'{"a":' + b"[" * 1100,
    b"[" * 5000 + b"]" * 5000,
    b'{"tensor": {"shape": [28, 28], "data": [1' + b"0" * 400 + b"]}}",
    b'{"tensor": {"shape": [28, 28], "data": [NaN]}}',
    b'{"image": "AAAA", "top_k": 1e999}',
    {"tensor": {"shape": [28, 28], "data": [10**400]}},  # as a host that decoded the JSON itself hands it over
    {"a": [[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]},
]


@pytest.fixture(scope="module")
def service(classifier_export):
    return ClassifierService(classifier_export, ServiceSettings(self_test=False))


def test_hostile_bodies_answer_400_and_good_ones_200(service):
    x, _ = sample_images(4)
    raws = []
    for i, h in enumerate(HOSTILE):
        raws.append(RawRequest(encode(x[i % 4])))
        raws.append(RawRequest(h))
    replies = service.handle(raws)
    assert [r.status for r in replies[0::2]] == [200] * len(HOSTILE)
    assert [r.status for r in replies[1::2]] == [400] * len(HOSTILE), [r.body for r in replies[1::2]]
    for r in replies:
        json.loads(r.json())  # every answer is standard JSON


def test_unexpected_decode_failure_is_that_items_500_with_an_id(service, monkeypatch, caplog):
    x, _ = sample_images(3)
    real = service.decode

    def decode(raw):
        if raw.params.get("boom"):
            raise KeyError("a bug")
        return real(raw)

    monkeypatch.setattr(service, "decode", decode)
    with caplog.at_level(logging.ERROR):
        replies = service.handle([RawRequest(encode(x[0])), RawRequest(encode(x[1]), {"boom": "1"}),
                                  RawRequest(encode(x[2]))])
    assert [r.status for r in replies] == [200, 500, 200]
    err = replies[1].body["error"]
    assert err["code"] == "internal_error" and err["id"] in err["message"]
    assert any(err["id"] in rec.getMessage() for rec in caplog.records)  # the operator can find it


def test_a_batch_failure_stays_with_the_item_that_causes_it(service, monkeypatch):
    x, _ = sample_images(3)
    real = service.forward

    def forward(batch):
        if (batch == 0).all(axis=(1, 2, 3)).any():  # an all-black image trips a (simulated) engine bug
            raise RuntimeError("engine failure")
        return real(batch)

    monkeypatch.setattr(service, "forward", forward)
    black = np.zeros((28, 28), np.uint8)
    replies = service.handle([RawRequest(encode(x[0])), RawRequest(encode(black)), RawRequest(encode(x[2]))])
    assert [r.status for r in replies] == [200, 500, 200]


def test_form_encoded_upload_says_which_content_type_to_send(service):
    x, _ = sample_images(1)
    r = service.handle([RawRequest(None, content_type="application/x-www-form-urlencoded")])[0]
    assert r.status == 415 and "Content-Type: image/png" in r.body["error"]["message"]
    r = service.handle([RawRequest(b"GIF89a....", content_type="image/png")])[0]
    assert r.status == 415 and "says image/png" in r.body["error"]["message"]
    assert service.handle([RawRequest(encode(x[0]), content_type="application/octet-stream")])[0].status == 200


def test_v2_images_share_one_decode_budget(classifier_export):
    import base64

    svc = ClassifierService(classifier_export, ServiceSettings(self_test=False, max_image_pixels=300 * 300,
                                                               max_request_pixels=2 * 300 * 300))
    img = base64.b64encode(encode(np.zeros((300, 300), np.uint8))).decode()
    ok, too_many, bad_shape = svc.handle([
        RawRequest({"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": [img] * 2}]}),
        RawRequest({"inputs": [{"name": "x", "shape": [3], "datatype": "BYTES", "data": [img] * 3}]}),
        RawRequest({"inputs": [{"name": "x", "shape": [-1, -1], "datatype": "BYTES", "data": [img]}]})])
    assert ok.status == 200
    assert too_many.status == 413 and "decode budget" in too_many.body["error"]
    assert bad_shape.status == 400

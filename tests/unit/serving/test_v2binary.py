"""The v2 binary tensor data extension, against the standard client's own encoder and decoder
(``tritonclient.http``'s ``generate_request_body`` / ``parse_response_body``), in process."""
import base64
import re
import struct

import numpy as np
import pytest

from serving.runtime import v2binary
from serving.runtime.errors import InvalidInput
from serving.runtime.schemas import ServiceSettings
from serving.runtime.codecs.base import dumps
from serving.runtime.service import ClassifierService, RawRequest, softmax
from tests.unit.serving.builders import encode, sample_images

httpclient = pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def images():
    return sample_images(4, seed=5)


@pytest.fixture(scope="module")
def classifier(classifier_export):
    return ClassifierService(classifier_export, ServiceSettings(engine="onnx", self_test=False))


def fp32_input(x: np.ndarray, binary: bool = True):
    t = httpclient.InferInput("x", list(x.shape), "FP32")
    t.set_data_from_numpy(x, binary_data=binary)
    return t


def png_input(pngs: list[bytes], binary: bool = True):
    t = httpclient.InferInput("img", [len(pngs)], "BYTES")
    data = pngs if binary else [base64.b64encode(p).decode() for p in pngs]
    t.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    return t


def run(svc, inputs, outputs=None, **kw):
    """One request as tritonclient sends it; the reply as tritonclient reads it (or the error reply)."""
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kw)
    reply = svc.handle([RawRequest(body, header_length=None if json_size is None else str(json_size))])[0]
    if reply.status != 200:
        return reply, None
    data, _, headers = reply.payload()
    length = headers.get(v2binary.HEADER_LENGTH)
    return reply, httpclient.InferenceServerClient.parse_response_body(
        data, header_length=None if length is None else int(length))


def test_fp32_batch_binary_in_and_out(classifier, images):
    x = images[0][:3, None].astype(np.float32) / 255
    reply, res = run(classifier, [fp32_input(x)], request_id="r1")
    assert reply.status == 200 and reply.binary_outputs  # the client's default asks for binary outputs
    ref = softmax(classifier.session.run(x))
    idx = res.as_numpy("top_k_indices")
    assert idx.dtype == np.int64 and idx.shape == (3, 5)
    np.testing.assert_array_equal(idx[:, 0], ref.argmax(1))
    np.testing.assert_allclose(res.as_numpy("top_k_probabilities")[:, 0], ref.max(1), atol=1e-6)
    labels = res.as_numpy("top_k_labels")
    assert labels.shape == (3, 5) and labels[0, 0].decode() == classifier.labels[ref[0].argmax()]
    assert res.get_response()["id"] == "r1"


def test_png_bytes_binary_and_json_agree(classifier, images):
    pngs = [encode(a) for a in images[0][:2]]
    _, binary = run(classifier, [png_input(pngs)])
    outs = [httpclient.InferRequestedOutput("probabilities", binary_data=False),
            httpclient.InferRequestedOutput("top_k_indices", binary_data=True)]
    reply, mixed = run(classifier, [png_input(pngs, binary=False)], outputs=outs)
    assert reply.binary_outputs == ("top_k_indices",)
    np.testing.assert_array_equal(binary.as_numpy("top_k_indices"), mixed.as_numpy("top_k_indices"))
    p = mixed.as_numpy("probabilities")
    assert p.shape == (2, 10)
    np.testing.assert_array_equal(np.argsort(-p, axis=1, kind="stable")[:, :5], mixed.as_numpy("top_k_indices"))
    # JSON outputs come back as JSON numbers in the same document.
    assert "data" in mixed.get_output("probabilities") and "data" not in mixed.get_output("top_k_indices")


def test_fp32_json_only_request(classifier, images):
    x = images[0][:1, None].astype(np.float32) / 255
    outs = [httpclient.InferRequestedOutput("top_k_indices", binary_data=False)]
    reply, res = run(classifier, [fp32_input(x, binary=False)], outputs=outs, parameters={"top_k": 2})
    assert reply.status == 200 and reply.binary_outputs == ()
    assert res.as_numpy("top_k_indices").shape == (1, 2)


def body_with(header: dict, tail: bytes) -> tuple[bytes, str]:
    head = dumps(header)
    return head + tail, str(len(head))


def fp32_header(size, shape=(1, 1, 28, 28)):
    return {"inputs": [{"name": "x", "shape": list(shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": size}}]}


@pytest.mark.parametrize("make,message", [
    (lambda: (b'{"inputs": []}', "999"), "only 14 bytes"),
    (lambda: (b'{"inputs": []}', "-1"), "must not be negative"),
    (lambda: (b'{"inputs": []}', "abc"), "byte count"),
    (lambda: body_with(fp32_header(4 * 784 + 4), bytes(4 * 784)), "runs past the end"),
    (lambda: body_with(fp32_header(-4), bytes(4 * 784)), "must not be negative"),
    (lambda: body_with(fp32_header(4 * 783), bytes(4 * 783)), "does not match shape"),
    (lambda: body_with(fp32_header(4 * 784), bytes(4 * 785)), "4 bytes after"),
    (lambda: body_with(fp32_header("784"), bytes(4 * 784)), "integer byte count"),
    (lambda: body_with({"inputs": [{"name": "img", "shape": [2], "datatype": "BYTES",
                                    "parameters": {"binary_data_size": 12}}]},
                       struct.pack("<I", 3) + b"abc" + struct.pack("<I", 9) + b"x"), "runs past its"),
    (lambda: body_with({"inputs": [{"name": "img", "shape": [2], "datatype": "BYTES",
                                    "parameters": {"binary_data_size": 7}}]}, struct.pack("<I", 3) + b"abc"),
     r"1 BYTES elements .* \(2 expected\)"),
    (lambda: body_with({"inputs": [{"name": "x", "shape": [1], "datatype": "BF16",
                                    "parameters": {"binary_data_size": 2}}]}, bytes(2)), "cannot travel"),
    (lambda: body_with({**fp32_header(4 * 784), "parameters": {"priority": 1}}, bytes(4 * 784)),
     "unknown parameter"),
    (lambda: body_with({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                    "parameters": {"binary_data_size": 3136, "shared_memory_region": "r"}}]},
                       bytes(3136)), "unknown parameter"),
    (lambda: body_with({**fp32_header(4 * 784), "outputs": [{"name": "top_k_indices",
                                                             "parameters": {"classification": 2}}]},
                       bytes(4 * 784)), "unknown parameter"),
    (lambda: body_with({**fp32_header(4 * 784), "parameters": {"binary_data_output": "yes"}}, bytes(4 * 784)),
     "true or false"),
    (lambda: (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.5]}]}\xc1', "10"),
     "not valid JSON"),
])
def test_malformed_binary_bodies_answer_400(classifier, make, message):
    body, length = make()
    reply = classifier.handle([RawRequest(body, header_length=length)])[0]
    assert reply.status == 400, reply.body
    assert isinstance(reply.body["error"], str)  # the v2 error form, which tritonclient reads
    assert re.search(message, reply.body["error"]), reply.body["error"]


def test_a_bad_binary_request_hurts_no_batch_mate(classifier, images):
    x = images[0][:2, None].astype(np.float32) / 255
    good, size = httpclient.InferenceServerClient.generate_request_body([fp32_input(x)])
    bad = good[:-8]  # cut short: binary_data_size now runs past the end
    replies = classifier.handle([RawRequest(good, header_length=str(size)), RawRequest(bad, header_length=str(size)),
                                 RawRequest(encode(images[0][0]))])
    assert [r.status for r in replies] == [200, 400, 200]


def test_binary_data_size_without_the_header_is_refused(classifier):
    body = fp32_header(4 * 784)
    reply = classifier.handle([RawRequest(body)])[0]
    assert reply.status == 400 and "no Inference-Header-Content-Length" in reply.body["error"]


def test_module_round_trip_of_every_fixed_datatype():
    rng = np.random.default_rng(0)
    for name, dtype in v2binary.DTYPES.items():
        a = (rng.random((2, 3)) * 100).astype(dtype)
        doc = {"outputs": [{"name": "t", "datatype": name, "shape": [2, 3], "data": a}]}
        body, length = v2binary.encode_response(doc, ("t",), dumps)
        head = __import__("json").loads(body[:length])
        assert head["outputs"][0]["parameters"]["binary_data_size"] == a.nbytes
        inputs = [{"name": "t", "datatype": name, "shape": [2, 3],
                   "parameters": {"binary_data_size": a.nbytes}}]
        back = v2binary.binary_inputs(inputs, memoryview(body[length:]))[0]
        np.testing.assert_array_equal(back, a)
    items = [b"", b"abc", "\u00e9".encode()]
    assert v2binary.deserialize_bytes(memoryview(v2binary.serialize_bytes(items))) == items
    with pytest.raises(InvalidInput, match="must not be negative"):
        v2binary.header_length("-3")

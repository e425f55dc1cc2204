"""KServe v2 through the standard client, ``tritonclient.http``, against the real TorchServe: its defaults (binary
tensor data in and out), JSON-only requests, FP32 tensors and BYTES images, one and many images per request,
both models; and malformed binary bodies answered 400 in the v2 error form."""
import base64

import numpy as np
import pytest

from tests.unit.serving.builders import encode, sample_images

pytestmark = pytest.mark.integration
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def images():
    return sample_images(16, seed=11)


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.cfg.ports.inference}", network_timeout=60)
    yield c
    c.close()


@pytest.fixture
def auth(server):
    # A fresh dict per test: tritonclient writes Inference-Header-Content-Length into the headers it is given,
    # so a shared dict would carry one request's header length into the next.
    return dict(server.inst.headers("inference"))


@pytest.fixture(scope="module")
def offline(trained_classifier):
    import torch

    from training.checkpoint import load_model

    model, _, _ = load_model(trained_classifier)

    def probs(x_uint8: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(x_uint8[:, None].astype(np.float32) / 255)).double(),
                                 1).numpy()

    return probs


def fp32(x_uint8: np.ndarray, binary: bool = True):
    t = httpclient.InferInput("x", [len(x_uint8), 1, 28, 28], "FP32")
    t.set_data_from_numpy((x_uint8[:, None] / 255).astype(np.float32), binary_data=binary)
    return t


def pngs(x_uint8: np.ndarray, binary: bool = True):
    data = [encode(a) for a in x_uint8]
    if not binary:
        data = [base64.b64encode(d).decode() for d in data]
    t = httpclient.InferInput("img", [len(data)], "BYTES")
    t.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    return t


@pytest.mark.parametrize("n", [1, 16])
@pytest.mark.parametrize("make", [fp32, pngs], ids=["fp32", "png"])
def test_client_defaults_binary_in_and_out(client, auth, images, offline, make, n):
    x, _ = images
    res = client.infer("clf", [make(x[:n])], headers=auth)
    p = offline(x[:n])
    idx = res.as_numpy("top_k_indices")
    assert idx.shape == (n, 5)
    np.testing.assert_array_equal(idx[:, 0], p.argmax(1))
    np.testing.assert_allclose(res.as_numpy("top_k_probabilities")[:, 0], p.max(1), atol=1e-5)
    assert res.as_numpy("top_k_labels").shape == (n, 5)


@pytest.mark.parametrize("make", [fp32, pngs], ids=["fp32", "png"])
def test_json_only_requests(client, auth, images, offline, make):
    x, _ = images
    outs = [httpclient.InferRequestedOutput("probabilities", binary_data=False)]
    res = client.infer("clf", [make(x[:3], binary=False)], outputs=outs, headers=auth, parameters={"top_k": 2})
    assert "data" in res.get_output("probabilities")  # answered as JSON numbers
    np.testing.assert_allclose(res.as_numpy("probabilities"), offline(x[:3]), atol=1e-5)


def test_retrieval_neighbors_over_binary(client, auth, images):
    x, _ = images
    outs = [httpclient.InferRequestedOutput("neighbor_ids"), httpclient.InferRequestedOutput("embedding")]
    res = client.infer("ret", [pngs(x[:4])], outputs=outs, headers=auth, parameters={"k": 3})
    assert res.as_numpy("neighbor_ids").shape == (4, 3)
    emb = res.as_numpy("embedding")
    assert emb.shape[0] == 4 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)


def raw_v2(server, body: bytes, header_length: str):
    return server.request("POST", "/v2/models/clf/infer", body, {"Inference-Header-Content-Length": header_length,
                                                                 "Content-Type": "application/octet-stream"})


def test_malformed_binary_bodies_answer_400(server, client, auth, images):
    x, _ = images
    good, size = httpclient.InferenceServerClient.generate_request_body([fp32(x[:2])])
    assert raw_v2(server, good, str(size)).status == 200
    cases = {
        "longer than the body": (good, str(len(good) + 1)),
        "negative header length": (good, "-5"),
        "cut short": (good[:-4], str(size)),
        "size not matching the shape": (good.replace(b'"binary_data_size":6272', b'"binary_data_size":3136'),
                                        str(size)),
    }
    for what, (body, length) in cases.items():
        r = raw_v2(server, body, length)
        assert r.status == 400 and isinstance(r.body.get("error"), str), (what, r.status, r.body)
    # Through the client too: shape says 3 images, the data holds 2.
    t = httpclient.InferInput("x", [3, 1, 28, 28], "FP32")
    t.set_data_from_numpy((x[:3, None] / 255).astype(np.float32))
    t._raw_data = t._raw_data[:2 * 784 * 4]
    t._parameters["binary_data_size"] = len(t._raw_data)
    with pytest.raises(InferenceServerException, match="does not match shape") as e:
        client.infer("clf", [t], headers=auth)
    assert e.value.status() == "400"

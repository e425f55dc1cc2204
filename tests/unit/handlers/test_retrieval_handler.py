import json

import numpy as np
import pytest

from handlers.retrieval import RetrievalHandler
from serving.runtime.artifacts import load_manifest
from serving.runtime.index import RetrievalIndex
from serving.runtime.session import open_session
from tests.unit.serving.builders import MockContext, encode, sample_images


@pytest.fixture(scope="module")
def handler(retrieval_model_dir):
    h = RetrievalHandler()
    h.initialize(MockContext(retrieval_model_dir, "ret"))
    return h


def test_neighbors_match_brute_force_over_the_gallery(handler, retrieval_model_dir):
    x, _ = sample_images(3, seed=5)
    ctx = MockContext(retrieval_model_dir, "ret", headers=[{}, {"x-k": "2"}, {"X-Output": "embedding"}])
    out = [json.loads(s) for s in handler.handle([{"body": encode(a)} for a in x], ctx)]
    assert [ctx.status(i) for i in range(3)] == [200, 200, 200]
    assert len(out[0]["neighbors"]) == 4 and len(out[1]["neighbors"]) == 2
    assert "neighbors" not in out[2] and len(out[2]["embedding"]) == 32
    sess = open_session(retrieval_model_dir, load_manifest(retrieval_model_dir), engine="torchscript")
    q = sess.run(x[:, None].astype(np.float32) / 255)
    np.testing.assert_allclose(np.array(out[2]["embedding"]), q[2], atol=1e-5)
    idx = RetrievalIndex.load(retrieval_model_dir)
    gallery = idx.index.reconstruct_n(0, len(idx))
    for i in range(2):
        order = np.argsort(-(gallery @ q[i]))
        got = [n["id"] for n in out[i]["neighbors"]]
        assert got == [idx.ids[j] for j in order[:len(got)]]
        assert out[i]["neighbors"][0]["label"] == int(idx.labels[order[0]])
        assert out[i]["neighbors"][0]["label_name"] == idx.class_names[int(idx.labels[order[0]])]


def test_bad_option_is_a_400_for_that_item_only(handler, retrieval_model_dir):
    x, _ = sample_images(2)
    ctx = MockContext(retrieval_model_dir, "ret", headers=[{"x-k": "0"}, {}])
    out = [json.loads(s) for s in handler.handle([{"body": encode(x[0])}, {"body": encode(x[1])}], ctx)]
    assert ctx.status(0) == 400 and ctx.status(1) == 200
    assert "k" in out[0]["error"]["message"]


def test_v2_neighbors(handler, retrieval_model_dir):
    x, _ = sample_images(2)
    body = {"inputs": [{"name": "x", "shape": [2, 1, 28, 28], "datatype": "UINT8", "data": x.ravel().tolist()}],
            "parameters": {"k": 3}}
    ambiguous = {"inputs": [{"name": "x", "shape": [2, 28, 28], "datatype": "UINT8", "data": x.ravel().tolist()}]}
    ctx = MockContext(retrieval_model_dir, "ret")
    ok, bad = handler.handle([{"body": body}, {"body": ambiguous}], ctx)
    assert ctx.status(0) == 200 and ctx.status(1) == 400
    out = {t["name"]: t for t in json.loads(ok)["outputs"]}
    assert set(out) == {"neighbor_ids", "neighbor_labels", "neighbor_distances"}
    assert out["neighbor_ids"]["shape"] == [2, 3] and out["neighbor_ids"]["datatype"] == "BYTES"
    d = np.array(out["neighbor_distances"]["data"]).reshape(2, 3)
    assert (np.diff(d, axis=1) >= -1e-6).all()
    assert "does not match" in json.loads(bad)["error"]

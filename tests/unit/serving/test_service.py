import base64
import json
import shutil

import numpy as np
import pytest

from serving.runtime.artifacts import load_manifest
from serving.runtime.errors import ArtifactError
from serving.runtime.index import RetrievalIndex
from serving.runtime.schemas import ServiceSettings
from serving.runtime.service import ClassifierService, RawRequest, RetrievalService, load_service, softmax
from serving.runtime.session import OnnxSession, TorchScriptSession, open_session
from tests.unit.serving.builders import encode, sample_images


@pytest.fixture(scope="module")
def images():
    return sample_images(6)


@pytest.fixture(scope="module")
def classifier(classifier_export):
    return ClassifierService(classifier_export, ServiceSettings(engine="onnx"))


@pytest.fixture(scope="module")
def retrieval_dir(embedder_export, tmp_path_factory, images):
    """An embedder export plus a small gallery index (the archive step, without the archive)."""
    root = tmp_path_factory.mktemp("retrieval")
    for f in embedder_export.iterdir():
        shutil.copy2(f, root / f.name)
    m = load_manifest(root)
    sess = open_session(root, m)
    x, y = sample_images(64, seed=1)
    emb = sess.run(x[:, None].astype(np.float32) / 255)
    RetrievalIndex.build(emb, [f"g{i}" for i in range(64)], y, ("c%d" % i for i in range(10)),
                         model_sha256=m.artifacts["onnx"].sha256).save(root)
    return root


def test_engines_agree_and_match_probes(classifier_export):
    m = load_manifest(classifier_export)
    onnx = open_session(classifier_export, m, engine="onnx")
    ts = open_session(classifier_export, m, engine="torchscript")
    assert isinstance(onnx, OnnxSession) and isinstance(ts, TorchScriptSession)
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(onnx.run(x), ts.run(x), atol=1e-5)
    assert onnx.run(x[:1]).shape == (1, 10)  # dynamic batch axis


def test_changed_artifact_refused_not_papered_over(classifier_export, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(classifier_export, root)
    with open(root / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="SHA-256"):
        ClassifierService(root, ServiceSettings(engine="onnx"))


def test_self_test_catches_a_different_model(classifier_export, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(classifier_export, root)
    from serving.runtime.probe_set import ProbeSet

    p = ProbeSet.load(root / "probes.npz")
    ProbeSet(p.x, p.y, p.expected + 1e-2).save(root / "probes.npz")
    m = json.loads((root / "spec.json").read_text())
    from serving.runtime.artifacts import describe_file

    m["artifacts"]["probes"] = describe_file(root, "probes.npz").model_dump()
    (root / "spec.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="recorded at export"):
        ClassifierService(root, ServiceSettings())
    ClassifierService(root, ServiceSettings(self_test=False))  # the check is what failed, nothing else


def test_classify_png_bytes_matches_session(classifier, images):
    x, _ = images
    replies = classifier.handle([RawRequest(encode(x[0]), {"top_k": "3"})])
    assert replies[0].status == 200
    preds = replies[0].body["predictions"]
    assert len(preds) == 3
    p = softmax(classifier.session.run(x[:1, None].astype(np.float32) / 255))[0]
    assert preds[0]["index"] == int(p.argmax())
    assert preds[0]["label"] == classifier.labels[preds[0]["index"]]
    assert preds[0]["probability"] == pytest.approx(float(p.max()), abs=1e-6)
    probs = [q["probability"] for q in preds]
    assert probs == sorted(probs, reverse=True)


def test_native_json_base64_and_tensor_agree(classifier, images):
    x, _ = images
    b64 = {"image": base64.b64encode(encode(x[1])).decode(), "top_k": 10}
    ten = {"tensor": {"shape": [28, 28], "data": x[1].ravel().tolist(), "dtype": "uint8"}, "top_k": 10}
    r1, r2 = classifier.handle([RawRequest(b64), RawRequest(json.dumps(ten).encode())])
    assert r1.status == r2.status == 200
    assert r1.body == r2.body


def test_one_bad_item_does_not_fail_its_batch(classifier, images):
    x, _ = images
    raws = [RawRequest(encode(x[i])) for i in range(4)]
    raws.insert(2, RawRequest(b"\x89PNG\r\n\x1a\n broken"))
    raws.append(RawRequest({"image": "x", "tensor": {"shape": [28, 28], "data": [0]}}))
    raws.append(RawRequest({"tensor": {"shape": [28, 28], "data": [0.1] * 784}, "top_k": 11}))
    raws.append(RawRequest({"image": base64.b64encode(encode(x[0])).decode(), "topk": 2}))
    replies = classifier.handle(raws)
    assert [r.status for r in replies] == [200, 200, 400, 200, 200, 400, 400, 400]
    for r in replies:
        if r.status != 200:
            assert set(r.body["error"]) == {"status", "code", "message"}
    assert "exactly one" in replies[5].body["error"]["message"]
    assert "at most 10" in replies[6].body["error"]["message"]
    assert "topk" in replies[7].body["error"]["message"]
    # The good ones are answered exactly as they would be alone.
    alone = classifier.handle([RawRequest(encode(x[2]))])[0]
    assert replies[3].body == alone.body


@pytest.mark.parametrize("body,status", [
    (b"plain text", 415), (b"", 400), (b"{not json", 400), (b"[1, 2]", 400), ("text", 400),
    (None, 400), ({"image": "AAAA"}, 415),
])
def test_bad_bodies(classifier, body, status):
    assert classifier.handle([RawRequest(body)])[0].status == status


def test_v2_request_batch_inside_one_request(classifier, images):
    x, _ = images
    data = (x[:3].astype(np.float32) / 255).ravel().tolist()
    body = {"id": "abc", "inputs": [{"name": "x", "shape": [3, 1, 28, 28], "datatype": "FP32", "data": data}],
            "parameters": {"top_k": 2}, "outputs": [{"name": "top_k_indices"}, {"name": "probabilities"}]}
    r = classifier.handle([RawRequest(body)])[0]
    assert r.status == 200
    assert r.body["id"] == "abc" and r.body["model_name"] == classifier.name
    out = {o["name"]: o for o in r.body["outputs"]}
    assert list(out) == ["top_k_indices", "probabilities"]
    assert out["top_k_indices"]["shape"] == [3, 2] and out["top_k_indices"]["datatype"] == "INT64"
    p = np.array(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    ref = softmax(classifier.session.run(x[:3, None].astype(np.float32) / 255))
    np.testing.assert_allclose(p, ref, atol=1e-6)
    np.testing.assert_array_equal(np.array(out["top_k_indices"]["data"]).reshape(3, 2)[:, 0], ref.argmax(1))


def test_v2_bytes_input_and_errors(classifier, images):
    x, _ = images
    b64 = [base64.b64encode(encode(x[i])).decode() for i in range(2)]
    ok = {"inputs": [{"name": "img", "shape": [2], "datatype": "BYTES", "data": b64}]}
    bad_type = {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "INT32", "data": [0] * 784}]}
    bad_out = {"inputs": ok["inputs"], "outputs": [{"name": "logits"}]}
    bad_shape = {"inputs": [{"name": "x", "shape": [1, 3, 28, 28], "datatype": "FP32", "data": [0.0] * 2352}]}
    r = classifier.handle([RawRequest(ok), RawRequest(bad_type), RawRequest(bad_out), RawRequest(bad_shape),
                           RawRequest(b'{"inputs": [}')])
    assert [q.status for q in r] == [200, 400, 400, 400, 400]
    assert r[0].body["outputs"][0]["shape"] == [2, 5]
    for q in r[1:]:
        assert isinstance(q.body["error"], str)  # the v2 error form


def test_retrieval_neighbors_and_embedding(retrieval_dir, images):
    svc = load_service(retrieval_dir, ServiceSettings(k=5))
    assert isinstance(svc, RetrievalService)
    x, _ = images
    r = svc.handle([RawRequest(encode(x[0])), RawRequest({"image": base64.b64encode(encode(x[0])).decode(),
                                                          "output": "both", "k": 3})])
    assert [q.status for q in r] == [200, 200]
    n5, both = r[0].body["neighbors"], r[1].body
    assert len(n5) == 5 and len(both["neighbors"]) == 3
    assert [n["id"] for n in both["neighbors"]] == [n["id"] for n in n5[:3]]
    d = [n["distance"] for n in n5]
    assert d == sorted(d)
    emb = np.array(both["embedding"], np.float32)
    assert emb.shape == (32,) and abs(np.linalg.norm(emb) - 1) < 1e-4
    # Brute force over the gallery gives the same nearest items.
    idx = svc.index
    sims = (idx.index.reconstruct_n(0, len(idx))) @ emb
    assert [idx.ids[j] for j in np.argsort(-sims)[:3]] == [n["id"] for n in both["neighbors"]]
    assert d[0] == pytest.approx(1 - float(sims.max()), abs=1e-5)


def test_retrieval_v2_and_limits(retrieval_dir, images):
    svc = load_service(retrieval_dir, ServiceSettings(max_k=20, k=5))
    x, _ = images
    body = {"inputs": [{"name": "x", "shape": [2, 1, 28, 28], "datatype": "UINT8", "data": x[:2].ravel().tolist()}],
            "outputs": [{"name": "neighbor_ids"}, {"name": "embedding"}], "parameters": {"k": 4}}
    r = svc.handle([RawRequest(body), RawRequest({"tensor": {"shape": [28, 28], "data": [0.0] * 784}, "k": 21})])
    assert r[0].status == 200 and r[1].status == 400
    out = {o["name"]: o for o in r[0].body["outputs"]}
    assert out["neighbor_ids"]["shape"] == [2, 4] and out["embedding"]["shape"] == [2, 32]


def test_gallery_from_another_model_refused(retrieval_dir, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(retrieval_dir, root)
    meta = json.loads((root / "gallery.json").read_text())
    meta["model_sha256"] = "0" * 64
    (root / "gallery.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="different embedder"):
        RetrievalService(root)


def test_wrong_task_refused(classifier_export):
    with pytest.raises(ArtifactError, match="classification model"):
        RetrievalService(classifier_export)


def test_protocols_decode_to_one_typed_input_and_answer(classifier, images):
    """The codecs meet the task at its typed input and response: a PNG sent natively and the same PNG in a v2
    request decode to the same images and options, and the task answers both with equal typed responses."""
    from serving.runtime.codecs import KSERVE_V2, NATIVE

    x, _ = images
    png = encode(x[0])
    v2 = {"inputs": [{"name": "img", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png).decode()]}],
          "parameters": {"top_k": 2}}
    a, b = classifier.decode(RawRequest(png, {"top_k": "2"})), classifier.decode(RawRequest(v2))
    assert (a.codec, b.codec) == (NATIVE, KSERVE_V2)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.options == b.options and a.fields == b.fields == {"predictions"}
    ra, rb = classifier.answer([a, b], [classifier.forward(a.x), classifier.forward(b.x)])
    assert ra == rb
    native, v2_body = (it.codec.encode(it, r, classifier) for it, r in ((a, ra), (b, rb)))
    out = {o["name"]: o["data"] for o in v2_body["outputs"]}
    assert out["top_k_indices"] == [p["index"] for p in native["predictions"]]
    assert out["top_k_labels"] == [p["label"] for p in native["predictions"]]


def test_threads_auto_share_the_cores_among_workers(classifier_export, monkeypatch):
    """threads 0 (the default): one worker owns every core this process may use, N workers split them, never
    below one; a stated count is kept."""
    import serving.runtime.session as session_mod

    monkeypatch.setattr(session_mod.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert ServiceSettings().threads == 0
    assert [session_mod.auto_threads(w) for w in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]
    assert ClassifierService(classifier_export, ServiceSettings(engine="onnx"), workers=2).settings.threads == 2
    svc = ClassifierService(classifier_export, ServiceSettings(engine="onnx", threads=3), workers=2)
    assert svc.settings.threads == 3 and svc.describe()["threads"] == 3


def test_onnx_session_with_threads_answers_like_one_thread(classifier_export):
    """Several intra-op threads (idle ones sleeping, not spinning) give the one-thread answer."""
    m = load_manifest(classifier_export)
    x = np.random.default_rng(1).random((33, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(open_session(classifier_export, m, engine="onnx", threads=2).run(x),
                               open_session(classifier_export, m, engine="onnx", threads=1).run(x), atol=1e-5)

import numpy as np
import pytest

from serving.runtime.index import RetrievalIndex


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def brute_force(gallery, queries, k):
    """The obviously-correct oracle: cosine similarity to every gallery item, sorted."""
    sims = _unit(queries) @ _unit(gallery).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return 1 - np.take_along_axis(sims, order, 1), order


def test_flat_index_equals_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    g, q = rng.normal(size=(500, 16)), rng.normal(size=(20, 16))
    idx = RetrievalIndex.build(g, [f"id{i}" for i in range(500)], rng.integers(0, 10, 500), kind="flat")
    d, p = idx.search(q, 7)
    d_ref, p_ref = brute_force(g, q, 7)
    np.testing.assert_array_equal(p, p_ref)
    np.testing.assert_allclose(d, d_ref, atol=1e-5)
    idx.save(tmp_path)
    again = RetrievalIndex.load(tmp_path)
    np.testing.assert_array_equal(again.search(q, 7)[1], p)
    assert again.ids[3] == "id3" and again.labels.tolist() == idx.labels.tolist()


def test_hnsw_recall_is_high_on_a_larger_gallery(tmp_path):
    rng = np.random.default_rng(1)
    g, q = rng.normal(size=(5000, 32)), rng.normal(size=(50, 32))
    idx = RetrievalIndex.build(g, list(range(5000)), np.zeros(5000, int), kind="hnsw", ef_search=128)
    _, p = idx.search(q, 10)
    _, p_ref = brute_force(g, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(p, p_ref)])
    assert recall > 0.9
    idx.save(tmp_path)
    assert RetrievalIndex.load(tmp_path).kind == "hnsw"


def test_k_capped_at_gallery_size_and_shape_checked():
    idx = RetrievalIndex.build(np.eye(3, 4), ["a", "b", "c"], [0, 1, 2])
    d, p = idx.search(np.eye(1, 4), 10)
    assert p.shape == (1, 3) and p[0, 0] == 0 and d[0, 0] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError):
        idx.search(np.ones((1, 5)), 1)

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


@pytest.mark.parametrize("block_rows", [64, 1 << 16])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_exact_search_by_blocks_equals_brute_force_and_faiss_scan(monkeypatch, block_rows, k):
    """The matrix-product search, one block or many (k above a block's size included), answers what the plain
    computation and FAISS's own flat scan answer: same positions in the same order, same distances."""
    import serving.runtime.index as index_mod

    monkeypatch.setattr(index_mod, "BLOCK_ROWS", block_rows)
    rng = np.random.default_rng(2)
    g, q = rng.normal(size=(500, 32)).astype(np.float32), rng.normal(size=(16, 32)).astype(np.float32)
    idx = RetrievalIndex.build(g, list(range(500)), np.zeros(500, int), kind="flat")
    d, p = idx.search(q, k)
    d_ref, p_ref = brute_force(g.astype(np.float64), q.astype(np.float64), k)
    np.testing.assert_array_equal(p, p_ref)
    np.testing.assert_allclose(d, d_ref, atol=1e-5)
    sims, p_faiss = idx.index.search(np.ascontiguousarray(_unit(q), np.float32), k)
    np.testing.assert_array_equal(p, p_faiss)
    # One query at a time answers what the batch answered.
    for i in range(0, 16, 5):
        np.testing.assert_array_equal(idx.search(q[i:i + 1], k)[1], p[i:i + 1])
    assert p.dtype == np.int64 and d.dtype == np.float32


def test_exact_search_runs_on_the_given_thread_budget_and_puts_torchs_back(tmp_path, monkeypatch):
    import torch

    seen = []
    topk = torch.topk

    def recording_topk(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return topk(*args, **kwargs)

    before = torch.get_num_threads()
    try:
        idx = RetrievalIndex.build(np.eye(3, 4), ["a", "b", "c"], [0, 1, 2])
        idx.save(tmp_path)
        torch.set_num_threads(2)
        monkeypatch.setattr(torch, "topk", recording_topk)
        RetrievalIndex.load(tmp_path, threads=1).search(np.eye(2, 4), 1)  # a batch: the matrix product
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

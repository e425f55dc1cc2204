"""The int8 prefilter of single exact queries: its error bound holds, and whatever it decides (certified, failed,
skipped) the answer is the exact one."""
import numpy as np
import pytest

import serving.runtime.index as index_mod
from serving.runtime.index import Int8Prefilter, RetrievalIndex


def _unit(a):
    a = np.asarray(a, np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def brute_force(gallery, q, k):
    """(cosine distances, positions) of the k nearest in float64."""
    sims = _unit(gallery) @ _unit(q)[0]
    order = np.argsort(-sims, kind="stable")[:k]
    return 1 - sims[order], order


def assert_exact(d, p, gallery, q, k):
    """(d, p) is a top k of brute force: the k best distances within float32 rounding, and each position's own
    distance is the one reported (which positions hold a float32 near-tie at the k-th place may differ)."""
    d_ref, _ = brute_force(gallery, q, k)
    np.testing.assert_allclose(d[0], d_ref, atol=1e-5)
    own = 1 - _unit(np.asarray(gallery)[p[0]]) @ _unit(q)[0]
    np.testing.assert_allclose(d[0], own, atol=1e-5)
    assert len(set(p[0])) == k and np.all(np.diff(d[0]) >= 0) and p.dtype == np.int64 and d.dtype == np.float32


def _index(g, **kw):
    return RetrievalIndex.build(g, [str(i) for i in range(len(g))], np.zeros(len(g), int), **kw)


@pytest.fixture
def small_galleries_prefiltered(monkeypatch):
    """Prefilter galleries of a few thousand vectors (production starts at 20,000), 32 candidates."""
    monkeypatch.setattr(index_mod, "PREFILTER_MIN_ROWS", 100)
    monkeypatch.setattr(index_mod, "PREFILTER_CANDIDATES", 32)


def test_error_bound_holds_for_every_gallery_vector():
    """|q . g_i - a_i| <= e for every vector, where a_i is the int8 score over the units the search uses."""
    rng = np.random.default_rng(0)
    for d, spread in ((16, 1.0), (64, 0.05), (128, 3.0)):
        g = _unit(rng.normal(size=(2000, d)) * rng.uniform(0.01, spread, size=d)).astype(np.float32)
        pf = Int8Prefilter(g)
        for q in _unit(rng.normal(size=(5, d))).astype(np.float32):
            q = q[None]
            q_scale = index_mod._int8_scale(q)
            q_ints = index_mod._int8_round(q, q_scale)
            approx, pos = pf.top(q_ints, len(g))
            approx, pos = approx[0], pos[0]
            # the integer scores are exact
            integer_dots = np.rint(g[pos] * pf.scale).astype(np.int64) @ q_ints[0].astype(np.int64)
            np.testing.assert_array_equal(approx, integer_dots)
            approx = approx / (q_scale * pf.scale)
            exact = g[pos].astype(np.float64) @ q[0].astype(np.float64)
            q_round = q_ints[0] / q_scale
            error = (np.linalg.norm(q[0] - q_round) * pf.max_norm + np.linalg.norm(q_round) * pf.residual)
            assert np.abs(exact - approx).max() <= error + 1e-6
            # and the bound is not vacuous: it is far below the spread of the scores
            assert error < 0.1 * (exact.max() - exact.min())


@pytest.mark.parametrize("k", [1, 10, 40])
def test_single_queries_are_exact_whether_certified_or_not(small_galleries_prefiltered, k):
    """Random galleries (queries certify) and tight clusters of near-duplicates (they do not): every single query
    answers brute force's neighbours at brute force's distances, and both outcomes occur."""
    rng = np.random.default_rng(1)
    random = rng.normal(size=(3000, 64))
    centres = rng.normal(size=(5, 64))
    clusters = centres[rng.integers(0, 5, 3000)] + 0.01 * rng.normal(size=(3000, 64))
    outcomes = {}
    for name, g, queries in (("random", random, rng.normal(size=(30, 64))),
                             ("clusters", clusters,
                              centres[rng.integers(0, 5, 30)] + 0.01 * rng.normal(size=(30, 64)))):
        idx = _index(g.astype(np.float32))
        assert idx.use_prefilter
        for q in queries:
            assert_exact(*idx.search(q[None], k), g, q[None], k)
        pf = idx.prefilter()
        outcomes[name] = (pf.certified, pf.failed, pf.skipped)
    assert outcomes["random"][0] == 30  # all certified
    assert outcomes["clusters"][1] > 0 and outcomes["clusters"][0] < 30


def test_certified_answer_equals_the_float32_scan_bit_for_bit_in_distances(small_galleries_prefiltered):
    rng = np.random.default_rng(2)
    g = rng.normal(size=(4000, 32)).astype(np.float32)
    idx, plain = _index(g), _index(g, prefilter=False)
    assert not plain.use_prefilter
    for q in rng.normal(size=(20, 32)).astype(np.float32):
        d, p = idx.search(q[None], 10)
        d_scan, p_scan = plain.search(q[None], 10)
        assert set(p[0]) == set(p_scan[0])
        np.testing.assert_allclose(d, d_scan, atol=1e-6)
    assert idx.prefilter().certified == 20 and plain._prefilter is None


def test_stops_trying_while_queries_fail_and_retries(small_galleries_prefiltered):
    """A gallery whose queries never certify: after the running rate falls below break-even, only one query in
    RETRY_EVERY tries the int8 scan; a gallery that certifies again brings the rate back up."""
    rng = np.random.default_rng(3)
    g = (np.ones((2000, 16)) + 1e-4 * rng.normal(size=(2000, 16))).astype(np.float32)  # all nearly equal
    idx = _index(g)
    pf = idx.prefilter()
    for q in rng.normal(size=(200, 16)).astype(np.float32):
        idx.search(q[None], 5)
    assert pf.certified == 0
    assert pf.rate < Int8Prefilter.BREAK_EVEN
    tried = pf.failed
    assert pf.skipped + tried == 200
    # failures until the rate crosses break-even, then one try per RETRY_EVERY + 1 queries
    assert pf.skipped > 150 and tried < 50
    # the answers stayed exact throughout
    q = rng.normal(size=(1, 16)).astype(np.float32)
    assert_exact(*idx.search(q, 5), g, q, 5)


def test_a_skipping_prefilter_tries_once_every_retry_every():
    pf = Int8Prefilter(np.eye(8, dtype=np.float32))
    pf.rate = 0.1
    # skipped queries do not move the rate; a try that certifies does
    trials = [pf.worth_trying() for _ in range(Int8Prefilter.RETRY_EVERY + 1)]
    assert trials.count(True) == 1 and trials[-1] is True and pf.skipped == Int8Prefilter.RETRY_EVERY


def test_small_galleries_and_batches_do_not_use_it():
    rng = np.random.default_rng(4)
    g = rng.normal(size=(500, 16)).astype(np.float32)
    idx = _index(g)
    assert not idx.use_prefilter
    idx.search(g[:1], 3)
    assert idx._prefilter is None
    hnsw = _index(rng.normal(size=(index_mod.PREFILTER_MIN_ROWS, 8)).astype(np.float32), kind="hnsw")
    assert not hnsw.use_prefilter


def test_a_batch_is_certified_query_by_query_and_answers_what_single_queries_do(small_galleries_prefiltered):
    """One batch mixing queries that certify (far from everything) with ones that do not (inside a tight cluster):
    every row is exact, and equals that query searched alone."""
    rng = np.random.default_rng(5)
    centre = rng.normal(size=64)
    g = np.concatenate([rng.normal(size=(2500, 64)), centre + 0.01 * rng.normal(size=(500, 64))]).astype(np.float32)
    queries = np.concatenate([rng.normal(size=(8, 64)), centre + 0.01 * rng.normal(size=(8, 64))]).astype(np.float32)
    idx = _index(g)
    d, p = idx.search(queries, 10)
    pf = idx.prefilter()
    assert pf.certified > 0 and pf.failed > 0 and pf.certified + pf.failed == 16
    for i, q in enumerate(queries):
        assert_exact(d[i:i + 1], p[i:i + 1], g, q[None], 10)
        d1, p1 = _index(g).search(q[None], 10)
        assert set(p1[0]) == set(p[i])
        np.testing.assert_allclose(d1[0], d[i], atol=1e-6)


def test_the_search_bench_counts_the_queries_that_certify(small_galleries_prefiltered):
    from serving.bench.search import certifiable

    rng = np.random.default_rng(6)
    random = _index(rng.normal(size=(3000, 64)).astype(np.float32))
    assert certifiable(random, rng.normal(size=(20, 64)), 10) == 1.0
    centre = rng.normal(size=64)
    crowded = _index((centre + 0.01 * rng.normal(size=(3000, 64))).astype(np.float32))
    assert certifiable(crowded, centre + 0.01 * rng.normal(size=(20, 64)), 10) < 0.5


def test_an_inexact_integer_product_turns_the_prefilter_off(small_galleries_prefiltered, monkeypatch, caplog):
    """A kernel that overflows (as ONNX Runtime's uint8 x int8 one does on x86 without VNNI: pairs of products
    added in saturating 16-bit arithmetic) is caught when the prefilter is built; the index then scans the float32
    gallery and its answers stay exact."""
    real_top = Int8Prefilter.top

    def saturating(self, q_ints, m):
        scores, pos = real_top(self, q_ints, m)
        return np.clip(scores, -20000, 20000), pos

    monkeypatch.setattr(Int8Prefilter, "top", saturating)
    rng = np.random.default_rng(4)
    g = rng.normal(size=(3000, 64)).astype(np.float32)
    idx = _index(g)
    assert idx.use_prefilter
    with caplog.at_level("WARNING", logger="serving.runtime.index"):
        for q in rng.normal(size=(5, 64)).astype(np.float32):
            assert_exact(*idx.search(q[None], 10), g, q[None], 10)
    assert idx.prefilter() is None and not idx.use_prefilter
    assert "int8 prefilter off" in caplog.text and "where numpy gives" in caplog.text

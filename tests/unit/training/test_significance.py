import numpy as np
import pytest

from training.evaluation.significance import (decode_mask, encode_mask, mcnemar_exact, paired_bootstrap,
                                              verdict)


def test_mask_round_trip():
    m = np.random.default_rng(0).random(1001) < 0.3
    assert (decode_mask(encode_mask(m), 1001) == m).all()


def test_mcnemar_exact_against_the_binomial_by_hand():
    a = np.array([1] * 8 + [0] * 2 + [1] * 50, dtype=bool)
    b = np.array([0] * 8 + [1] * 2 + [1] * 50, dtype=bool)
    r = mcnemar_exact(a, b)
    assert (r["a_only"], r["b_only"]) == (8, 2)
    # P[X <= 2], X ~ Bin(10, 1/2) = (1 + 10 + 45) / 1024
    assert r["p_one_sided"] == pytest.approx(56 / 1024)
    assert r["p_two_sided"] == pytest.approx(112 / 1024)
    # the reverse direction: P[X <= 8] = 1 - P[X >= 9] = 1 - 11 / 1024
    assert mcnemar_exact(b, a)["p_one_sided"] == pytest.approx(1 - 11 / 1024)
    assert mcnemar_exact(a, a) == {"a_only": 0, "b_only": 0, "p_two_sided": 1.0, "p_one_sided": 1.0}


def test_mcnemar_exact_on_a_full_test_set_against_scipy():
    """Thousands of discordant points (two models on the 10,000-point test set): exact, no float overflow."""
    stats = pytest.importorskip("scipy.stats")
    for a_only, b_only in ((1400, 1100), (1200, 1250), (3000, 2990)):
        a = np.array([1] * a_only + [0] * b_only + [1] * 500, dtype=bool)
        b = np.array([0] * a_only + [1] * b_only + [1] * 500, dtype=bool)
        r = mcnemar_exact(a, b)
        n = a_only + b_only
        assert r["p_one_sided"] == pytest.approx(stats.binom.cdf(b_only, n, 0.5), rel=1e-9, abs=1e-300)
        assert r["p_two_sided"] == pytest.approx(min(1.0, 2 * stats.binom.cdf(min(a_only, b_only), n, 0.5)),
                                                 rel=1e-9, abs=1e-300)


def test_bootstrap_separates_a_real_gap_from_noise():
    rng = np.random.default_rng(1)
    b = rng.random((3, 2000)) < 0.6
    better = b | (rng.random((3, 2000)) < 0.1)  # A right wherever B is, and on ~4 % more points
    r = paired_bootstrap(better, b, n_boot=2000)
    assert r["diff"] > 0.02 and r["p_one_sided"] < 0.01 and r["ci95"][0] > 0
    same = paired_bootstrap(b, b[::-1].copy(), n_boot=2000)  # same accuracy, other seeds' outcomes
    assert same["p_one_sided"] > 0.05 or abs(same["diff"]) < 0.01


def test_verdict_needs_significance_and_clean_accuracy():
    assert verdict(0.01, -0.005) == "met"
    assert verdict(0.2, 0.05) == "not shown"
    assert verdict(0.01, -0.02) == "not shown"

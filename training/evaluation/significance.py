"""Paired significance tests for "A is more robust than B" on the same evaluation points.

Both take per-point outcomes (True: the model still classifies the point correctly under the attack cascade, i.e.
its worst case), so each point is compared with itself across the two models:

- :func:`mcnemar_exact`: one seed; the exact (binomial) McNemar test on the discordant points.
- :func:`paired_bootstrap`: several seeds; resamples points (each resampled point keeps all its seeds' outcomes,
  so the seeds' shared points stay paired) and reports the mean accuracy difference over seeds, its 95 % interval
  and the one-sided p-value that A's mean is not above B's.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def encode_mask(mask: Sequence[bool]) -> str:
    """Per-point booleans -> a compact hex string (bit-packed); :func:`decode_mask` inverts it given the length."""
    return np.packbits(np.asarray(mask, dtype=bool)).tobytes().hex()


def decode_mask(hex_str: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(hex_str), dtype=np.uint8))[:n].astype(bool)


def _binom_cdf(k: int, n: int) -> float:
    """P[X <= k] for X ~ Binomial(n, 1/2), exact: the binomial coefficients summed as integers and divided by 2^n
    as integers (Python's int division rounds correctly; floats overflow past n ~ 1,000 discordant points)."""
    if n == 0:
        return 1.0
    total, c = 0, 1
    for i in range(0, min(k, n) + 1):
        total += c
        c = c * (n - i) // (i + 1)
    return min(1.0, total / 2 ** n)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test of A vs B on the same points.

    a, b: per-point correctness [N]. Returns the discordant counts (``a_only``: A right and B wrong; ``b_only``:
    the reverse), the two-sided p-value, and the one-sided p-value for "A is right more often than B".
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"outcome vectors differ in length: {a.shape} vs {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n = a_only + b_only
    one_sided = _binom_cdf(b_only, n)  # P[B-only <= observed] under H0: A no better than B
    two_sided = min(1.0, 2.0 * _binom_cdf(min(a_only, b_only), n))
    return {"a_only": a_only, "b_only": b_only, "p_two_sided": two_sided, "p_one_sided": one_sided}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> dict:
    """Mean accuracy difference A - B over seeds, resampling points.

    a, b: per-point correctness [S, N] (S seeds, the same N points for every seed and both models). Returns the
    observed difference, its 95 % percentile interval and the one-sided p-value P[diff* <= 0] (with the +1
    correction, so it is never 0).
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two [seeds, points] arrays of one shape, got {a.shape} and {b.shape}")
    per_point = (a.astype(np.float64) - b.astype(np.float64)).mean(axis=0)  # [N], averaged over seeds
    n = per_point.shape[0]
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for i in range(0, n_boot, 500):
        idx = rng.integers(0, n, size=(min(500, n_boot - i), n))
        diffs[i:i + len(idx)] = per_point[idx].mean(axis=1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    p = (1 + int((diffs <= 0).sum())) / (n_boot + 1)
    return {"diff": float(per_point.mean()), "ci95": [float(lo), float(hi)], "p_one_sided": p, "n_boot": n_boot,
            "seeds": int(a.shape[0]), "points": int(n)}


def verdict(worst_case_p: float, clean_gap: float, alpha: float = 0.05, clean_tolerance: float = 0.01) -> str:
    """"met" when A's worst case is higher with p < alpha and A's clean accuracy is within ``clean_tolerance`` of
    B's; "not shown" otherwise (a higher point estimate alone shows nothing)."""
    return "met" if worst_case_p < alpha and clean_gap >= -clean_tolerance else "not shown"

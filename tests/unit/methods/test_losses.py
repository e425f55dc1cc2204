"""Each loss term against a slow, obviously-correct loop over samples and elements."""
from __future__ import annotations

import math

import pytest
import torch

from training.losses import (angular_distance, attention_distillation, attention_map, bml_triplet_loss, mart_loss,
                             smoothed_cross_entropy, trades_kl)

DTYPES = [torch.float32, torch.float64]


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _attention_loop(fmap, eps=1e-8):
    b, c, h, w = fmap.shape
    out = torch.zeros(b, h, w, dtype=torch.float64)
    for i in range(b):
        a = [[sum(float(fmap[i, k, r, s]) for k in range(c)) for s in range(w)] for r in range(h)]
        lo = min(min(r) for r in a)
        hi = max(max(r) for r in a)
        for r in range(h):
            for s in range(w):
                out[i, r, s] = (a[r][s] - lo) / (hi - lo + eps)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_map_matches_loop(dtype):
    g = torch.Generator().manual_seed(0)
    fmap = torch.rand(3, 4, 5, 6, generator=g, dtype=dtype).relu()
    got = attention_map(fmap)
    assert got.shape == (3, 5, 6)
    torch.testing.assert_close(got.double(), _attention_loop(fmap), rtol=1e-5, atol=1e-6)
    assert float(got.min()) >= 0 and float(got.max()) <= 1


def test_attention_map_of_a_constant_map_is_zero_not_nan():
    assert torch.equal(attention_map(torch.zeros(2, 3, 4, 4)), torch.zeros(2, 4, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_distillation_matches_loop_and_spares_the_teacher(dtype):
    g = torch.Generator().manual_seed(1)
    s = torch.rand(2, 3, 4, 4, generator=g, dtype=dtype).requires_grad_(True)
    t = torch.rand(2, 3, 4, 4, generator=g, dtype=dtype).requires_grad_(True)
    a_s, a_t = _attention_loop(s.detach()), _attention_loop(t.detach())
    expected = sum(abs(float(a_s[i, r, c] - a_t[i, r, c])) for i in range(2) for r in range(4) for c in range(4)) / 32
    got = attention_distillation(s, t)
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    got.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_angular_distance_matches_loop(dtype):
    g = torch.Generator().manual_seed(2)
    u, v = torch.randn(5, 7, generator=g, dtype=dtype), torch.randn(5, 7, generator=g, dtype=dtype)
    v[0] = -3 * u[0]  # opposite directions are at distance 0: the distance ignores the sign
    for i in range(5):
        dot = sum(float(u[i, k] * v[i, k]) for k in range(7))
        nu = math.sqrt(sum(float(u[i, k]) ** 2 for k in range(7)))
        nv = math.sqrt(sum(float(v[i, k]) ** 2 for k in range(7)))
        assert math.isclose(float(angular_distance(u, v)[i]), 1 - abs(dot / (nu * nv)), rel_tol=1e-5, abs_tol=1e-6)
    assert float(angular_distance(u, v)[0]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bml_triplet_matches_loop(dtype):
    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(6, 5, generator=g, dtype=dtype) for _ in range(3))
    p[:3] = a[:3] + 0.01 * p[:3]  # some triplets already satisfied (zero hinge), some not

    def d(x, y):
        dot = sum(float(x[k] * y[k]) for k in range(len(x)))
        return 1 - abs(dot / (math.sqrt(sum(float(t) ** 2 for t in x)) * math.sqrt(sum(float(t) ** 2 for t in y))))

    hinge = [max(0.0, 0.03 + d(a[i], p[i]) - d(a[i], n[i])) for i in range(6)]
    sq = lambda t: sum(float(v) ** 2 for v in t.flatten()) / t.numel()  # noqa: E731
    expected = sum(hinge) / 6 + 0.001 * (sq(a) + sq(p) + sq(n))
    assert any(h == 0 for h in hinge) and any(h > 0 for h in hinge)
    assert math.isclose(float(bml_triplet_loss(a, p, n, 0.03, 0.001)), expected, rel_tol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.5])
def test_smoothed_cross_entropy_matches_loop(smoothing):
    """The authors' smoothing (AGKD-BML's softmax_crossentropy_labelsmooth): 1 - s on the true class, s / (K - 1)
    on each other one."""
    g = torch.Generator().manual_seed(4)
    logits, y = torch.randn(6, 10, generator=g), torch.randint(0, 10, (6,), generator=g)
    total = 0.0
    for i in range(6):
        p = _softmax([float(v) for v in logits[i]])
        target = [1 - smoothing if k == int(y[i]) else smoothing / 9 for k in range(10)]
        total += -sum(t * math.log(q) for t, q in zip(target, p))
    assert math.isclose(float(smoothed_cross_entropy(logits, y, smoothing)), total / 6, rel_tol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mart_matches_loop(dtype):
    g = torch.Generator().manual_seed(5)
    adv, clean = torch.randn(6, 10, generator=g, dtype=dtype), torch.randn(6, 10, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (6,), generator=g)
    adv[0, y[0]] = 9.0  # the top class is the label: the margin term must take the runner-up
    beta = 6.0
    margin = kl_w = 0.0
    for i in range(6):
        pa = _softmax([float(v) for v in adv[i]])
        pc = _softmax([float(v) for v in clean[i]])
        wrong = max((k for k in range(10) if k != int(y[i])), key=lambda k: pa[k])
        margin += -math.log(1.0001 - pa[wrong] + 1e-12)
        kl = sum(pc[k] * (math.log(pc[k]) - math.log(pa[k] + 1e-12)) for k in range(10))
        kl_w += kl * (1.0000001 - pc[int(y[i])])
    expected = margin / 6 + beta * kl_w / 6
    assert math.isclose(float(mart_loss(adv, clean, y, beta)), expected, rel_tol=1e-5)


def test_trades_kl_matches_loop():
    g = torch.Generator().manual_seed(6)
    adv, clean = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    per = trades_kl(adv, clean, reduction="none")
    for i in range(4):
        pa, pc = _softmax([float(v) for v in adv[i]]), _softmax([float(v) for v in clean[i]])
        assert math.isclose(float(per[i]), sum(c * math.log(c / a) for a, c in zip(pa, pc)), rel_tol=1e-4)
    assert math.isclose(float(trades_kl(adv, clean)), float(per.mean()), rel_tol=1e-6)
    assert float(trades_kl(clean, clean)) == pytest.approx(0.0, abs=1e-6)

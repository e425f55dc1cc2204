import math

import pytest
import torch
import torch.nn.functional as F

from training.metric import hardness, ics_loss, pdist, triplet_loss, triplet_loss_pml


def _d(u, v):
    return math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(u, v)))


@pytest.fixture
def trip():
    g = torch.Generator().manual_seed(3)
    return [F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1) for _ in range(3)]


def test_hardness_and_loss_match_loops(trip):
    a, p, n = trip
    h = hardness(a, p, n)
    loss = triplet_loss(a, p, n, margin=0.2, reduction="none")
    for i in range(7):
        hi = _d(a[i], p[i]) - _d(a[i], n[i])
        assert h[i].item() == pytest.approx(hi, abs=1e-9)
        assert loss[i].item() == pytest.approx(max(0.0, hi + 0.2), abs=1e-9)
    assert bool(((h >= -2) & (h <= 2)).all())


def test_pml_triplet_loss_is_the_mean_over_all_triplets(trip):
    a, p, n = trip
    ref = sum(max(0.0, _d(a[i], p[i]) - _d(a[i], n[i]) + 0.2) for i in range(7)) / 7
    assert triplet_loss_pml(a, p, n, 0.2).item() == pytest.approx(ref, abs=1e-6)
    assert triplet_loss(a, p, n, 0.2).item() == pytest.approx(ref, abs=1e-9)


def test_ics_matches_its_formula(trip):
    a, a_adv, p = trip
    ref = sum(max(0.0, _d(a[i], a_adv[i]) - _d(a[i], p[i])) for i in range(7)) / 7
    assert ics_loss(a, a_adv, p).item() == pytest.approx(ref, abs=1e-9)
    # zero when the adversarial anchor is the benign one
    assert ics_loss(a, a, p).item() == pytest.approx(0.0, abs=1e-5)


def test_pdist_matches_loop(trip):
    a, p, _ = trip
    d = pdist(a, p)
    for i in range(7):
        for j in range(7):
            assert d[i, j].item() == pytest.approx(_d(a[i], p[j]), abs=1e-6)

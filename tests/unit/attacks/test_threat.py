"""LpBall: projection, random starts, ascent steps, membership."""
from __future__ import annotations

import pytest
import torch

from serving.runtime.spec import ThreatModel
from serving.runtime.attacks import LpBall

NORMS = ["linf", "l2"]


def ball_for(norm: str) -> LpBall:
    return LpBall(norm, 0.1 if norm == "linf" else 1.0, 0.02)


def test_from_threat_copies_and_overrides_step():
    tm = ThreatModel(norm="l2", eps=0.5, step=0.1)
    assert LpBall.from_threat(tm) == LpBall("l2", 0.5, 0.1)
    assert LpBall.from_threat(tm, step=0.2).step == 0.2


@pytest.mark.parametrize("kw", [
    dict(norm="l1", eps=0.1, step=0.1),
    dict(norm="linf", eps=-0.1, step=0.1),
    dict(norm="linf", eps=0.1, step=-1.0),
    dict(norm="linf", eps=0.1, step=0.1, lo=1, hi=0),
])
def test_rejects_invalid(kw):
    with pytest.raises(ValueError):
        LpBall(**kw)


@pytest.mark.parametrize("norm", NORMS)
def test_project_lands_in_ball_and_box_and_is_idempotent(norm):
    ball = ball_for(norm)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 1, 8, 8, generator=g)
    far = x0 + 3 * torch.randn(16, 1, 8, 8, generator=g)
    p = ball.project(far, x0)
    assert ball.contains(p, x0, tol=1e-6).all()
    assert torch.allclose(ball.project(p, x0), p, atol=1e-7)
    # A point already inside stays where it is.
    inside = ball.project(x0 + 0.01 * torch.randn(16, 1, 8, 8, generator=g), x0)
    assert torch.allclose(ball.project(inside, x0), inside, atol=1e-7)


def test_l2_projection_is_radial_when_box_inactive():
    ball = LpBall("l2", 0.05, 0.01)
    x0 = torch.full((4, 3, 4, 4), 0.5)
    d = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    p = ball.project(x0 + d, x0)
    want = x0 + d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 0.05
    assert torch.allclose(p, want, atol=1e-7)


def test_linf_projection_clamps_per_coordinate():
    ball = LpBall("linf", 0.1, 0.01)
    x0 = torch.tensor([[0.5, 0.05, 0.95, 0.5]])
    x = torch.tensor([[0.8, -0.5, 1.5, 0.45]])
    assert torch.allclose(ball.project(x, x0), torch.tensor([[0.6, 0.0, 1.0, 0.45]]))


@pytest.mark.parametrize("norm", NORMS)
def test_random_start_in_ball_reproducible_and_seed_dependent(norm):
    ball = ball_for(norm)
    x0 = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a = ball.random_start(x0, torch.Generator().manual_seed(3))
    b = ball.random_start(x0, torch.Generator().manual_seed(3))
    c = ball.random_start(x0, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ball.contains(a, x0, tol=1e-6).all()


@pytest.mark.parametrize("norm", NORMS)
def test_random_start_of_a_batch_equals_its_parts(norm):
    """Per-sample draws: [a; b] from one generator == a then b from a generator in the same state."""
    ball = ball_for(norm)
    x0 = torch.rand(37, 1, 5, 5, generator=torch.Generator().manual_seed(0))  # 25 values: not a multiple of 16
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    whole = ball.random_start(x0, g1)
    parts = torch.cat([ball.random_start(x0[:11], g2), ball.random_start(x0[11:], g2)])
    assert torch.equal(whole, parts)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_linf_random_start_is_uniform_in_the_cube():
    ball = LpBall("linf", 0.1, 0.01)
    x0 = torch.full((200, 50), 0.5)  # box inactive
    d = ball.random_start(x0, torch.Generator().manual_seed(0)) - x0
    assert d.abs().max() <= 0.1 + 1e-7
    assert abs(d.mean().item()) < 0.002
    assert abs((d.abs() < 0.05).float().mean().item() - 0.5) < 0.01


def test_l2_random_start_is_uniform_in_the_disk():
    """In 2-D, a uniform point of the disk has P(r < eps / 2) = 1/4 (not 1/2, as a uniform radius would)."""
    ball = LpBall("l2", 0.2, 0.01)
    x0 = torch.full((4000, 2), 0.5)
    r = (ball.random_start(x0, torch.Generator().manual_seed(0)) - x0).norm(dim=1)
    assert r.max() <= 0.2 + 1e-7
    assert abs((r < 0.1).float().mean().item() - 0.25) < 0.03


def test_random_start_clamps_to_box():
    ball = LpBall("linf", 0.3, 0.01)
    x0 = torch.zeros(8, 10)
    s = ball.random_start(x0, torch.Generator().manual_seed(0))
    assert s.min() >= 0 and (s > 0).any()


def test_ascend_linf_is_signed_step_and_l2_is_unit_direction():
    g = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = torch.full_like(g, 0.5)
    assert torch.allclose(LpBall("linf", 0.1, 0.02).ascend(x, g) - x, 0.02 * g.sign())
    step = LpBall("l2", 1.0, 0.3).ascend(x, g) - x
    assert torch.allclose(step.flatten(1).norm(dim=1), torch.full((5,), 0.3), atol=1e-6)
    assert torch.allclose(step / 0.3, g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1), atol=1e-6)


@pytest.mark.parametrize("norm", NORMS)
def test_ascend_zero_gradient_does_not_move_and_accepts_per_sample_steps(norm):
    ball = ball_for(norm)
    x = torch.full((3, 6), 0.5)
    assert torch.equal(ball.ascend(x, torch.zeros_like(x)), x)
    g = torch.ones_like(x)
    moved = ball.ascend(x, g, torch.tensor([0.0, 0.1, 0.2])) - x
    assert torch.allclose(ball.distance(moved + x, x), torch.tensor([0.0, 0.1, 0.2]), atol=1e-6)


@pytest.mark.parametrize("norm", NORMS)
def test_contains_flags_ball_and_box_violations(norm):
    ball = ball_for(norm)
    x0 = torch.full((3, 4), 0.5)
    x = x0.clone()
    x[1, 0] += 1.5 * ball.eps if norm == "linf" else 0.4  # out of the ball (linf) / inside (l2)
    x[2, 0] = 1.0 + 1e-3  # out of the box
    got = ball.contains(x, x0).tolist()
    assert got == [True, norm == "l2", False]

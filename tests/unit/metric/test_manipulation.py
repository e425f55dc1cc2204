"""HM's PGD: never makes a triplet easier, freezes a triplet once past its destination, stays in its ball."""
import torch

from serving.runtime.attacks.threat import LpBall
from training.metric import hardness, hardness_manipulation

BALL = LpBall("linf", eps=0.3, step=0.03)


def _images(t, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(t, 1, 8, 8, generator=g) for _ in range(3)]


def _h(model, xa, xp, xn):
    with torch.no_grad():
        return hardness(model(xa), model(xp), model(xn))


def test_never_easier_and_in_ball(tiny):
    xa, xp, xn = _images(32, 0)
    r = hardness_manipulation(tiny, xa, xp, xn, torch.tensor(2.0), BALL, steps=10, tol=0.0)
    h0 = _h(tiny, xa, xp, xn)
    h1 = _h(tiny, r.xa, r.xp, r.xn)
    assert torch.allclose(r.h_src, h0, atol=1e-5) and torch.allclose(r.h_adv, h1, atol=1e-5)
    assert bool((h1 >= h0 - 1e-6).all())
    assert float(h1.mean()) > float(h0.mean()) + 0.05  # the unreachable destination pulls every triplet up
    for x0, x in ((xa, r.xa), (xp, r.xp), (xn, r.xn)):
        assert bool(BALL.contains(x, x0).all())


def test_arrived_triplets_are_untouched_and_loop_stops(tiny):
    xa, xp, xn = _images(16, 1)
    r = hardness_manipulation(tiny, xa, xp, xn, torch.tensor(-2.0), BALL, steps=10)
    assert r.steps == 0
    assert torch.equal(r.xa, xa) and torch.equal(r.xp, xp) and torch.equal(r.xn, xn)


def test_stops_pushing_a_triplet_past_its_destination(tiny):
    xa, xp, xn = _images(32, 2)
    h0 = _h(tiny, xa, xp, xn)
    dest = h0 + 0.02  # reachable in a step or two
    short = hardness_manipulation(tiny, xa, xp, xn, dest, BALL, steps=3, tol=0.0)
    long = hardness_manipulation(tiny, xa, xp, xn, dest, BALL, steps=12, tol=0.0)
    arrived = short.h_adv >= dest
    assert bool(arrived.any())
    # a triplet that has arrived is frozen: more steps leave it exactly where it arrived
    assert torch.equal(long.xa[arrived], short.xa[arrived])
    assert torch.equal(long.xn[arrived], short.xn[arrived])
    # and it did not overshoot far: it stops at the first iterate past the destination
    assert float((long.h_adv[arrived] - dest[arrived]).max()) < 0.5
    assert bool((long.h_adv >= short.h_adv - 1e-6).all())


def test_mixed_destinations_only_move_the_ones_below(tiny):
    xa, xp, xn = _images(20, 3)
    h0 = _h(tiny, xa, xp, xn)
    dest = torch.where(torch.arange(20) % 2 == 0, h0 - 0.1, torch.full_like(h0, 2.0))
    r = hardness_manipulation(tiny, xa, xp, xn, dest, BALL, steps=5, tol=0.0)
    even = torch.arange(20) % 2 == 0
    assert torch.equal(r.xa[even], xa[even])
    assert not torch.equal(r.xa[~even], xa[~even])

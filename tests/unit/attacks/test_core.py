"""The functional cores (pgd, apgd) on analytic losses, where the optimum is known."""
from __future__ import annotations

import pytest
import torch

from serving.runtime.attacks import LpBall, apgd, pgd

NORMS = ["linf", "l2"]
ALGOS = {"pgd": pgd, "apgd": apgd}


def concave(c: torch.Tensor):
    """-||x - c||^2 per sample: its maximiser over the ball is the projection of c."""
    return lambda x: -((x - c) ** 2).flatten(1).sum(1)


def setup(norm: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = 0.3 + 0.4 * torch.rand(6, 1, 4, 4, generator=g)
    c = torch.rand(6, 1, 4, 4, generator=g)
    if norm == "linf":
        ball = LpBall("linf", 0.1, 0.01)
        optimum = ball.project(c, x0)  # per-coordinate clamp: exact for L-inf
    else:
        ball = LpBall("l2", 0.3, 0.02)  # x0 +- 0.3 stays inside [0, 1]: the box is inactive, radial projection is exact
        optimum = ball.project(c, x0)
    return x0, c, ball, optimum


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_reaches_the_maximiser_within_one_step(norm):
    x0, c, ball, optimum = setup(norm)
    x = pgd(concave(c), x0, ball, steps=60, generator=torch.Generator().manual_seed(0))
    assert ball.contains(x, x0).all()
    assert ball.distance(x, optimum).max() <= ball.step * 1.01


@pytest.mark.parametrize("norm", NORMS)
def test_apgd_converges_closer_than_its_initial_step(norm):
    """APGD's step halving lets it settle far below its starting step 2 * eps."""
    x0, c, ball, optimum = setup(norm)
    x = apgd(concave(c), x0, ball, steps=100, generator=torch.Generator().manual_seed(0))
    assert ball.contains(x, x0).all()
    assert ball.distance(x, optimum).max() <= 0.05 * ball.eps


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_restarts_keep_the_highest_loss_start(algo):
    """With 0 steps a run is its start; the result must be, per sample, the best of the starts drawn
    sample-major from the generator."""
    x0, c, ball, _ = setup("linf")
    loss = concave(c)
    x = ALGOS[algo](loss, x0, ball, steps=0, restarts=5, generator=torch.Generator().manual_seed(1))
    starts = ball.random_start(x0.repeat_interleave(5, 0), torch.Generator().manual_seed(1)).reshape(6, 5, 1, 4, 4)
    losses = torch.stack([loss(starts[:, r]) for r in range(5)], 1)
    want = starts[torch.arange(6), losses.argmax(1)]
    assert torch.equal(x, want)


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_restarts_keep_the_first_successful_start(algo):
    x0, c, ball, _ = setup("linf")
    loss = concave(c)
    starts = ball.random_start(x0.repeat_interleave(5, 0), torch.Generator().manual_seed(1)).reshape(6, 5, 1, 4, 4)
    losses = torch.stack([loss(starts[:, r]) for r in range(5)], 1)
    # "Success" = loss above the per-sample median of the five starts: the first such start is often not the best.
    thr = losses.median(1).values
    x = ALGOS[algo](loss, x0, ball, steps=0, restarts=5, generator=torch.Generator().manual_seed(1),
                    success_fn=lambda xa: loss(xa) > thr)
    first = (losses > thr[:, None]).float().argmax(1)
    assert torch.equal(x, starts[torch.arange(6), first])
    assert (first != losses.argmax(1)).any()  # the test distinguishes "first successful" from "best"


@pytest.mark.parametrize("algo", sorted(ALGOS))
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_works_inside_no_grad_and_inference_mode(algo, context):
    x0, c, ball, _ = setup("l2")
    ref = ALGOS[algo](concave(c), x0, ball, steps=5, generator=torch.Generator().manual_seed(0))
    ctx = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with ctx:
        x0_in, c_in = x0.clone(), c.clone()  # inference tensors under inference_mode
        got = ALGOS[algo](concave(c_in), x0_in, ball, steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, ref)


def test_pgd_without_random_start_is_deterministic_and_leaves_input_alone():
    x0, c, ball, _ = setup("linf")
    before = x0.clone()
    a = pgd(concave(c), x0, ball, steps=3, random_start=False)
    b = pgd(concave(c), x0, ball, steps=3, random_start=False)
    assert torch.equal(a, b) and torch.equal(x0, before) and not a.requires_grad


def test_misuse_is_reported():
    x0, c, ball, _ = setup("linf")
    with pytest.raises(ValueError, match="one loss per sample"):
        pgd(lambda x: concave(c)(x).sum(), x0, ball, steps=1)
    with pytest.raises(ValueError, match="differentiabl"):
        pgd(lambda x: concave(c)(x).detach(), x0, ball, steps=1)
    with pytest.raises(ValueError, match="random_start"):
        pgd(concave(c), x0, ball, steps=1, restarts=2, random_start=False)


def test_apgd_success_checks_reuse_the_loss_forward_pass():
    """Each APGD iterate runs the model once: the success check after the gradient reads the cached logits."""
    import torch.nn as nn

    from serving.runtime.attacks.apgd import apgd
    from serving.runtime.attacks.base import LogitCache, classifier_success
    from serving.runtime.attacks.objectives import get_objective
    from serving.runtime.attacks.pgd import classifier_loss
    from serving.runtime.attacks.threat import LpBall

    torch.manual_seed(0)
    calls = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    model.register_forward_hook(lambda *a: calls.append(1))
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    cache = LogitCache(model)
    steps = 10
    apgd(classifier_loss(cache, get_objective("ce"), y, None), x, LpBall(norm="linf", eps=0.1, step=0.02), steps,
         success_fn=classifier_success(cache, y, None), generator=torch.Generator().manual_seed(0))
    assert cache.misses == 0 and cache.hits == steps + 1
    assert len(calls) == steps + 1


def test_logit_cache_misses_after_an_in_place_change():
    import torch.nn as nn

    from serving.runtime.attacks.base import LogitCache

    model = nn.Linear(3, 2)
    cache = LogitCache(model)
    x = torch.rand(2, 3)
    cache(x)
    x.add_(1.0)
    assert torch.allclose(cache.detached(x), model(x)) and cache.misses == 1

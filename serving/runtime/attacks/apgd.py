"""Auto-PGD: PGD with momentum and a step size that halves itself at checkpoints.

Croce, Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (Algorithm 1). Where the paper and the authors' code
(fra31/auto-attack) differ, this follows the code, which produced the published numbers: integer
checkpoint periods, and no step-size halving by condition 2 at the first checkpoint.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn

from serving.runtime.attacks.base import Attack, LogitCache, check_target, register_attack, classifier_success
from serving.runtime.attacks.core import LossFn, SuccessFn, grad_enabled, input_grad, run_restarts, where
from serving.runtime.attacks.objectives import get_objective
from serving.runtime.attacks.pgd import classifier_loss
from serving.runtime.attacks.threat import LpBall


def apgd(loss_fn: LossFn, x0: torch.Tensor, ball: LpBall, steps: int, random_start: bool = True,
         generator: Optional[torch.Generator] = None, restarts: int = 1, success_fn: Optional[SuccessFn] = None,
         rho: float = 0.75, momentum: float = 0.75) -> torch.Tensor:
    """APGD (Croce & Hein 2020) maximising a per-sample loss inside ``ball``.

    Step size eta starts at 2 * eps (``ball.step`` is not used). Each step takes
    ``z = P(x + eta * dir(grad))`` and ``x' = P(x + momentum * (z - x) + (1 - momentum) * (x - x_prev))``
    (no momentum on the first step), P the ball-and-box projection. Checkpoints close periods of
    int(0.22 N) steps, each next period int(0.03 N) shorter, down to int(0.06 N) (N = steps). At a checkpoint a
    sample halves its eta and jumps back to its best point when (1) its loss rose in at most
    ``rho`` of the period's steps, or (2) neither eta was halved nor the best loss improved since the
    previous checkpoint. Every decision is per sample, so samples never interact.

    Args:
        loss_fn: ``x_adv [B, ...] -> [B]`` loss to maximise; samples must not interact.
        x0: clean batch [B, ...] inside the box; never modified.
        ball: threat model (norm, eps, box).
        steps: iterations N. Default schedule constants assume N of roughly 10 or more.
        random_start: start uniformly in the ball (the authors start on its surface). Default True.
        generator: source of the random starts (per sample, batch order). Default None (global RNG).
        restarts: independent runs; per sample the first successful run wins, else the highest loss.
        success_fn: ``x_adv -> bool [B]``, checked at every iterate; a sample that succeeds at any
            iterate returns its latest successful iterate instead of its highest-loss one.
        rho: threshold of condition (1). Default 0.75.
        momentum: weight of the new step against the previous move. Default 0.75.

    Returns:
        x_adv [B, ...], detached, inside the ball and the box: per sample the latest successful
        iterate when there is one, otherwise the highest-loss iterate.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    with grad_enabled():
        x0 = x0.detach().clone()

        def run(start: torch.Tensor, scored: bool):
            return _run(loss_fn, x0, start, ball, steps, success_fn, rho, momentum)

        return run_restarts(x0, ball, run, restarts=restarts, random_start=random_start,
                            generator=generator).detach()


def _run(loss_fn: LossFn, x0: torch.Tensor, start: torch.Tensor, ball: LpBall, steps: int,
         success_fn: Optional[SuccessFn], rho: float, momentum: float):
    b = x0.shape[0]
    x = start.detach()
    loss, grad = input_grad(loss_fn, x)
    found = success_fn(x) if success_fn is not None else None
    x_won = x
    x_best, loss_best, grad_best = x, loss, grad

    eta = torch.full((b,), 2.0 * ball.eps, device=x0.device, dtype=x0.dtype)
    x_prev = x
    period = max(int(0.22 * steps), 1)
    min_period, shrink = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    since_check = 0
    rises = torch.zeros(b, device=x0.device)
    loss_prev = loss
    best_at_check = loss_best
    # The authors' code starts with "reduced" set, which disables condition (2) at the first checkpoint.
    reduced_at_check = torch.ones(b, dtype=torch.bool, device=x0.device)

    for i in range(steps):
        a = momentum if i > 0 else 1.0
        z = ball.project(ball.ascend(x, grad, eta), x0)
        x_new = ball.project(x + a * (z - x) + (1 - a) * (x - x_prev), x0)
        x_prev, x = x, x_new.detach()

        loss, grad = input_grad(loss_fn, x)
        if success_fn is not None:
            ok = success_fn(x)
            x_won = where(ok, x, x_won)
            found = found | ok
        better = loss > loss_best
        x_best, grad_best = where(better, x, x_best), where(better, grad, grad_best)
        loss_best = torch.where(better, loss, loss_best)
        rises += (loss > loss_prev).float()
        loss_prev = loss

        since_check += 1
        if since_check == period:
            oscillating = rises <= rho * period
            stalled = ~reduced_at_check & (best_at_check >= loss_best)
            reduce = oscillating | stalled
            eta = torch.where(reduce, eta / 2, eta)
            # Restart from the best point; x_prev is kept, so momentum points from it to x_best.
            x, grad = where(reduce, x_best, x), where(reduce, grad_best, grad)
            reduced_at_check, best_at_check = reduce, loss_best
            rises.zero_()
            since_check = 0
            period = max(period - shrink, min_period)

    if found is None:
        return x_best, loss_best, None
    return where(found, x_won, x_best), loss_best, found


@register_attack
class APGD(Attack):
    """APGD-CE / APGD-DLR (Croce & Hein, ICML 2020), as in AutoAttack.

    Threat model: L-inf or L2 ball of radius ``ball.eps``, clamped to [lo, hi]; the step size follows
    APGD's own schedule from 2 * eps (``ball.step`` is ignored). As in AutoAttack, only points the
    model gets right are attacked (others are returned unchanged), and a point that is misclassified
    at any iterate is returned at such an iterate.

    Args:
        model: classifier, images [B, C, H, W] in [0, 1] -> logits [B, K].
        ball: threat model.
        steps: iterations. Default 100 (AutoAttack).
        loss: objective name, 'ce' or 'dlr' (any name of :data:`OBJECTIVES` works; a targeted one
            needs ``target`` and counts success as prediction == target). Default: the class's ``loss``,
            'ce' (registered as 'apgd-ce'; :class:`APGDDLR` is 'apgd-dlr').
        restarts: random restarts. Default 1.
        rho: step-size halving threshold. Default 0.75.
        momentum: Default 0.75.
        seed, generator: see :class:`Attack`.

    Shapes: x [B, C, H, W], y [B] int64, target [B] int64 (targeted objectives only) -> x_adv like x.
    """

    name = "apgd-ce"
    title = "APGD-CE"
    loss: ClassVar[str] = "ce"

    def __init__(self, model: nn.Module, ball: LpBall, steps: int = 100, *, loss: Optional[str] = None,
                 restarts: int = 1, rho: float = 0.75, momentum: float = 0.75, seed: int = 0,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__(model, ball, seed=seed, generator=generator)
        if steps < 0 or restarts < 1:
            raise ValueError(f"need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
        self.steps = steps
        self.objective = get_objective(loss or self.loss)
        self.restarts = restarts
        self.rho = rho
        self.momentum = momentum

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        check_target(self.objective, target)
        with torch.no_grad():
            pred = self.model(x).argmax(dim=1)
        todo = (pred == y if target is None else pred != target).nonzero().squeeze(1)
        x_adv = x.clone()
        if len(todo):
            ys = y[todo]
            ts = None if target is None else target[todo]
            cache = LogitCache(self.model)
            x_adv[todo] = apgd(classifier_loss(cache, self.objective, ys, ts), x[todo], self.ball, self.steps,
                               generator=self.generator, restarts=self.restarts,
                               success_fn=classifier_success(cache, ys, ts), rho=self.rho, momentum=self.momentum)
        return x_adv


@register_attack
class APGDDLR(APGD):
    """APGD on the DLR loss (Croce & Hein, ICML 2020): :class:`APGD` with ``loss='dlr'``. Offline evaluation
    only: the in-server probes run APGD-T, its targeted form."""

    name = "apgd-dlr"
    title = "APGD-DLR"
    loss: ClassVar[str] = "dlr"
    probe = False

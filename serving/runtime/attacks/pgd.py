"""Projected gradient ascent: the functional core, the PGD classification attack, and AGKD-BML's
batched targeted PGD.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from serving.runtime.attacks.base import (Attack, LogitCache, check_inputs, check_target, eval_mode, register_attack,
                                   classifier_success)
from serving.runtime.attacks.core import LossFn, SuccessFn, grad_enabled, input_grad, run_restarts
from serving.runtime.attacks.objectives import Objective, get_objective
from serving.runtime.attacks.threat import LpBall


def pgd(loss_fn: LossFn, x0: torch.Tensor, ball: LpBall, steps: int, random_start: bool = True,
        generator: Optional[torch.Generator] = None, restarts: int = 1,
        success_fn: Optional[SuccessFn] = None) -> torch.Tensor:
    """Projected gradient ascent of a per-sample loss inside ``ball`` (Madry et al. 2018).

    Each step: ``x <- project(ascend(x, grad loss_fn(x), ball.step), x0)``, i.e. a signed step (L-inf)
    or a normalised-gradient step (L2), then projection to the eps-ball and clamping to the box.
    A run returns its last iterate (not its best one), as in Madry et al.

    Args:
        loss_fn: ``x_adv [B, ...] -> [B]`` per-sample loss to maximise; samples must not interact.
        x0: clean batch [B, ...] inside the box; never modified.
        ball: threat model; ``ball.step`` is the step size (pixel units).
        steps: gradient steps (0 returns the start point).
        random_start: start uniformly in the ball (else at ``x0``). Default True.
        generator: source of the random starts, drawn per sample in batch order (see
            :meth:`LpBall.random_start`); None uses the global RNG. Default None.
        restarts: independent runs; per sample the first successful one is kept when ``success_fn``
            is given, otherwise the one with the highest final loss. Default 1.
        success_fn: ``x_adv -> bool [B]``, only consulted to choose between restarts. Default None.

    Returns:
        x_adv [B, ...], detached, inside the ball around ``x0`` and the box.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    with grad_enabled():
        x0 = x0.detach().clone()

        def run(start: torch.Tensor, scored: bool):
            x = start
            for _ in range(steps):
                _, grad = input_grad(loss_fn, x)
                x = ball.project(ball.ascend(x.detach(), grad), x0)
            x = x.detach()
            if not scored:
                return x, None, None
            with torch.no_grad():
                loss = loss_fn(x).detach()
                ok = success_fn(x) if success_fn is not None else None
            return x, loss, ok

        return run_restarts(x0, ball, run, restarts=restarts, random_start=random_start,
                            generator=generator).detach()


def classifier_loss(cache: LogitCache, objective: Objective, y: Optional[torch.Tensor],
                    target: Optional[torch.Tensor]) -> LossFn:
    return lambda xa: objective(cache(xa), y, target)


@register_attack
class PGD(Attack):
    """Projected gradient descent (Madry et al., ICLR 2018) on a classification objective.

    Threat model: L-inf or L2 ball of radius ``ball.eps`` around x, clamped to [lo, hi]; step
    ``ball.step`` (pixel units). With ``restarts > 1`` a sample keeps its first restart that fools the
    model (untargeted: prediction != y; targeted: prediction == target), else its highest-loss one.

    Args:
        model: classifier, images [B, C, H, W] in [0, 1] -> logits [B, K].
        ball: threat model.
        steps: gradient steps. Default 10.
        objective: a name in :data:`OBJECTIVES` ('ce', 'cw', 'dlr', 'targeted_ce', 'targeted_cw',
            'targeted_dlr'). Default 'ce'.
        random_start: start uniformly in the ball. Default True.
        restarts: random restarts. Default 1.
        seed, generator: see :class:`Attack`.

    Shapes: x [B, C, H, W], y [B] int64, target [B] int64 (targeted objectives only) -> x_adv like x.
    """

    name = "pgd"
    title = "PGD"

    def __init__(self, model: nn.Module, ball: LpBall, steps: int = 10, *, objective: str = "ce",
                 random_start: bool = True, restarts: int = 1, seed: int = 0,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__(model, ball, seed=seed, generator=generator)
        if steps < 0 or restarts < 1:
            raise ValueError(f"need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
        self.steps = steps
        self.objective = get_objective(objective)
        self.random_start = random_start
        self.restarts = restarts

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        check_target(self.objective, target)
        cache = LogitCache(self.model)
        return pgd(classifier_loss(cache, self.objective, y, target), x, self.ball, self.steps,
                   random_start=self.random_start, generator=self.generator, restarts=self.restarts,
                   success_fn=classifier_success(cache, y, target) if self.restarts > 1 else None)


def targeted_pgd(model: nn.Module, x: torch.Tensor, target: torch.Tensor, ball: LpBall, steps: int,
                 generator: Optional[torch.Generator] = None, random_start: bool = True) -> torch.Tensor:
    """Targeted L-p PGD on cross-entropy toward ``target``: AGKD-BML's forward and backward AEs.

    Runs the model in eval mode (each submodule's mode restored afterwards), so samples do not
    interact, and draws the random start per sample in batch order. Hence, with ``g`` a generator,
    ``targeted_pgd(m, cat[a, b], cat[ta, tb], ..., g)`` equals ``cat[targeted_pgd(m, a, ta, ..., g),
    targeted_pgd(m, b, tb, ..., g)]`` when the second call continues from where the first left ``g``
    (and leaves ``g`` in the same final state): the forward and backward AEs can be one batched run.

    Args:
        model: classifier, [0, 1] images [B, C, H, W] -> logits [B, K].
        x: clean images [B, C, H, W]; target: class to push each sample toward, int64 [B].
        ball: threat model (AGKD-BML: L-inf, eps 8/255, step 2/255).
        steps: gradient steps (AGKD-BML: 10).
        generator: source of the random starts; None uses the global RNG. Default None.
        random_start: start uniformly in the ball. Default True.

    Returns:
        x_adv [B, C, H, W], detached.
    """
    check_inputs(x, None, target, ball)
    objective = get_objective("targeted_ce")
    with eval_mode(model), grad_enabled():
        t = target.detach().clone()
        return pgd(lambda xa: objective(model(xa), None, t), x, ball, steps, random_start=random_start,
                   generator=generator)

"""Targeted APGD on the targeted DLR loss over the most likely wrong classes, as in AutoAttack.

Croce, Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from serving.runtime.attacks.apgd import apgd
from serving.runtime.attacks.base import Attack, LogitCache, register_attack, classifier_success
from serving.runtime.attacks.objectives import get_objective
from serving.runtime.attacks.pgd import classifier_loss
from serving.runtime.attacks.threat import LpBall


@register_attack
class APGDT(Attack):
    """APGD-T (Croce & Hein, ICML 2020): for each of the ``n_target_classes`` classes the model ranks
    highest after the true one on the clean input, in that order, run APGD on the targeted DLR loss
    toward it, on the points still classified correctly.

    Success is untargeted (prediction != y), as in AutoAttack: the target only steers the search.
    Points misclassified on clean input are returned unchanged; points never fooled are returned at
    their highest-loss iterate of the first target class.

    Threat model: L-inf or L2 ball of radius ``ball.eps``, clamped to [lo, hi]; APGD's own step
    schedule from 2 * eps (``ball.step`` is ignored).

    Args:
        model: classifier, images [B, C, H, W] in [0, 1] -> logits [B, K], K >= 4.
        ball: threat model.
        steps: APGD iterations per target class. Default 100 (AutoAttack).
        n_target_classes: target classes tried, capped at K - 1. Default 9 (AutoAttack standard).
        restarts: random restarts per target class. Default 1.
        rho, momentum: see :func:`apgd`. Default 0.75, 0.75.
        seed, generator: see :class:`Attack`.

    Shapes: x [B, C, H, W], y [B] int64 -> x_adv like x. Takes no ``target``.
    """

    name = "apgd-t"
    title = "APGD-T"

    @classmethod
    def budget(cls, steps: int, num_classes: Optional[int] = None, **options) -> str:
        """'APGD-T-<steps>x<target classes>', e.g. 'APGD-T-100x9': the budget is steps per target class, and at
        most K - 1 classes are targets when ``num_classes`` (K) is given."""
        n = options.get("n_target_classes") or cls.defaults()["n_target_classes"]
        if num_classes is not None:
            n = min(n, num_classes - 1)
        return f"{super().budget(steps)}x{n}"

    def __init__(self, model: nn.Module, ball: LpBall, steps: int = 100, *, n_target_classes: int = 9,
                 restarts: int = 1, rho: float = 0.75, momentum: float = 0.75, seed: int = 0,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__(model, ball, seed=seed, generator=generator)
        if steps < 0 or restarts < 1 or n_target_classes < 1:
            raise ValueError(f"need steps >= 0, restarts >= 1, n_target_classes >= 1; got {steps}, {restarts}, "
                             f"{n_target_classes}")
        self.steps = steps
        self.n_target_classes = n_target_classes
        self.restarts = restarts
        self.rho = rho
        self.momentum = momentum
        self.objective = get_objective("targeted_dlr")

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        if target is not None:
            raise ValueError("APGD-T chooses its own targets; pass no target (use APGD(loss='targeted_dlr') "
                             "to attack given targets)")
        with torch.no_grad():
            logits = self.model(x)
        k = logits.shape[1]
        if k < 4:
            raise ValueError(f"APGD-T's targeted DLR loss needs at least 4 classes, the model has {k}")
        ranked = logits.argsort(dim=1, descending=True)
        robust = ranked[:, 0] == y
        x_adv = x.clone()
        for rank in range(1, min(self.n_target_classes, k - 1) + 1):
            idx = robust.nonzero().squeeze(1)
            if not len(idx):
                break
            ys, ts = y[idx], ranked[idx, rank]
            cache = LogitCache(self.model)
            xa = apgd(classifier_loss(cache, self.objective, ys, ts), x[idx], self.ball, self.steps,
                      generator=self.generator, restarts=self.restarts, success_fn=classifier_success(cache, ys, None),
                      rho=self.rho, momentum=self.momentum)
            with torch.no_grad():
                fooled = self.model(xa).argmax(dim=1) != ys
            keep = fooled if rank > 1 else torch.ones_like(fooled)
            x_adv[idx[keep]] = xa[keep]
            robust[idx[fooled]] = False
        return x_adv

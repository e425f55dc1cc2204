"""Fast Gradient Sign Method.

Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from serving.runtime.attacks.base import Attack, LogitCache, check_target, register_attack
from serving.runtime.attacks.objectives import get_objective
from serving.runtime.attacks.pgd import classifier_loss, pgd
from serving.runtime.attacks.threat import LpBall


@register_attack
class FGSM(Attack):
    """One gradient step of length eps from the clean point (Goodfellow et al., ICLR 2015).

    Threat model: L-inf (``x + eps * sign(grad)``, the original FGSM) or L2 (``x + eps * grad /
    ||grad||``, the "fast gradient method"), clamped to [lo, hi]. ``ball.step`` is ignored: the step
    is eps. No random start, so FGSM is deterministic.

    Args:
        model: classifier, images [B, C, H, W] in [0, 1] -> logits [B, K].
        ball: threat model.
        objective: objective name (see :data:`OBJECTIVES`). Default 'ce'.
        seed, generator: see :class:`Attack` (unused: FGSM draws nothing).

    Shapes: x [B, C, H, W], y [B] int64, target [B] int64 (targeted objectives only) -> x_adv like x.
    """

    name = "fgsm"
    title = "FGSM"

    def __init__(self, model: nn.Module, ball: LpBall, *, objective: str = "ce", seed: int = 0,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__(model, ball.with_step(ball.eps), seed=seed, generator=generator)
        self.objective = get_objective(objective)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        check_target(self.objective, target)
        loss = classifier_loss(LogitCache(self.model), self.objective, y, target)
        return pgd(loss, x, self.ball, steps=1, random_start=False)

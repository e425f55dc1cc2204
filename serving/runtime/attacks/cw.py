"""The "CW" attack of the robustness literature: PGD on the Carlini-Wagner margin.

Carlini, Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017 (the margin
loss); used as PGD in an eps-ball as in TRADES (Zhang et al. 2019) and MART (Wang et al. 2020).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from serving.runtime.attacks.base import register_attack
from serving.runtime.attacks.pgd import PGD
from serving.runtime.attacks.threat import LpBall


@register_attack
class CW(PGD):
    """PGD maximising the margin max_{k != y} z_k - z_y (or z_t - max_{k != t} z_k when targeted).

    A margin on logits is not flattened by softmax saturation or label smoothing the way
    cross-entropy is, which is why it is reported beside CE-PGD.

    Threat model: L-inf or L2 ball of radius ``ball.eps``, step ``ball.step`` (pixel units), clamped
    to [lo, hi].

    Args:
        model: classifier, images [B, C, H, W] in [0, 1] -> logits [B, K].
        ball: threat model.
        steps: gradient steps. Default 10.
        targeted: maximise the targeted margin toward ``target`` instead. Default False.
        random_start: start uniformly in the ball. Default True.
        restarts: random restarts. Default 1.
        seed, generator: see :class:`Attack`.

    Shapes: x [B, C, H, W], y [B] int64, target [B] int64 (targeted only) -> x_adv like x.
    """

    name = "cw"
    title = "CW"

    def __init__(self, model: nn.Module, ball: LpBall, steps: int = 10, *, targeted: bool = False,
                 random_start: bool = True, restarts: int = 1, seed: int = 0,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__(model, ball, steps, objective="targeted_cw" if targeted else "cw",
                         random_start=random_start, restarts=restarts, seed=seed, generator=generator)

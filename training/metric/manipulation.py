"""Hardness Manipulation (HM): PGD on the three images of each source triplet toward a destination hardness.

Zhou and Patel, "Enhancing Adversarial Robustness for Deep Metric Learning", CVPR 2022.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from serving.runtime.attacks.base import eval_mode
from serving.runtime.attacks.core import grad_enabled, input_grad, where
from serving.runtime.attacks.threat import LpBall
from training.metric.hardness import hardness


@dataclass
class HMResult:
    """Adversarial triplet images xa, xp, xn [T, C, H, W]; their hardness before (h_src) and after (h_adv),
    [T] each; the PGD steps taken."""

    xa: torch.Tensor
    xp: torch.Tensor
    xn: torch.Tensor
    h_src: torch.Tensor
    h_adv: torch.Tensor
    steps: int


def hardness_manipulation(model: nn.Module, xa: torch.Tensor, xp: torch.Tensor, xn: torch.Tensor,
                          destination: torch.Tensor, ball: LpBall, steps: int, tol: float = 1e-7) -> HMResult:
    """PGD minimising mean(max(0, H_D - H(phi(a~), phi(p~), phi(n~)))^2) over the triplets' images.

    No random start; the model runs in eval mode (each submodule's mode restored afterwards). A triplet
    keeps its hardest iterate seen so far, so HM never returns a triplet easier than its source; once a
    triplet has reached its destination (H >= H_D) it is frozen, which is where the squared hinge's
    gradient vanishes anyway. The loop ends early when every triplet has arrived or when the mean loss
    changed by less than ``tol`` since the previous step (robrank's saturation stop).

    Args:
        model: embedder, images [N, C, H, W] in [0, 1] -> L2-normalised embeddings [N, D].
        xa, xp, xn: source triplet images [T, C, H, W].
        destination: H_D per triplet, [T] (or a scalar tensor), in [-2, 2].
        ball: threat model (paper: L-inf, eps 8/255, step 1/255).
        steps: at most this many PGD steps (eta).
        tol: saturation threshold of the early stop.
    """
    t = xa.shape[0]
    with eval_mode(model), grad_enabled():
        x0 = torch.stack([xa, xp, xn], dim=1).detach().clone()  # [T, 3, C, H, W]: a triplet is one sample
        dest = torch.as_tensor(destination, dtype=x0.dtype, device=x0.device).expand(t).detach().clone()
        seen: dict[str, torch.Tensor] = {}

        def neg_loss(x: torch.Tensor) -> torch.Tensor:
            e = model(x.flatten(0, 1)).reshape(t, 3, -1)
            h = hardness(e[:, 0], e[:, 1], e[:, 2])
            seen["h"] = h.detach()
            return -(dest - h).clamp_min(0.0).pow(2)

        x, best = x0, x0
        best_h = h_src = None
        prev = None
        taken = 0
        for it in range(steps + 1):
            if it < steps:
                loss, grad = input_grad(neg_loss, x)
            else:
                with torch.no_grad():
                    loss = neg_loss(x)
            h = seen["h"]
            if best_h is None:
                h_src, best_h = h, h.clone()
            else:
                take = (h > best_h) & (best_h < dest)
                best = where(take, x, best)
                best_h = torch.where(take, h, best_h)
            active = best_h < dest
            mean_loss = float(-loss.mean())
            if it == steps or not bool(active.any()) or (prev is not None and abs(prev - mean_loss) < tol):
                break
            prev = mean_loss
            # Descending the loss = ascending its negation; arrived triplets stay where they are.
            x = where(active, ball.project(ball.ascend(x.detach(), grad), x0), x).detach()
            taken += 1
    best = best.detach()
    return HMResult(best[:, 0], best[:, 1], best[:, 2], h_src, best_h, taken)

"""TRADES (Zhang et al., ICML 2019): CE on clean inputs + beta * KL(p_clean || p_adv), where x_adv maximises
that KL inside the ball."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from serving.runtime.spec import Frozen
from serving.runtime.attacks import LpBall, eval_mode, input_grad
from serving.runtime.attacks.core import grad_enabled
from training.losses import trades_kl
from training.methods.base import TrainingMethod, register_method


class TradesOptions(Frozen):
    beta: float = Field(6.0, ge=0.0)
    start_std: float = Field(0.001, ge=0.0)  # TRADES starts at x + N(0, 0.001^2): the KL's gradient is 0 at x


def trades_attack(model, x: torch.Tensor, ball: LpBall, steps: int, start_std: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """PGD on KL(p_clean || p_adv) with the clean side fixed, from a small Gaussian start.

    Runs in eval mode (submodule flags restored). x [B, C, H, W] in [0, 1] -> x_adv, detached.
    """
    with eval_mode(model), grad_enabled():
        x0 = x.detach().clone()
        with torch.no_grad():
            clean = model(x0)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator else x0.device)
        xa = ball.project(x0 + start_std * noise.to(x0.device), x0)
        for _ in range(steps):
            _, grad = input_grad(lambda v: trades_kl(model(v), clean, reduction="none"), xa)
            xa = ball.project(ball.ascend(xa, grad), x0)
    return xa.detach()


@register_method("trades")
class Trades(TrainingMethod):
    Options = TradesOptions

    def training_step(self, net, model, x, y):
        ball = LpBall.from_threat(self.cfg.attack)
        x_adv = trades_attack(model, x, ball, self.cfg.attack_steps, self.options.start_std, self.generator)
        # Two forwards, as in TRADES: BatchNorm normalises the clean and the adversarial batch separately.
        clean = net(x)
        adv = net(x_adv)
        ce = F.cross_entropy(clean, y)
        kl = trades_kl(adv, clean)
        loss = ce + self.options.beta * kl
        with torch.no_grad():
            acc = (adv.argmax(1) == y).float().mean().item()
        return loss, {"loss": loss.item(), "ce": ce.item(), "kl": kl.item(), "adv_acc": acc}

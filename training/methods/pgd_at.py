"""PGD adversarial training (Madry et al., ICLR 2018): cross-entropy on untargeted PGD examples only."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from serving.runtime.spec import Frozen
from serving.runtime.attacks import PGD, LpBall
from training.methods.base import TrainingMethod, register_method


class PGDATOptions(Frozen):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


@register_method("pgd-at")
class PGDAT(TrainingMethod):
    """Each step: x_adv = PGD-k on CE from a uniform random start (model in eval mode, so dropout and BatchNorm
    do not change the attacked function mid-attack), then CE(net(x_adv), y) in train mode.
    Threat model and steps come from ``method.attack`` / ``method.attack_steps``."""

    Options = PGDATOptions

    def setup(self, model):
        self.attack = PGD(model, LpBall.from_threat(self.cfg.attack), self.cfg.attack_steps,
                          generator=self.generator)

    def training_step(self, net, model, x, y):
        x_adv = self.attack(x, y)
        logits = net(x_adv)
        loss = F.cross_entropy(logits, y, label_smoothing=self.options.label_smoothing)
        with torch.no_grad():
            acc = (logits.argmax(1) == y).float().mean().item()
        return loss, {"loss": loss.item(), "adv_acc": acc}

"""Standard (clean) training: cross-entropy on unperturbed images."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from serving.runtime.spec import Frozen
from training.methods.base import TrainingMethod, register_method


class StandardOptions(Frozen):
    label_smoothing: float = 0.0


@register_method("standard")
class Standard(TrainingMethod):
    Options = StandardOptions
    adversarial = False

    def training_step(self, net, model, x, y):
        logits = net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.options.label_smoothing)
        with torch.no_grad():
            acc = (logits.argmax(1) == y).float().mean().item()
        return loss, {"loss": loss.item(), "train_acc": acc}

"""Plain triplet training on SPC-2 batches (the undefended baseline)."""
from __future__ import annotations

import torch

from training.metric import hardness, sample_triplets, triplet_loss_pml
from training.methods._embedding import EmbeddingMethod, EmbeddingOptions
from training.methods.base import register_method


@register_method("triplet")
class Triplet(EmbeddingMethod):
    """L_T(a, p, n; m) on triplets mined from the batch's own embeddings (computed with gradients)."""

    Options = EmbeddingOptions
    adversarial = False

    def training_step(self, net, model, x, y):
        self.prepare(model)
        e = net(x)
        a, p, n = sample_triplets(e.detach(), y, self.options.sampler, self.options.margin, self.mining_generator)
        loss = triplet_loss_pml(e[a], e[p], e[n], self.options.margin)
        with torch.no_grad():
            h = hardness(e[a], e[p], e[n])
        return loss, {"loss": loss.item(), "hardness": h.mean().item()}

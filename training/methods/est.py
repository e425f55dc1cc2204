"""EST: Embedding-Shifted Triplet (Zhou et al., "Adversarial Attack and Defense in Deep Ranking", robrank).

Every image is perturbed to maximise its own embedding shift ||phi(x~) - phi(x)|| (PGD, no random start),
then the triplet loss is taken on triplets mined from the perturbed batch.
"""
from __future__ import annotations

from serving.runtime.attacks.ranking import embedding_shift_attack
from training.metric import sample_triplets, triplet_loss_pml
from training.methods._embedding import EmbeddingMethod, EmbeddingOptions
from training.methods.base import register_method


@register_method("est")
class EST(EmbeddingMethod):
    Options = EmbeddingOptions

    def training_step(self, net, model, x, y):
        self.prepare(model)
        x_adv = embedding_shift_attack(model, x, self.ball, self.steps)
        e = net(x_adv)
        a, p, n = sample_triplets(e.detach(), y, self.options.sampler, self.options.margin, self.mining_generator)
        loss = triplet_loss_pml(e[a], e[p], e[n], self.options.margin)
        return loss, {"loss": loss.item()}

"""ACT: Anti-Collapse Triplet (Zhou et al., "Adversarial Attack and Defense in Deep Ranking", robrank).

Triplets are mined on the benign batch; the anchor stays benign while the positive and the negative are
perturbed together to pull their embeddings onto each other (PGD minimising d(phi(p~), phi(n~)), no
random start), then the triplet loss is taken on (a, p~, n~).
"""
from __future__ import annotations

import torch

from serving.runtime.attacks.base import eval_mode
from serving.runtime.attacks.core import grad_enabled
from serving.runtime.attacks.pgd import pgd
from training.metric import hardness, pairwise_distance, sample_triplets, triplet_loss_pml
from training.methods._embedding import EmbeddingMethod, EmbeddingOptions
from training.methods.base import register_method


def collapse_attack(model, xp: torch.Tensor, xn: torch.Tensor, ball, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD on each (positive, negative) pair, treated as one sample, minimising d(phi(p~), phi(n~)).
    xp, xn: [T, C, H, W] -> (p~, n~) like them."""
    t = xp.shape[0]
    with eval_mode(model), grad_enabled():
        def neg_dist(x):
            e = model(x.flatten(0, 1)).reshape(t, 2, -1)
            return -pairwise_distance(e[:, 0], e[:, 1])

        x = pgd(neg_dist, torch.stack([xp, xn], dim=1), ball, steps, random_start=False)
    return x[:, 0], x[:, 1]


@register_method("act")
class ACT(EmbeddingMethod):
    Options = EmbeddingOptions

    def training_step(self, net, model, x, y):
        self.prepare(model)
        emb = self.benign_embeddings(model, x)
        a, p, n = sample_triplets(emb, y, self.options.sampler, self.options.margin, self.mining_generator)
        xp, xn = collapse_attack(model, x[p], x[n], self.ball, self.steps)
        t = a.numel()
        e = net(torch.cat([x[a], xp, xn]))
        ea, ep, en = e[:t], e[t:2 * t], e[2 * t:]
        loss = triplet_loss_pml(ea, ep, en, self.options.margin)
        with torch.no_grad():
            h = hardness(ea, ep, en).mean().item()
        return loss, {"loss": loss.item(), "hardness_adv": h}
